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
from typing import Optional

import pytest

import pyoptim

ROOT = Path(__file__).resolve().parents[1]
HAS_MPL = importlib.util.find_spec("matplotlib") is not None
HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None


def run_example(name: str, *args: str, cwd: Path, path: tuple[Path, ...] = (),
                env_extra: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess:
    """`python examples/<name> *args` in `cwd`, with the working tree's pyoptim (and `path`) importable."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*map(str, path), str(ROOT), os.environ.get("PYTHONPATH", "")]),
               **(env_extra or {}))
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
    # --optimizer, --weight-decay, --l1 and --clip reach the optimizer: pyoptim's fuses L1 and the clip into its
    # step (l1_weight_decay=, max_grad_norm=), torch's loop applies them to the grads itself
    cls = "AdamW" if "adamw" in flags else "SGD"
    ours, theirs = res["pyoptim"]["optimizer"], res["torch"]["optimizer"]
    assert ours["class"].startswith("pyoptim.optim") and ours["class"].endswith("." + cls), ours
    assert theirs["class"].startswith("torch.optim") and theirs["class"].endswith("." + cls), theirs
    assert ours["weight_decay"] == theirs["weight_decay"] == (0.05 if "adamw" in flags else 5e-4)
    assert ours.get("l1_weight_decay", 0.0) == (1e-5 if "--l1" in flags else 0.0), ours
    assert ours.get("max_grad_norm") == (0.5 if "--clip" in flags else None), ours
    if cls == "SGD":
        assert ours["momentum"] == theirs["momentum"] == 0.9
    # --norm and --layer-norm put what they say where, from each library's nn
    for lib, nn in (("pyoptim", "pyoptim.nn"), ("torch", "torch.nn")):
        layers = res[lib]["layers"]
        norm = "InstanceNorm2d" if "instance" in flags else "BatchNorm2d"
        assert sum(n.endswith("." + norm) for n in layers) == 2, layers  # one after each conv
        assert all(n.startswith(nn) for n in layers if n.endswith(norm)), layers
        assert not any(n.endswith(("BatchNorm2d", "InstanceNorm2d")[norm == "BatchNorm2d"]) for n in layers), layers
        ln = [i for i, n in enumerate(layers) if n.endswith(".LayerNorm")]
        if "--layer-norm" in flags:  # one, right before the head's first Linear
            assert len(ln) == 1 and layers[ln[0]].startswith(nn) and layers[ln[0] + 1].endswith("Linear"), layers
        else:
            assert not ln, layers
    if HAS_MPL:  # one PNG with two panels: loss and accuracy, a line per library (and split) in each
        import matplotlib.image

        png = tmp_path / "curves.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = matplotlib.image.imread(png)
        assert img.shape[1] > 2 * img.shape[0] * 0.9, img.shape  # the two panels side by side
        for half in (img[:, :img.shape[1] // 2], img[:, img.shape[1] // 2:]):
            assert half[..., :3].std() > 0.05  # drawn on, not blank
        assert "wrote " + str(png) in out
    else:
        assert "no plot" in out


def test_convnet_early_stopping_restores_best(tmp_path: Path) -> None:
    """Adam at lr 0.01 on 60 images diverges after its first epoch (seed 0): the run stops `patience` epochs
    after its best, the model it tests is the best epoch's (its validation loss is that epoch's, not the last
    one's), and --checkpoint saved that epoch."""
    args = ["--epochs", "10", "--train-limit", "60", "--val-fraction", "0.3", "--batch-size", "16", "--optimizer",
            "adam", "--lr", "0.01", "--norm", "none", "--schedule", "none", "--patience", "2", "--time-budget", "0.1",
            "--no-progress", "--checkpoint", str(tmp_path / "best.pt"), "--json", str(tmp_path / "r.json")]
    out = ok(run_example("train_convnet.py", *args, cwd=tmp_path))
    r = json.loads((tmp_path / "r.json").read_text())["results"]["pyoptim"]
    val = r["history"]["val_loss"]
    best = r["best_epoch"]
    assert r["epochs_run"] == best + 2 < 10, r  # stopped by patience, not by --epochs
    assert val[best - 1] == min(val)
    assert r["restored_val_loss"] == pytest.approx(val[best - 1], rel=1e-5, abs=1e-6)
    assert abs(val[-1] - val[best - 1]) > 1e-3, val  # the last epoch's weights would read differently
    import torch

    ckpt = torch.load(tmp_path / "best.pt", weights_only=True)
    assert ckpt["epoch"] == best and ckpt["val_loss"] == pytest.approx(val[best - 1])
    assert set(ckpt) == {"model", "optimizer", "epoch", "val_loss"} and "features.0.weight" in ckpt["model"]
    assert ckpt["optimizer"]["state"], "the optimizer's state at the best epoch"
    assert f"saved the best epoch ({best})" in out and "early stop" in out


def write_fake_cifar10(root: Path, n_per_batch: int) -> None:
    """CIFAR-10's python batches in torchvision's layout (root/cifar-10-batches-py/{data_batch_1..5,test_batch,
    batches.meta}: pickled dicts of uint8 data (N, 3072), channel-major, and int labels), with a learnable
    picture: label k's red channel is bright in its k-th row band, the rest noise."""
    import pickle

    import numpy as np

    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, n_per_batch)
        img = rng.integers(0, 60, (n_per_batch, 3, 32, 32), dtype=np.uint8)
        for i, k in enumerate(labels):
            img[i, 0, 3 * k:3 * k + 3] = 250
        with open(base / name, "wb") as f:
            pickle.dump({"data": img.reshape(n_per_batch, 3072), "labels": labels.tolist()}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)


