"""Short runs of the examples (examples/train_convnet.py, examples/train_gpt.py), as a user runs them: each in a
subprocess with the working tree's pyoptim, asserting that the loss goes down, the outputs exist, and a flag
this pyoptim cannot serve fails with its reason."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import pyoptim

ROOT = Path(__file__).resolve().parents[1]
HAS_MPL = importlib.util.find_spec("matplotlib") is not None
HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None


def run_example(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("PYOPTIM_BACKEND", None)
    env.pop("TRITON_INTERPRET", None)  # the examples run the default backends
    return subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


# A few steps on the default data (digits, or the synthetic set without scikit-learn).
CONVNET_SHORT = ["--epochs", "3", "--steps-per-epoch", "6", "--batch-size", "32", "--time-budget", "0.2",
                 "--no-progress", "--patience", "0"]


@pytest.mark.parametrize("flags", [
    [],  # the defaults: SGD + momentum, BatchNorm, cosine decay
    # every other technique at once: AdamW, InstanceNorm, LayerNorm before the head, L1, clip, step decay
    ["--optimizer", "adamw", "--lr", "2e-3", "--weight-decay", "0.05", "--norm", "instance", "--layer-norm",
     "--l1", "1e-5", "--clip", "0.5", "--schedule", "step", "--step-size", "1", "--gamma", "0.5"],
], ids=["defaults", "adamw-instance-layernorm-l1-clip-step"])
def test_convnet_compare_torch(tmp_path: Path, flags: list[str]) -> None:
    out = ok(run_example("train_convnet.py", *CONVNET_SHORT, *flags, "--compare-torch",
                         "--plot", str(tmp_path / "curves.png"), "--json", str(tmp_path / "r.json"), cwd=tmp_path))
    assert ("scikit-learn's digits" if HAS_SKLEARN else "synthetic") in out
    res = json.loads((tmp_path / "r.json").read_text())["results"]
    assert set(res) == {"pyoptim", "torch"}
    for lib, r in res.items():
        h = r["history"]
        assert len(h["train_loss"]) == 3, (lib, h)
        assert h["train_loss"][-1] < 0.8 * h["train_loss"][0], (lib, h["train_loss"])
        assert r["test_acc"] > 0.3, (lib, r["test_acc"])  # 10 classes: chance is 0.1
        assert r["step"]["ms"] > 0
        assert f"{lib}: test accuracy" in out
    # The same loop, the same initial weights and batches: the first epoch's mean loss agrees between the
    # libraries (their kernels round differently, so not to the bit).
    a, b = res["pyoptim"]["history"]["train_loss"][0], res["torch"]["history"]["train_loss"][0]
    assert abs(a - b) <= 2e-2 * b, (a, b)
    if "--schedule" in flags:  # step decay by 0.5 each epoch
        assert res["pyoptim"]["history"]["lr"] == pytest.approx([2e-3, 1e-3, 5e-4])
    if HAS_MPL:
        assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "no plot" in out


def test_convnet_early_stopping(tmp_path: Path) -> None:
    """With lr 0 (and no norm layer whose statistics move) the validation loss never improves after the first
    epoch: patience 2 stops the run after epoch 3 and keeps epoch 1 as the best."""
    args = ["--epochs", "8", "--steps-per-epoch", "2", "--batch-size", "16", "--time-budget", "0.1", "--no-progress",
            "--lr", "0", "--norm", "none", "--schedule", "none", "--patience", "2", "--json", str(tmp_path / "r.json")]
    out = ok(run_example("train_convnet.py", *args, cwd=tmp_path))
    r = json.loads((tmp_path / "r.json").read_text())["results"]["pyoptim"]
    assert r["epochs_run"] == 3 and r["best_epoch"] == 1, r
    assert "early stop" in out


@pytest.mark.parametrize("optimizer", ["adagrad", "rmsprop"])
def test_convnet_optimizers_landing_separately(tmp_path: Path, optimizer: str) -> None:
    """Adagrad and RMSprop run where pyoptim.optim has them, and fail with the reason where it does not."""
    cls = {"adagrad": "Adagrad", "rmsprop": "RMSprop"}[optimizer]
    r = run_example("train_convnet.py", *CONVNET_SHORT, "--epochs", "1", "--optimizer", optimizer, "--lr", "1e-2",
                    cwd=tmp_path)
    if hasattr(pyoptim.optim, cls):
        assert "pyoptim: test accuracy" in ok(r)
    else:
        assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
        assert f"has no pyoptim.optim.{cls}" in r.stderr


GPT_SMALL = ["--steps", "40", "--batch-size", "8", "--block-size", "32", "--d-model", "64", "--n-layer", "2",
             "--n-head", "2", "--warmup", "5", "--log-every", "10", "--sample", "20", "--lr", "1e-2"]


@pytest.mark.parametrize("flags", [
    ["--max-chars", "200000"],  # the default text: the installed torch's sources
    ["--norm", "rms", "--autocast", "bf16", "--compare-torch", "--text", "TEXT"],
], ids=["torch-sources-layernorm", "text-rmsnorm-bf16-compare"])
def test_gpt(tmp_path: Path, flags: list[str]) -> None:
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    flags = [str(text) if f == "TEXT" else f for f in flags]
    out = ok(run_example("train_gpt.py", *GPT_SMALL, *flags, "--json", str(tmp_path / "g.json"), cwd=tmp_path))
    data = json.loads((tmp_path / "g.json").read_text())
    assert ("torch's Python sources" if "--text" not in flags else str(text)) in data["text"]
    libs = {"pyoptim", "torch"} if "--compare-torch" in flags else {"pyoptim"}
    assert set(data["results"]) == libs
    for lib, r in data["results"].items():
        losses = r["losses"]
        assert len(losses) == 40
        assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, (lib, losses)
        assert r["tokens_per_s"] > 0 and r["optimizer_ms_in_loop"] > 0
    assert data["optimizer_step"]["pyoptim"]["ms"] > 0 and data["optimizer_step"]["torch"]["ms"] > 0
    assert "tokens/s" in out and "optimizer step alone" in out and "sample:" in out


def test_gpt_precision_policy_flag(tmp_path: Path) -> None:
    """--master-weights runs where pyoptim has the precision policy, and fails with the reason where not."""
    import inspect

    r = run_example("train_gpt.py", *GPT_SMALL, "--steps", "10", "--max-chars", "50000", "--param-dtype", "bf16",
                    "--master-weights", "fp32", cwd=tmp_path)
    if "master_weights" in inspect.signature(pyoptim.optim.AdamW).parameters:
        assert "master weights fp32" in ok(r)
    else:
        assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
        assert "has no precision policy yet" in r.stderr
