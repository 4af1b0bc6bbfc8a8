"""The classic training loop, with pyoptim: a small ConvNet classifies images, with every technique a
deep-learning course teaches behind a flag.

    python examples/train_convnet.py                       # scikit-learn's digits, SGD + momentum, BatchNorm
    python examples/train_convnet.py --compare-torch       # the same loop with torch.optim / torch.nn, curves to PNG
    python examples/train_convnet.py --data ~/cifar10      # CIFAR-10 from a local folder (torchvision's format)
    python examples/train_convnet.py --optimizer adamw --lr 2e-3 --weight-decay 0.05 --norm instance \\
        --layer-norm --l1 1e-5 --clip 1.0 --schedule cosine --patience 3

The model: conv 3->32, pool, conv 32->64, pool, fc 4096->128->10, cross-entropy, on 3x32x32 images;
BatchNorm or InstanceNorm after each conv (--norm), LayerNorm before the head (--layer-norm). pyoptim's run
changes two imports: `pyoptim.nn` for the norm layers and `pyoptim.optim` for the optimizer. Its fused
extras stand where a torch loop writes code of its own: L1 (`l1_weight_decay=`, the gradient l1 * sign(p)
added inside the step) and gradient clipping (`max_grad_norm=`, the global norm's clip applied inside the
step, the grads untouched); --compare-torch's torch loop does the same with torch.nn.utils.clip_grad_norm_
and p.grad.add_(l1 * p.sign()) after it, so that the two loops compute the same update. L2 is each
optimizer's weight_decay (decoupled for AdamW).

Data, offline: --data DIR reads CIFAR-10 in torchvision's format, with torchvision.datasets.CIFAR10(DIR,
download=False) where torchvision is installed (else its batches are read here); by default
scikit-learn's digits (1,797 real 8x8 scans of handwritten digits, upsampled to 32x32, three channels);
without scikit-learn, a synthetic set (noisy class templates), said so in a note. Early stopping holds out
--val-fraction of the training set, stops after --patience epochs without a better validation loss and
restores the best epoch's weights before the test. Optional: tqdm (progress bars), matplotlib (the PNG).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

import pyoptim

OPTIMIZERS = ("sgd", "adam", "adamw", "adagrad", "rmsprop")
_CLASS = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "adagrad": "Adagrad", "rmsprop": "RMSprop"}


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------

def load_data(opts: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(train images, train labels, test images, test labels, a description): float32 (N, 3, 32, 32), int64 (N,)."""
    if opts.data:
        xtr, ytr, how = read_cifar10(Path(opts.data), train=True)
        xte, yte, _ = read_cifar10(Path(opts.data), train=False)
        return xtr, ytr, xte, yte, f"CIFAR-10 from {opts.data} ({how})"
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        return _synthetic(opts) + ("synthetic (noisy class templates)",)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).div_(16).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))  # a fixed test split
    n_test = len(y) // 5
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test], "scikit-learn's digits (8x8 scans upsampled to 3x32x32)"


CIFAR_DIR = "cifar-10-batches-py"  # torchvision's folder of CIFAR-10's python batches


