"""`python -m pyoptim.benchmark`: the user's cases (shapes, models, state_dicts, norm sizes), the catalogue of
model shapes against the published counts (and torchvision's modules where installed), the table of picks,
and short end-to-end runs whose JSON is checked against the bytes each op must move."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyoptim import _backends
from pyoptim.benchmark import cli, harness, models

ROOT = Path(__file__).resolve().parents[1]


def test_parse_shapes() -> None:
    assert cli.parse_shapes("4096x4096,1024*24") == ((4096, 4096),) + ((1024,),) * 24
    assert cli.parse_shapes(" 3x3x64x64 , 7 ") == ((3, 3, 64, 64), (7,))
    assert cli.parse_shapes("2X5*2") == ((2, 5), (2, 5))


@pytest.mark.parametrize("spec", ["", ",", "0x3", "4096x", "abc", "1024*0", "1024*-1", "1024*x", "-5"])
def test_parse_shapes_rejects(spec: str) -> None:
    with pytest.raises(ValueError):
        cli.parse_shapes(spec)


# Published parameter counts (torchvision's model docs; Hugging Face's configs, GPT-2's head tied).
PUBLISHED = {
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "resnet101": 44_549_160,
    "resnet152": 60_192_808, "vit_b_16": 86_567_656, "vit_b_32": 88_224_232, "vit_l_16": 304_326_632,
    "gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200,
    "bert-base-uncased": 109_482_240, "bert-large-uncased": 335_141_888,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_catalogue_counts(name: str) -> None:
    shapes, source = models.model_shapes(name, "catalogue")
    assert "catalogue" in source
    assert models.count(shapes) == PUBLISHED[name]
    names = [n for n, _ in shapes]
    assert len(names) == len(set(names))  # each parameter once (GPT-2's tied head adds none)


def test_catalogue_aliases_and_unknown() -> None:
    assert models.model_shapes("bert-base", "catalogue")[0] == models.model_shapes("bert-base-uncased", "catalogue")[0]
    with pytest.raises(KeyError, match="resnet50"):
        models.model_shapes("no-such-model", "catalogue")


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision is not installed")
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet152", "vit_b_16", "vit_l_16"])
def test_catalogue_matches_torchvision(name: str) -> None:
    """The generators' names, shapes and order are those of torchvision's modules built on the meta device."""
    ours, _ = models.model_shapes(name, "catalogue")
    theirs, source = models.model_shapes(name, "torchvision")
    assert "torchvision" in source
    assert ours == theirs


def test_state_dict_shapes(tmp_path: Path) -> None:
    """A checkpoint's floating tensors: BatchNorm's running statistics left out, a tied weight counted once."""
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(11, 6)
            self.bn = torch.nn.BatchNorm1d(6)
            self.head = torch.nn.Linear(6, 11, bias=False)
            self.head.weight = self.emb.weight  # tied

    net = Net()
    torch.save({"model": net.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    shapes = cli.state_dict_shapes(tmp_path / "ckpt.pt")
    assert shapes == [("emb.weight", (11, 6)), ("bn.weight", (6,)), ("bn.bias", (6,))]
    torch.save({"step": torch.tensor(3)}, tmp_path / "empty.pt")
    with pytest.raises(ValueError, match="no floating-point tensors"):
        cli.state_dict_shapes(tmp_path / "empty.pt")


def _row(impl: str, family: str, ms: float, q1: float, q3: float) -> harness.Row:
    return harness.Row("adam", "c", impl, family, 10, 1, 280, ms=ms, ms_q1=q1, ms_q3=q3, GBps=280 / ms / 1e6,
                       frac_of_bw=0.5)


def test_picks() -> None:
    """The fastest median wins; a runner-up whose interquartile range reaches the winner's is a tie."""
    ops = harness.discover_ops()
    rows = [_row("pyoptim-cpu", "pyoptim", 1.0, 0.9, 1.1), _row("torch-fused", "torch", 2.0, 1.9, 2.1),
            _row("torch-foreach", "torch", 3.0, 2.9, 3.1)]
    [p] = cli.picks([{"meta": {"op": "adam"}, "rows": rows}], ops)
    assert (p["pick"], p["runner_up"], p["torch_best"], p["tie"]) == ("pyoptim-cpu", "torch-fused", "torch-fused", False)
    assert p["speedup_vs_torch_best"] == pytest.approx(2.0)
    assert p["usage"] == 'pyoptim.optim.AdamW(..., backend="cpu")'
    rows[1] = _row("torch-fused", "torch", 1.2, 1.05, 1.3)  # reaches into pyoptim-cpu's spread
    [p] = cli.picks([{"meta": {"op": "adam"}, "rows": rows}], ops)
    assert p["tie"] and p["runner_up"] == "torch-fused"
    table = cli.format_picks([p])
    assert "tie with torch-fused" in table and "adam: pick pyoptim-cpu (1 of 1 cases)" in table
    assert ops["clip_adamw"].usage("pyoptim-cpu") == 'pyoptim.optim.AdamW(..., max_grad_norm=..., backend="cpu")'
    assert ops["sgd"].usage("torch-foreach") == "torch.optim.SGD(..., foreach=True)"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("PYOPTIM_BACKEND", None)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "pyoptim.benchmark", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def test_cli_end_to_end(tmp_path: Path) -> None:
    """Shapes and both norm kinds, --quick: per op a JSON whose rows are the bytes the op moves over its median
    time, the user's cases with their element counts, and a picks file that names each case's fastest impl."""
    out_dir = tmp_path / "out"
    r = run_cli("--shapes", "64x64,128*3", "--layer-norm", "64x256", "--batch-norm", "4x8x8x8", "--layouts", "nchw",
                "--quick", "--no-progress", "--out", str(out_dir), cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "which to pick" in r.stdout
    numel = {"adam": 64 * 64 + 3 * 128, "sgd": 64 * 64 + 3 * 128, "layer_norm": 64 * 256, "rms_norm": 64 * 256,
             "batch_norm": 4 * 8 * 8 * 8}
    per_elem = {"adam": 28, "sgd": 20, "layer_norm": 20, "rms_norm": 20}  # fp32 bytes (BatchNorm adds per channel)
    picks = json.loads((out_dir / "picks_cpu.json").read_text())["picks"]
    assert sorted(p["op"] for p in picks) == sorted(numel)
    for op, n in numel.items():
        data = json.loads((out_dir / f"{op}_cpu.json").read_text())
        meta, rows = data["meta"], data["rows"]
        assert meta["op"] == op and meta["device"] == "cpu" and meta["bandwidth"]["roofline_GBps"] > 0
        [(case, info)] = meta["cases"].items()
        assert info["numel"] == n
        impls = {row["impl"] for row in rows}
        assert ("pyoptim-cpu" if _backends.EXTENSION_LOADED else "pyoptim-reference") in impls
        assert any(i.startswith("torch") for i in impls)
        if op in ("adam", "sgd"):  # torch's three implementations beside ours
            assert {"torch-forloop", "torch-foreach"} <= impls, impls
            assert op == "sgd" or "torch-fused" in impls, impls
        for row in rows:
            assert row["error"] is None, row
            assert row["ms"] > 0 and row["reps"] >= 1
            if op in per_elem:
                assert row["bytes"] == per_elem[op] * n
            assert row["GBps"] == pytest.approx(row["bytes"] / row["ms"] / 1e6)
            assert 0 < row["frac_of_bw"] == pytest.approx(row["GBps"] / row["roofline_GBps"])
        [p] = [p for p in picks if p["op"] == op]
        fastest = min(rows, key=lambda row: row["ms"])
        assert (p["case"], p["pick"], p["ms"]) == (case, fastest["impl"], fastest["ms"])
        assert p["usage"].startswith(("pyoptim.", "torch."))
        assert (out_dir / f"{op}_cpu.png").exists() == (importlib.util.find_spec("matplotlib") is not None)


def test_cli_model_from_catalogue(tmp_path: Path) -> None:
    """In process (cli.main with an argv never re-executes the process): a model's parameter list as one case."""
    assert cli.main(["--model", "resnet18", "--model-source", "catalogue", "--ops", "sgd", "--impls",
                     "pyoptim-*,torch-fused", "--quick", "--no-plot", "--no-progress", "--out", str(tmp_path)]) == 0
    meta = json.loads((tmp_path / "sgd_cpu.json").read_text())["meta"]
    assert meta["cases"]["resnet18"]["numel"] == 11_689_512 and meta["cases"]["resnet18"]["ntensors"] == 62
    assert "pyoptim's catalogue" in meta["cases"]["resnet18"]["description"]


@pytest.mark.parametrize("args, message", [
    (["--shapes", "0x3"], "every dim must be positive"),
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--state-dict", "no-such-file.pt"], "--state-dict no-such-file.pt: no such file"),
    (["--state-dict", __file__], "cannot read it"),  # not a torch.save file
    (["--passes", "sideways"], "unknown pass 'sideways'"),
    (["--shapes", "64", "--ops", "nope"], "unknown op 'nope'"),
    (["--layer-norm", "64x64x2"], "(batch, hidden)"),
    (["--shapes", "64", "--ops", "layer_norm"], "op layer_norm needs cases from --layer-norm"),
    (["--shapes", "64", "--impls", "nobody"], "no impl matches 'nobody'"),
])
def test_cli_bad_arguments(tmp_path: Path, capsys, args: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main([*args, "--out", str(tmp_path)])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_no_arguments_runs_defaults(tmp_path: Path, capsys) -> None:
    """No cases given: the defaults (resnet18's parameters from the catalogue, LayerNorm/RMSNorm and BatchNorm of
    a common size), said so, every default op measured and picked. --quick and two impls keep the test short;
    the defaults themselves are what a bare `python -m pyoptim.benchmark` runs."""
    assert cli.main(["--quick", "--no-plot", "--no-progress", "--impls", "pyoptim-*,torch*",
                     "--layouts", "nchw", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "no cases given, so these defaults: --model resnet18 --layer-norm 4096x1024 --batch-norm 32x64x56x56" in out
    picks = json.loads((tmp_path / "picks_cpu.json").read_text())["picks"]
    assert sorted((p["op"], p["case"]) for p in picks) == sorted(
        [("adam", "resnet18"), ("sgd", "resnet18"), ("layer_norm", "4096x1024-fwdbwd"),
         ("rms_norm", "4096x1024-fwdbwd"), ("batch_norm", "32x64x56x56-nchw-fwdbwd")]), picks


@pytest.mark.parametrize("op, step_op", [("adagrad", "adagrad_step_"), ("rmsprop", "rmsprop_step_")])
def test_cli_op_this_pyoptim_lacks(tmp_path: Path, capsys, op: str, step_op: str) -> None:
    if step_op in _backends._IMPLS:
        pytest.skip(f"this pyoptim has {step_op}")
    with pytest.raises(SystemExit) as e:
        cli.main(["--shapes", "64", "--ops", op, "--out", str(tmp_path)])
    assert e.value.code == 2 and f"has no op '{step_op}'" in capsys.readouterr().err


def test_memory_note() -> None:
    """A case that cannot fit beside one copy per impl is flagged before anything is allocated."""
    ops = harness.discover_ops()
    parser = cli.build_parser(ops)
    opts = parser.parse_args(["--shapes", "1"])
    huge = harness.Case("huge", ((2**40,),), "")
    plan = [(harness.dataclasses.replace(ops["adam"], cases={"huge": huge}), ["huge"])]
    note = cli._memory_note(plan, torch.device("cpu"), torch.float32, opts)
    if note is not None:  # None only where /proc/meminfo cannot be read
        assert "may need about" in note and math.isfinite(float(note.split("about ")[1].split()[0]))
