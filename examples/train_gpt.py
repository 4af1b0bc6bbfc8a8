"""A small GPT, trained with pyoptim: character-level, pre-norm blocks, AdamW with the fused clip, warmup and
cosine decay, bf16 autocast.

    python examples/train_gpt.py                      # on the installed torch's Python sources (always there)
    python examples/train_gpt.py --text book.txt --steps 2000 --d-model 256 --n-layer 6
    python examples/train_gpt.py --norm rms --compare-torch

The model: token and position embeddings, --n-layer blocks of x + attn(norm(x)) and x + mlp(norm(x)) with
pyoptim.nn.LayerNorm or RMSNorm (--norm), a final norm and a head tied to the token embedding. The optimizer:
pyoptim.optim.AdamW(max_grad_norm=...), whose step clips the grads' global norm itself (no separate
clip_grad_norm_ pass, grads untouched), weight decay on the matrices only, the learning rate warmed up
linearly for --warmup steps then decayed on a cosine to --min-lr-frac of its peak (torch's LambdaLR).
Under --autocast bf16 (the default on GPUs) the matmuls run in bfloat16 and the norms take bf16 input with
fp32 weights; --param-dtype bf16 stores the params themselves in bf16, and --master-weights (pyoptim's
precision policy: fp32, remainder, stochastic) keeps what the optimizer needs to update them exactly;
--state-dtype bf16 stores AdamW's moments in bf16.

It prints the loss, tokens/s, and at the end the time of the optimizer step alone on this model's
parameters and grads, pyoptim's against torch.optim.AdamW(fused=True) after torch.nn.utils.clip_grad_norm_
(timed in turns, the method of pyoptim.benchmark). --compare-torch also trains the same model with
torch.nn's norms and torch's fused AdamW, for the loss and tokens/s side by side.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

import pyoptim

# --------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------


def torch_sources(max_chars: int) -> tuple[str, str]:
    """The installed torch package's Python sources, concatenated in a fixed order, up to max_chars."""
    root = Path(torch.__file__).resolve().parent
    parts, n = [], 0
    for path in sorted(root.rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(text)
        n += len(text)
        if n >= max_chars:
            break
    return "".join(parts)[:max_chars], f"torch's Python sources under {root}"


def load_text(opts: argparse.Namespace) -> tuple[str, str]:
    if opts.text:
        return Path(opts.text).read_text(encoding="utf-8", errors="replace")[:opts.max_chars], opts.text
    return torch_sources(opts.max_chars)


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------

class Block(torch.nn.Module):
    """Pre-norm: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, d: int, n_head: int, norm) -> None:
        super().__init__()
        self.n_head = n_head
        self.norm1, self.norm2 = norm(d), norm(d)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.proj = torch.nn.Linear(d, d)
        self.fc = torch.nn.Linear(d, 4 * d)
        self.fc_out = torch.nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.n_head, d // self.n_head).transpose(1, 3).unbind(2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, heads, t, d / heads)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc_out(F.gelu(self.fc(self.norm2(x))))


class GPT(torch.nn.Module):
    """Embeddings, blocks, a final norm, a head tied to the token embedding; `norm` builds each norm layer."""

    def __init__(self, vocab: int, block_size: int, d: int, n_layer: int, n_head: int, norm) -> None:
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Embedding(block_size, d)
        self.blocks = torch.nn.ModuleList(Block(d, n_head, norm) for _ in range(n_layer))
        self.norm = norm(d)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.02 / (math.sqrt(2 * n_layer) if name.endswith(("proj.weight",
                                                                                                "fc_out.weight"))
                                                     else 1.0))
            elif name.endswith(".bias"):
                torch.nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.tok.weight.t()


def norm_layer(lib: str, kind: str):
    nn = pyoptim.nn if lib == "pyoptim" else torch.nn
    return (lambda d: nn.LayerNorm(d)) if kind == "layer" else (lambda d: nn.RMSNorm(d, eps=1e-5))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the matrices (embeddings, linear weights); none on biases and norm weights."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    return [dict(params=decay, weight_decay=weight_decay), dict(params=other, weight_decay=0.0)]


def precision_kwargs(opts: argparse.Namespace) -> dict[str, Any]:
    """pyoptim's precision policy keywords from --master-weights, where this pyoptim has it."""
    kw: dict[str, Any] = {}
    if opts.master_weights:
        kw["master_weights"] = opts.master_weights
    if opts.state_dtype:
        kw["state_dtype"] = {"fp32": torch.float32, "bf16": torch.bfloat16}[opts.state_dtype]
    return kw


def make_optimizer(lib: str, model: torch.nn.Module, opts: argparse.Namespace) -> torch.optim.Optimizer:
    groups = param_groups(model, opts.weight_decay)
    if lib == "pyoptim":
        return pyoptim.optim.AdamW(groups, lr=opts.lr, betas=(0.9, 0.95), max_grad_norm=opts.max_grad_norm,
                                   **precision_kwargs(opts))
    return torch.optim.AdamW(groups, lr=opts.lr, betas=(0.9, 0.95), fused=True)


def lr_lambda(opts: argparse.Namespace):
    """Linear warmup to the peak over --warmup steps, then a cosine down to --min-lr-frac of it at --steps."""
    def f(step: int) -> float:
        if step < opts.warmup:
            return (step + 1) / opts.warmup
        progress = min(1.0, (step - opts.warmup) / max(1, opts.steps - opts.warmup))
        return opts.min_lr_frac + (1 - opts.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------

class Run:
    """One library's model, optimizer and schedule, and its training step."""

    def __init__(self, lib: str, vocab: int, opts: argparse.Namespace, device: torch.device) -> None:
        torch.manual_seed(opts.seed)  # the same initial weights for both libraries
        self.lib, self.opts, self.device = lib, opts, device
        self.model = GPT(vocab, opts.block_size, opts.d_model, opts.n_layer, opts.n_head,
                         norm_layer(lib, opts.norm)).to(device)
        if opts.param_dtype == "bf16":
            self.model.to(torch.bfloat16)
        self.params = list(self.model.parameters())
        self.opt = make_optimizer(lib, self.model, opts)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(opts))
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if opts.autocast == "bf16"
                         else torch.autocast(device.type, enabled=False))

    def backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            logits = self.model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        self.opt.zero_grad()
        loss.backward()
        return loss.detach()

    def optimizer_step(self) -> None:
        """The step: pyoptim's clips inside itself; torch's takes clip_grad_norm_ first."""
        if self.lib == "torch":
            torch.nn.utils.clip_grad_norm_(self.params, self.opts.max_grad_norm)
        self.opt.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train(run: Run, data: torch.Tensor, opts: argparse.Namespace) -> dict[str, Any]:
    """--steps steps on random windows of `data`; the losses, tokens/s and the in-loop step times."""
    g = torch.Generator().manual_seed(opts.seed)  # the same batches for both libraries
    losses, step_s, opt_s = [], [], []
    tokens = opts.batch_size * opts.block_size
    for step in range(opts.steps):
        starts = torch.randint(0, len(data) - opts.block_size - 1, (opts.batch_size,), generator=g)
        window = torch.stack([data[s:s + opts.block_size + 1] for s in starts.tolist()]).to(run.device)
        x, y = window[:, :-1], window[:, 1:]
        _sync(run.device)
        t0 = time.perf_counter()
        loss = run.backward(x, y)
        _sync(run.device)
        t1 = time.perf_counter()
        run.optimizer_step()
        _sync(run.device)
        t2 = time.perf_counter()
        run.sched.step()
        losses.append(loss.item())
        step_s.append(t2 - t0)
        opt_s.append(t2 - t1)
        if step % opts.log_every == 0 or step == opts.steps - 1:
            recent = step_s[-opts.log_every:]
            print(f"{run.lib:>7} step {step:>5}: loss {losses[-1]:.4f}, lr {run.sched.get_last_lr()[0]:.2e}, "
                  f"{tokens * len(recent) / sum(recent):,.0f} tokens/s", flush=True)
    warm = slice(min(5, len(step_s) - 1), None)  # the first steps allocate state and warm the caches
    return dict(losses=losses, tokens_per_s=tokens * len(step_s[warm]) / sum(step_s[warm]),
                optimizer_ms_in_loop=1e3 * sorted(opt_s[warm])[len(opt_s[warm]) // 2])


def time_optimizer_steps(run: Run, opts: argparse.Namespace) -> dict[str, dict]:
    """The optimizer step alone on copies of `run`'s params with its last grads: pyoptim's AdamW (fused clip)
    against torch's fused AdamW after clip_grad_norm_, timed in turns (pyoptim.benchmark's method)."""
    from pyoptim.benchmark import harness

    fns = {}
    for lib in ("pyoptim", "torch"):
        params = [p.detach().clone().requires_grad_() for p in run.params]
        for p, src in zip(params, run.params):
            p.grad = src.grad.detach().clone()
        groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=opts.weight_decay),
                  dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
        if lib == "pyoptim":
            opt = pyoptim.optim.AdamW(groups, lr=opts.lr, max_grad_norm=opts.max_grad_norm, **precision_kwargs(opts))
            fns[lib] = opt.step
        else:
            opt = torch.optim.AdamW(groups, lr=opts.lr, fused=True)

            def step(opt=opt, params=params):
                torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm)
                opt.step()
            fns[lib] = step
    if run.device.type == "cuda":
        times = {lib: harness.time_fn(fn, run.device, "quick") for lib, fn in fns.items()}
    else:
        times = harness.time_cpu_interleaved(fns, **harness.CPU_TIMING["quick"])
    return {lib: dict(ms=t.ms, ms_q1=t.ms_q1, ms_q3=t.ms_q3, reps=t.reps) for lib, t in times.items()}