def test_convnet_cifar10_folder(tmp_path: Path) -> None:
    """--data DIR reads torchvision's CIFAR-10 format offline (without torchvision where it is absent; a folder
    whose files are not the published ones, as here, is read directly too) and trains on it."""
    write_fake_cifar10(tmp_path / "cifar", n_per_batch=40)
    out = ok(run_example("train_convnet.py", *CONVNET_SHORT, "--data", str(tmp_path / "cifar"), "--json",
                         str(tmp_path / "r.json"), cwd=tmp_path))
    n_train = 5 * 40
    n_val = int(0.15 * n_train)
    assert f"CIFAR-10 from {tmp_path / 'cifar'}" in out
    assert f"{n_train - n_val} train, {n_val} validation, 40 test images" in out
    h = json.loads((tmp_path / "r.json").read_text())["results"]["pyoptim"]
    assert h["history"]["train_loss"][-1] < 0.8 * h["history"]["train_loss"][0], h["history"]
    # the folder itself (cifar-10-batches-py) works as well; a folder without the batches says what to do
    assert "CIFAR-10 from" in ok(run_example("train_convnet.py", *CONVNET_SHORT, "--epochs", "1", "--data",
                                             str(tmp_path / "cifar" / "cifar-10-batches-py"), cwd=tmp_path))
    r = run_example("train_convnet.py", "--data", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 1 and "no CIFAR-10 in torchvision's format there" in r.stderr, r.stderr


FAKE_TORCHVISION_DATASETS = r"""
import json, os

import numpy as np


class CIFAR10:
    def __init__(self, root, train=True, transform=None, target_transform=None, download=False):
        with open(os.environ["FAKE_TORCHVISION_LOG"], "a") as f:
            f.write(json.dumps(dict(root=root, train=train, download=download)) + "\n")
        n = 50 if train else 20
        self.targets = np.random.default_rng(int(train)).integers(0, 10, n).tolist()
        self.data = np.zeros((n, 32, 32, 3), np.uint8)  # (N, H, W, C), as torchvision holds it
"""


def test_convnet_cifar10_through_torchvision(tmp_path: Path) -> None:
    """Where torchvision is installed, --data DIR is torchvision.datasets.CIFAR10(DIR, download=False), train and
    test split (torchvision replaced by a recorder, so this runs where it is absent too)."""
    write_fake_cifar10(tmp_path / "cifar", n_per_batch=1)
    fake = tmp_path / "fake" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("from . import datasets\n")
    (fake / "datasets.py").write_text(FAKE_TORCHVISION_DATASETS)
    log = tmp_path / "calls.jsonl"
    out = ok(run_example("train_convnet.py", *CONVNET_SHORT, "--epochs", "1", "--data", str(tmp_path / "cifar"),
                         cwd=tmp_path, path=(tmp_path / "fake",), env_extra={"FAKE_TORCHVISION_LOG": str(log)}))
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls == [dict(root=str(tmp_path / "cifar"), train=t, download=False) for t in (True, False)]
    assert "torchvision.datasets.CIFAR10, download=False" in out
    assert f"{50 - int(0.15 * 50)} train, {int(0.15 * 50)} validation, 20 test images" in out


FAKE_TQDM = r"""
import json, os


class tqdm:
    def __init__(self, iterable=None, total=None, desc=None, **kw):
        with open(os.environ["FAKE_TQDM_LOG"], "a") as f:
            f.write(json.dumps(dict(desc=desc, total=total)) + "\n")
        self.iterable, self.postfix = iterable, None

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix(self, **kw):
        self.postfix = kw

    def close(self):
        pass
"""


def test_convnet_progress_bar_per_epoch(tmp_path: Path) -> None:
    """A tqdm bar per epoch and library, over that epoch's steps (tqdm replaced by a recorder); without tqdm, a
    note saying how to get one."""
    (tmp_path / "fake" / "tqdm").mkdir(parents=True)
    (tmp_path / "fake" / "tqdm" / "__init__.py").write_text(FAKE_TQDM)
    log = tmp_path / "bars.jsonl"
    short = [a for a in CONVNET_SHORT if a != "--no-progress"]
    ok(run_example("train_convnet.py", *short, "--epochs", "2", "--steps-per-epoch", "3", "--compare-torch", "--plot", str(tmp_path / "p.png"),
                   cwd=tmp_path, path=(tmp_path / "fake",), env_extra={"FAKE_TQDM_LOG": str(log)}))
    bars = [json.loads(line) for line in log.read_text().splitlines()]
    assert bars == [dict(desc=f"{lib} epoch {e}/2", total=3) for lib in ("pyoptim", "torch") for e in (1, 2)]
    if importlib.util.find_spec("tqdm") is None:
        out = ok(run_example("train_convnet.py", *short, "--epochs", "1", cwd=tmp_path))
        assert out.count("pip install tqdm") == 1


def test_convnet_aliases() -> None:
    """--l2, --max-grad-norm and --lr-decay are --weight-decay, --clip and --schedule under the names courses use."""
    spec = importlib.util.spec_from_file_location("train_convnet", ROOT / "examples" / "train_convnet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    opts = mod.build_parser().parse_args(["--l2", "0.1", "--max-grad-norm", "2", "--lr-decay", "step"])
    assert (opts.weight_decay, opts.clip, opts.schedule) == (0.1, 2.0, "step")


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


@pytest.mark.parametrize("flags, state", [
    # an fp32 master beside each bf16 param, fp32 moments (the policy's default state dtype)
    (["--master-weights", "fp32"], {"param": "torch.bfloat16", "master_param": "torch.float32",
                                    "exp_avg": "torch.float32", "exp_avg_sq": "torch.float32"}),
    # the master as bf16 param + int16 remainder, and moments stored in bf16
    (["--master-weights", "remainder", "--state-dtype", "bf16"],
     {"param": "torch.bfloat16", "param_remainder": "torch.int16", "exp_avg": "torch.bfloat16",
      "exp_avg_sq": "torch.bfloat16"}),
], ids=["fp32-master", "remainder-bf16-state"])
def test_gpt_precision_policy_flags(tmp_path: Path, flags: list[str], state: dict[str, str]) -> None:
    """--param-dtype bf16 with --master-weights / --state-dtype: the optimizer holds the state they name, and
    the loss still falls."""
    r = run_example("train_gpt.py", *GPT_SMALL, "--steps", "20", "--max-chars", "50000", "--param-dtype", "bf16",
                    *flags, "--json", str(tmp_path / "g.json"), cwd=tmp_path)
    out = ok(r)
    assert f"master weights {flags[1]}" in out
    data = json.loads((tmp_path / "g.json").read_text())
    assert data["optimizer_state"] == state
    losses = data["results"]["pyoptim"]["losses"]
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses


def test_gpt_precision_flag_needs_bf16_params(tmp_path: Path) -> None:
    r = run_example("train_gpt.py", "--master-weights", "fp32", cwd=tmp_path)
    assert r.returncode == 2 and "give --param-dtype bf16" in r.stderr, r.stderr