def read_cifar10(root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(images float32 (N, 3, 32, 32) in [0, 1], labels int64 (N,), how it was read) of CIFAR-10's train or test
    split in torchvision's format under `root` (the folder holding cifar-10-batches-py/, or that folder
    itself). torchvision.datasets.CIFAR10(root, download=False) reads it where torchvision is installed (it
    checks the files' md5); else, or for a folder that check refuses (a subset), the same pickled batches are
    read here. Never downloads."""
    import pickle

    base = root if (root / "batches.meta").exists() else root / CIFAR_DIR
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    if not all((base / n).exists() for n in names):
        sys.exit(f"--data {root}: no CIFAR-10 in torchvision's format there (expected {base}/"
                 f"{{{','.join(names)}}}); download it once with torchvision.datasets.CIFAR10(root, download=True) "
                 "or from https://www.cs.toronto.edu/~kriz/cifar.html (the python version)")
    try:
        import torchvision
    except ImportError:
        torchvision = None
        how = "its python batches read directly: torchvision is not installed"
    else:
        if base.name != CIFAR_DIR:  # torchvision looks for root/cifar-10-batches-py
            torchvision = None
            how = f"its python batches read directly: torchvision wants them in a folder named {CIFAR_DIR}"
    if torchvision is not None:
        try:
            ds = torchvision.datasets.CIFAR10(str(base.parent), train=train, download=False)
        except RuntimeError as e:  # the md5 check: not the published files
            how = f"its python batches read directly: torchvision refused them ({e})"
        else:
            return (torch.from_numpy(ds.data).permute(0, 3, 1, 2).float().div_(255), torch.tensor(ds.targets),
                    "torchvision.datasets.CIFAR10, download=False")
    xs, ys = [], []
    for n in names:
        with open(base / n, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        xs.append(torch.as_tensor(batch["data"], dtype=torch.uint8).view(-1, 3, 32, 32))
        ys.append(torch.as_tensor(batch["labels"], dtype=torch.long))
    return torch.cat(xs).float().div_(255), torch.cat(ys), how


def _synthetic(opts: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    print("note: scikit-learn is not installed, so this run trains on a synthetic set (10 noisy class "
          "templates), not on real images: pip install scikit-learn for the digits, or give --data DIR (CIFAR-10)")
    g = torch.Generator().manual_seed(1234)
    templates = F.interpolate(torch.rand(10, 3, 8, 8, generator=g), size=(32, 32), mode="bilinear")

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 10, (n,), generator=g)
        return (templates[y] + 0.35 * torch.randn(n, 3, 32, 32, generator=g)).clamp_(0, 1), y

    return draw(1500) + draw(300)


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------

class ConvNet(torch.nn.Module):
    """conv 3->32, [norm], ReLU, pool, conv 32->64, [norm], ReLU, pool, [LayerNorm(4096)], fc 4096->128, ReLU,
    fc 128->10; the norm layers from `nn` (pyoptim.nn or torch.nn)."""

    def __init__(self, nn, norm: str, layer_norm: bool, num_classes: int = 10) -> None:
        super().__init__()

        def norm_layer(c: int) -> torch.nn.Module:
            if norm == "batch":
                return nn.BatchNorm2d(c)
            if norm == "instance":
                return nn.InstanceNorm2d(c, affine=True)
            return torch.nn.Identity()

        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, padding=1), norm_layer(32), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1), norm_layer(64), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(),
        )
        self.pre_head = nn.LayerNorm(64 * 8 * 8) if layer_norm else torch.nn.Identity()
        self.head = torch.nn.Sequential(torch.nn.Linear(64 * 8 * 8, 128), torch.nn.ReLU(),
                                        torch.nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pre_head(self.features(x)))


def layer_names(model: torch.nn.Module) -> list[str]:
    """The model's leaf modules as module.Class, in order (what --norm and --layer-norm put where)."""
    return [f"{type(m).__module__}.{type(m).__name__}" for m in model.modules() if not list(m.children())]


def describe_optimizer(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's class (module.Class), its first group's numeric and boolean hyperparameters, and
    pyoptim's max_grad_norm (an attribute of the optimizer, not of a group)."""
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params" and isinstance(v, (bool, int, float))}
    return {"class": f"{type(opt).__module__}.{type(opt).__name__}", **group,
            "max_grad_norm": getattr(opt, "max_grad_norm", None)}


# --------------------------------------------------------------------------
# One library's run
# --------------------------------------------------------------------------

def make_optimizer(lib: str, params, opts: argparse.Namespace) -> torch.optim.Optimizer:
    """The optimizer of --optimizer from pyoptim.optim (with the fused L1 and clip) or torch.optim."""
    module = pyoptim.optim if lib == "pyoptim" else torch.optim
    cls = getattr(module, _CLASS[opts.optimizer])
    kw: dict[str, Any] = dict(lr=opts.lr, weight_decay=opts.weight_decay)
    if opts.optimizer in ("sgd", "rmsprop"):
        kw["momentum"] = opts.momentum
    if lib == "pyoptim":
        if opts.l1:
            kw["l1_weight_decay"] = opts.l1
        if opts.clip:
            kw["max_grad_norm"] = opts.clip
    return cls(params, **kw)


def make_scheduler(opt: torch.optim.Optimizer, opts: argparse.Namespace):
    """torch's LR schedulers, stepped once an epoch: they work unchanged on pyoptim's optimizers."""
    if opts.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=opts.step_size, gamma=opts.gamma)
    if opts.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=opts.epochs)
    return None