def state_dtypes(run: Run) -> dict[str, str]:
    """The first param's dtype and its optimizer state's tensors' dtypes (what the precision flags chose)."""
    p = run.params[0]
    out = {"param": str(p.dtype)}
    out.update({k: str(v.dtype) for k, v in run.opt.state[p].items() if torch.is_tensor(v) and v.dim() > 0})
    return out


@torch.no_grad()
def sample(run: Run, itos: list[str], n: int) -> str:
    """n characters drawn from the trained model, from a newline."""
    run.model.eval()
    idx = torch.tensor([[itos.index("\n") if "\n" in itos else 0]], device=run.device)
    g = torch.Generator(device=run.device).manual_seed(0)
    for _ in range(n):
        with run.autocast:
            logits = run.model(idx[:, -run.opts.block_size:])[:, -1].float()
        idx = torch.cat([idx, torch.multinomial(F.softmax(logits, -1), 1, generator=g)], 1)
    run.model.train()
    return "".join(itos[i] for i in idx[0, 1:].tolist())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--text", default=None, help="a text file (default: the installed torch's Python sources)")
    p.add_argument("--max-chars", type=int, default=2_000_000, help="read at most this much text")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=64, help="context length")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=3)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--norm", choices=("layer", "rms"), default="layer", help="pyoptim.nn.LayerNorm or RMSNorm")
    p.add_argument("--lr", type=float, default=3e-3, help="the peak learning rate")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--min-lr-frac", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--autocast", choices=("bf16", "none"), default="bf16" if torch.cuda.is_available() else "none",
                   help="bf16 autocast of the forward (default: on GPUs)")
    p.add_argument("--param-dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--master-weights", choices=("fp32", "remainder", "stochastic"), default=None,
                   help="pyoptim's precision policy for bf16 params (needs a pyoptim that has it)")
    p.add_argument("--state-dtype", choices=("fp32", "bf16"), default=None,
                   help="the dtype of AdamW's moments (pyoptim's state_dtype; default: the policy's)")
    p.add_argument("--compare-torch", action="store_true", help="also train with torch.nn and torch's fused AdamW")
    p.add_argument("--sample", type=int, default=200, help="characters to sample at the end (0: none)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--json", type=Path, default=None, help="write the losses and timings here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    opts = parser.parse_args(argv)
    if opts.state_dtype and "state_dtype" not in inspect.signature(pyoptim.optim.AdamW).parameters:
        parser.error(f"--state-dtype: this pyoptim ({pyoptim.__version__}) has no precision policy yet "
                     "(pyoptim.optim.AdamW takes no state_dtype)")
    if opts.master_weights:
        if "master_weights" not in inspect.signature(pyoptim.optim.AdamW).parameters:
            parser.error(f"--master-weights: this pyoptim ({pyoptim.__version__}) has no precision policy yet "
                         "(pyoptim.optim.AdamW takes no master_weights)")
        if opts.param_dtype != "bf16":
            parser.error("--master-weights keeps fp32 precision for bf16 params: give --param-dtype bf16")
    if opts.d_model % opts.n_head:
        parser.error("--d-model must be a multiple of --n-head")
    device = torch.device(opts.device)
    text, what = load_text(opts)
    itos = sorted(set(text))
    stoi = {c: i for i, c in enumerate(itos)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    if len(data) <= opts.block_size + 1:
        parser.error(f"the text has {len(data)} characters: fewer than --block-size + 2")
    print(f"text: {what}: {len(text):,} characters, vocabulary {len(itos)}")
    libs = ["pyoptim"] + (["torch"] if opts.compare_torch else [])
    runs = {lib: Run(lib, len(itos), opts, device) for lib in libs}
    n_params = sum(p.numel() for p in runs["pyoptim"].params)
    print(f"model: {opts.n_layer} blocks, d_model {opts.d_model}, {opts.n_head} heads, {opts.norm} norm, "
          f"{n_params:,} params in {len(runs['pyoptim'].params)} tensors ({opts.param_dtype}); "
          f"AdamW(lr={opts.lr}, weight_decay={opts.weight_decay}, max_grad_norm={opts.max_grad_norm})"
          f"{', master weights ' + opts.master_weights if opts.master_weights else ''}"
          f"{', state ' + opts.state_dtype if opts.state_dtype else ''}, "
          f"autocast {opts.autocast}; {device}, {torch.get_num_threads()} threads")
    results = {lib: train(run, data, opts) for lib, run in runs.items()}
    steps = time_optimizer_steps(runs["pyoptim"], opts)
    for lib, res in results.items():
        print(f"{lib}: loss {res['losses'][0]:.3f} -> {res['losses'][-1]:.3f} in {opts.steps} steps, "
              f"{res['tokens_per_s']:,.0f} tokens/s, optimizer step {res['optimizer_ms_in_loop']:.3f} ms in the loop")
    ours, theirs = steps["pyoptim"]["ms"], steps["torch"]["ms"]
    print(f"optimizer step alone ({n_params:,} params, clip to {opts.max_grad_norm}, timed in turns): "
          f"pyoptim AdamW {ours:.3f} ms, torch fused AdamW + clip_grad_norm_ {theirs:.3f} ms ({theirs / ours:.2f}x)")
    if opts.sample:
        print("sample:\n" + sample(runs["pyoptim"], itos, opts.sample))
    if opts.json:
        opts.json.write_text(json.dumps(dict(text=what, options=vars(opts), results=results, optimizer_step=steps,
                                             optimizer_state=state_dtypes(runs["pyoptim"])), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