_NO_TQDM_SAID = False


def _bar(iterable, total: int, desc: str, enabled: bool):
    """tqdm's bar over an epoch's steps where tqdm is installed and stderr is a terminal; else the bare iterable
    (the epoch's line is printed either way)."""
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:
            global _NO_TQDM_SAID
            if not _NO_TQDM_SAID:
                print("note: no progress bars (pip install tqdm for one per epoch)", flush=True)
                _NO_TQDM_SAID = True
            return iterable
        return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)
    return iterable


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over (x, y), in eval mode."""
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(y), batch):
        out = model(x[i:i + batch])
        loss += F.cross_entropy(out, y[i:i + batch], reduction="sum").item()
        correct += (out.argmax(1) == y[i:i + batch]).sum().item()
    model.train()
    return loss / max(1, len(y)), correct / max(1, len(y))


class Run:
    """One library's model and optimizer, and its training step."""

    def __init__(self, lib: str, opts: argparse.Namespace, device: torch.device) -> None:
        torch.manual_seed(opts.seed)  # the same initial weights for both libraries
        self.lib, self.opts = lib, opts
        self.model = ConvNet(pyoptim.nn if lib == "pyoptim" else torch.nn, opts.norm, opts.layer_norm).to(device)
        self.params = list(self.model.parameters())
        self.opt = make_optimizer(lib, self.params, opts)

    def step(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """Forward, backward, (torch: the clip and L1's gradient, which pyoptim fuses into its step), step."""
        loss = F.cross_entropy(self.model(xb), yb)
        self.opt.zero_grad()
        loss.backward()
        if self.lib == "torch":
            if self.opts.clip:
                torch.nn.utils.clip_grad_norm_(self.params, self.opts.clip)
            if self.opts.l1:
                for p in self.params:
                    p.grad.add_(p.detach().sign(), alpha=self.opts.l1)
        self.opt.step()
        return loss.detach()


def train(run: Run, data: dict[str, torch.Tensor], opts: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The loop with `run`'s norm layers and optimizer, early stopping on the validation split; the history and
    the test results of the best epoch's weights."""
    lib, model, opt = run.lib, run.model, run.opt
    sched = make_scheduler(opt, opts)
    xtr, ytr = data["xtr"], data["ytr"]
    n = len(ytr)
    steps_per_epoch = math.ceil(n / opts.batch_size)
    if opts.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, opts.steps_per_epoch)
    order_gen = torch.Generator().manual_seed(opts.seed)  # the same batches for both libraries
    hist: dict[str, list] = dict(train_loss=[], val_loss=[], val_acc=[], lr=[])
    best = dict(val_loss=math.inf, epoch=-1, state=None)
    bad_epochs = 0
    for epoch in range(opts.epochs):
        order = torch.randperm(n, generator=order_gen)
        total, count = 0.0, 0
        bar = _bar(range(steps_per_epoch), steps_per_epoch, f"{lib} epoch {epoch + 1}/{opts.epochs}", opts.progress)
        for i in bar:
            idx = order[i * opts.batch_size:(i + 1) * opts.batch_size]
            xb, yb = xtr[idx], ytr[idx]
            loss = run.step(xb, yb)
            total += loss.item() * len(yb)
            count += len(yb)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{total / count:.3f}")
        hist["lr"].append(opt.param_groups[0]["lr"])
        if sched is not None:
            sched.step()
        val_loss, val_acc = evaluate(model, data["xval"], data["yval"], opts.eval_batch_size)
        hist["train_loss"].append(total / count)
        hist["val_loss"].append(val_loss)
        hist["val_acc"].append(val_acc)
        better = val_loss < best["val_loss"]
        if better:
            best.update(val_loss=val_loss, epoch=epoch, state=copy.deepcopy(model.state_dict()),
                        opt_state=copy.deepcopy(opt.state_dict()) if opts.checkpoint else None)
            bad_epochs = 0
        else:
            bad_epochs += 1
        print(f"{lib:>7} epoch {epoch + 1:>2}: train loss {total / count:.4f}, val loss {val_loss:.4f}, "
              f"val acc {100 * val_acc:.1f}%, lr {hist['lr'][-1]:.3g}{'  (best)' if better else ''}", flush=True)
        if opts.patience and bad_epochs >= opts.patience:
            print(f"{lib:>7} early stop: no better validation loss for {opts.patience} epochs", flush=True)
            break
    model.load_state_dict(best["state"])  # the best checkpoint, restored
    if opts.checkpoint and lib == "pyoptim":
        torch.save(dict(model=best["state"], optimizer=best["opt_state"], epoch=best["epoch"] + 1,
                        val_loss=best["val_loss"]), opts.checkpoint)
        print(f"{lib:>7} saved the best epoch ({best['epoch'] + 1}) to {opts.checkpoint}", flush=True)
    # the restored weights' validation loss, which is the best epoch's: the check that the restore took
    restored_val_loss, _ = evaluate(model, data["xval"], data["yval"], opts.eval_batch_size)
    test_loss, test_acc = evaluate(model, data["xte"], data["yte"], opts.eval_batch_size)
    return dict(history=hist, best_epoch=best["epoch"] + 1, epochs_run=len(hist["val_loss"]), test_loss=test_loss,
                test_acc=test_acc, restored_val_loss=restored_val_loss, layers=layer_names(model),
                optimizer=describe_optimizer(opt))


def time_steps(runs: dict[str, Run], data: dict[str, torch.Tensor], opts: argparse.Namespace,
               device: torch.device) -> dict[str, dict]:
    """Median time of one training step on one batch, per library, after training: the libraries' steps taken
    in turns (pyoptim.benchmark's interleaved timing on CPU, CUDA events on GPUs), so that a busy spell of a
    shared machine falls on both alike; timed one after the other, whichever ran in the spell reads slow."""
    from pyoptim.benchmark import harness

    xb, yb = data["xtr"][:opts.batch_size], data["ytr"][:opts.batch_size]
    fns = {lib: (lambda r=r: r.step(xb, yb)) for lib, r in runs.items()}
    if device.type == "cuda":
        times = {lib: harness.time_fn(fn, device, "quick") for lib, fn in fns.items()}
    else:
        times = harness.time_cpu_interleaved(fns, warmup_s=0.2, budget_s=opts.time_budget, min_reps=5,
                                             max_reps=500)
    return {lib: dict(ms=t.ms, ms_q1=t.ms_q1, ms_q3=t.ms_q3, reps=t.reps) for lib, t in times.items()}


def write_plot(path: Path, results: dict[str, dict]) -> Optional[str]:
    """Loss (train and validation) and validation accuracy per epoch, one line per library; None, or why not."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as e:
        return f"no plot ({e}: pip install matplotlib)"
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for (lib, res), colour in zip(results.items(), ("tab:blue", "tab:orange")):
        h = res["history"]
        epochs = range(1, len(h["val_loss"]) + 1)
        ax_loss.plot(epochs, h["train_loss"], color=colour, label=f"{lib} train")
        ax_loss.plot(epochs, h["val_loss"], color=colour, linestyle="--", label=f"{lib} validation")
        ax_acc.plot(epochs, [100 * a for a in h["val_acc"]], color=colour, label=f"{lib} validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None, help="a CIFAR-10 folder in torchvision's format (default: digits)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eval-batch-size", type=int, default=512)
    p.add_argument("--steps-per-epoch", type=int, default=0, help="cap the steps of an epoch (0: the whole set)")
    p.add_argument("--train-limit", type=int, default=0, help="use only this many training images (0: all)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--momentum", type=float, default=0.9, help="SGD's and RMSprop's momentum")
    p.add_argument("--weight-decay", "--l2", type=float, default=5e-4, help="L2 regularization (AdamW: decoupled)")
    p.add_argument("--l1", type=float, default=0.0, help="L1 regularization: loss + l1 * sum(|p|)")
    p.add_argument("--clip", "--max-grad-norm", type=float, default=0.0,
                   help="clip the grads' global L2 norm to this (0: off)")
    p.add_argument("--norm", choices=("batch", "instance", "none"), default="batch", help="after each conv")
    p.add_argument("--layer-norm", action="store_true", help="LayerNorm before the head")
    p.add_argument("--schedule", "--lr-decay", choices=("none", "step", "cosine"), default="cosine",
                   help="learning-rate decay, stepped each epoch")
    p.add_argument("--step-size", type=int, default=4, help="--schedule step: epochs between decays")
    p.add_argument("--gamma", type=float, default=0.5, help="--schedule step: the decay factor")
    p.add_argument("--val-fraction", type=float, default=0.15, help="of the training set, for early stopping")
    p.add_argument("--patience", type=int, default=3, help="epochs without a better validation loss (0: never stop)")
    p.add_argument("--compare-torch", action="store_true",
                   help="also run the loop with torch.optim / torch.nn and plot both")
    p.add_argument("--plot", type=Path, default=Path("convnet_curves.png"), help="--compare-torch's PNG")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="save the best epoch's model and optimizer state_dict here (pyoptim's run)")
    p.add_argument("--json", type=Path, default=None, help="write the histories and results here")
    p.add_argument("--time-budget", type=float, default=2.0, help="seconds of timed steps per library, after training")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    opts = parser.parse_args(argv)
    cls = _CLASS[opts.optimizer]
    if not hasattr(pyoptim.optim, cls):
        parser.error(f"--optimizer {opts.optimizer}: this pyoptim ({pyoptim.__version__}) has no "
                     f"pyoptim.optim.{cls} yet; choose one of sgd, adam, adamw")
    if not 0 < opts.val_fraction < 1:
        parser.error("--val-fraction must be in (0, 1)")
    device = torch.device(opts.device)
    xtr, ytr, xte, yte, what = load_data(opts)
    if opts.train_limit:
        xtr, ytr = xtr[:opts.train_limit], ytr[:opts.train_limit]
    mean = xtr.mean(dim=(0, 2, 3), keepdim=True)
    std = xtr.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-3)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    split = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(4321))
    n_val = max(1, int(opts.val_fraction * len(ytr)))
    data = dict(xtr=xtr[split[n_val:]], ytr=ytr[split[n_val:]], xval=xtr[split[:n_val]], yval=ytr[split[:n_val]],
                xte=xte, yte=yte)
    data = {k: v.to(device) for k, v in data.items()}
    print(f"data: {what}: {len(data['ytr'])} train, {len(data['yval'])} validation, {len(yte)} test images")
    print(f"model: ConvNet, norm {opts.norm}{', LayerNorm before the head' if opts.layer_norm else ''}; "
          f"{cls}(lr={opts.lr}, weight_decay={opts.weight_decay}) + L1 {opts.l1}, clip {opts.clip or 'off'}, "
          f"schedule {opts.schedule}, patience {opts.patience}; {device}, {torch.get_num_threads()} threads")
    libs = ["pyoptim"] + (["torch"] if opts.compare_torch else [])
    runs = {lib: Run(lib, opts, device) for lib in libs}
    results = {lib: train(run, data, opts, device) for lib, run in runs.items()}
    for lib, t in time_steps(runs, data, opts, device).items():
        results[lib]["step"] = t
    if opts.compare_torch:
        why_not = write_plot(opts.plot, results)
        print(f"wrote {opts.plot}" if why_not is None else why_not)
    if opts.json:
        opts.json.write_text(json.dumps(dict(data=what, options={k: str(v) for k, v in vars(opts).items()},
                                             results=results), indent=1))
    for lib, res in results.items():
        t = res["step"]
        print(f"{lib}: test accuracy {100 * res['test_acc']:.1f}% (best epoch {res['best_epoch']} of "
              f"{res['epochs_run']}), {t['ms']:.2f} ms per training step of {opts.batch_size} images "
              f"(median of {t['reps']}{', the libraries in turns' if len(results) > 1 else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
