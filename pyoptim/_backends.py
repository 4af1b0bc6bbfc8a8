"""Which backends exist here, and which one serves a call.

This module is the one place that decides: `select(op, device, requested)`
returns a backend name, `get(op, backend)` its implementation, and
`backend_info()` shows both. Nothing here touches a GPU at import.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
import warnings
from typing import Any, Callable

import torch

log = logging.getLogger("pyoptim")

BACKENDS = ("cuda", "triton", "cpu", "reference")
# Fastest first, per device type.
_PREFERENCE = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}
# op name -> backend -> "module:function"
_IMPLS: dict[str, dict[str, str]] = {
    op: {
        "cuda": f"torch.ops.pyoptim.{op}",
        "cpu": f"torch.ops.pyoptim.{op}",
        "triton": f"pyoptim.kernels.{module}:{op.rstrip('_')}_triton",
        "reference": f"pyoptim.reference:{op.rstrip('_')}_ref",
    }
    for op, module in [
        ("adam_step_", "adam"),
        ("sgd_step_", "sgd"),
        ("lion_step_", "lion"),
        ("lamb_step_", "lamb"),
        ("lamb_moments_", "lamb"),
        ("lamb_apply_", "lamb"),
        ("adagrad_step_", "adagrad"),
        ("rmsprop_step_", "rmsprop"),
        ("multi_tensor_norm", "clip"),
        ("clip_scale_", "clip"),
        ("layer_norm_fwd", "layer_norm"),
        ("layer_norm_bwd", "layer_norm"),
        ("rms_norm_fwd", "layer_norm"),
        ("rms_norm_bwd", "layer_norm"),
        ("batch_norm_fwd", "batch_norm"),
        ("batch_norm_bwd", "batch_norm"),
        ("batch_norm_stats", "batch_norm"),
        ("batch_norm_elemt", "batch_norm"),
        ("batch_norm_backward_reduce", "batch_norm"),
        ("batch_norm_backward_elemt", "batch_norm"),
    ]
}


def _build_info() -> dict[str, Any] | None:
    """What pyoptim._C was compiled against (pyoptim/_build_info.py, written beside it by the build), or None."""
    try:
        mod = importlib.import_module("pyoptim._build_info")
    except ImportError:  # a build from before the file existed, or no build
        return None
    return {k: v for k, v in vars(mod).items() if k.isupper()}


def _release(version: str) -> tuple[int, ...]:
    """(major, minor) of a torch version: "2.14.1+cu130" -> (2, 14)."""
    return tuple(int(x) for x in version.split("+")[0].split(".")[:2])


def _load_extension() -> tuple[bool, str | None]:
    # note [torch mismatch]: the library's C++ is compiled against one torch
    # release's ATen/c10/dispatcher ABI. Under another release it may fail to
    # load with an undefined symbol, or load and crash in an op, so the build's
    # record is compared with the running torch first, and a mismatch never
    # loads it: one warning, and the triton/reference backends serve.
    built = BUILD_INFO.get("TORCH_VERSION") if BUILD_INFO else None
    if built is not None and _release(built) != _release(torch.__version__):
        return False, (f"it was built against torch {built} and this is torch {torch.__version__}, "
                       f"a release it cannot load under; reinstall pyoptim built for torch "
                       f"{'.'.join(map(str, _release(torch.__version__)))}")
    try:
        importlib.import_module("pyoptim._C")
    except (ImportError, OSError) as e:  # not built, or built against another torch
        return False, f"{type(e).__name__}: {e}"
    return True, None


BUILD_INFO = _build_info()
EXTENSION_LOADED, EXTENSION_ERROR = _load_extension()
if not EXTENSION_LOADED:
    # note [missing extension]: logged once, never raised; the reference
    # backend (and Triton on GPUs) still serve every op.
    warnings.warn(
        f"pyoptim: the compiled extension pyoptim._C is not available ({EXTENSION_ERROR}); "
        "falling back to the triton/reference backends. In a checkout, build it with "
        "`pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )


def cuda_archs() -> list[str]:
    """The GPU archs the CUDA kernels were built for, like ["sm_80", "sm_90"]."""
    if not EXTENSION_LOADED:
        return []
    return [f"sm_{a}" for a in torch.ops.pyoptim._cuda_archs()]


def cpu_capability() -> str | None:
    """The instruction set the CPU kernels use here (DEFAULT, AVX2, AVX512)."""
    return torch.ops.pyoptim._cpu_capability() if EXTENSION_LOADED else None


@functools.cache
def triton_version() -> str | None:
    """Triton's version when it is importable, else None (imports it lazily)."""
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        import triton
    except Exception:  # a broken install counts as absent
        return None
    return triton.__version__


@functools.cache
def _has_triton_impl(target: str) -> bool:
    """Triton imports here and the op has a Triton kernel module (found without importing it)."""
    if triton_version() is None:
        return False
    return importlib.util.find_spec(target.partition(":")[0]) is not None


def triton_interpret() -> bool:
    """True when Triton runs in its interpreter (TRITON_INTERPRET=1): CPU tensors are accepted."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(op: str, device_type: str) -> list[str]:
    """Backends that can run `op` on tensors of `device_type` here, fastest first."""
    # note [per-step cost]: every optimizer step asks; what is built does not
    # change within a process, so the answer is cached (per interpreter mode).
    return list(_available(op, device_type, triton_interpret()))


@functools.cache
def _available(op: str, device_type: str, interpret: bool) -> tuple[str, ...]:
    impls = _IMPLS[op]
    out = []
    for b in _PREFERENCE.get(device_type, ("reference",)):
        if b not in impls:
            continue
        if b == "cuda" and not (EXTENSION_LOADED and cuda_archs()):
            continue
        if b == "cpu" and not EXTENSION_LOADED:
            continue
        if b == "triton" and not _has_triton_impl(impls[b]):
            continue
        out.append(b)
    if device_type == "cpu" and interpret and "triton" in impls and _has_triton_impl(impls["triton"]):
        out.append("triton")  # the interpreter: for testing numerics, never the default
    return tuple(out)


def select(op: str, device: torch.device | str, requested: str | None = None) -> str:
    """The backend that serves `op` on `device`: `requested`, else $PYOPTIM_BACKEND, else the fastest here."""
    # note [per-call cost]: every norm call asks, after its input has left the
    # caches (a convolution ran in between), so the answer is one cached
    # lookup; only the environment is read afresh.
    device_type = device if device in ("cpu", "cuda") else torch.device(device).type
    choice = requested or os.environ.get("PYOPTIM_BACKEND") or None
    return _select(op, device_type, choice, triton_interpret())


@functools.cache
def _select(op: str, device_type: str, choice: str | None, interpret: bool) -> str:
    avail = _available(op, device_type, interpret)
    if choice is None:
        if not avail:
            raise RuntimeError(f"pyoptim: no backend can run {op} on {device_type} tensors")
        return avail[0]
    if choice not in BACKENDS:
        raise ValueError(f"pyoptim: unknown backend {choice!r}; expected one of {BACKENDS}")
    if choice not in avail:
        raise RuntimeError(
            f"pyoptim: backend {choice!r} cannot run {op} on {device_type} tensors here; available: {list(avail)}"
        )
    return choice


# Triton launchers imported so far, by (op, backend).
_IMPORTED: dict[tuple[str, str], Callable[..., Any]] = {}


def get(op: str, backend: str) -> Callable[..., Any]:
    """The implementation of `op` by `backend`, with the op's signature."""
    # note [traceable lookup]: torch.compile traces this function where a
    # Python backend serves an op (pyoptim.functional's _NormFunction), so
    # the dispatcher ops and the reference are attribute reads of modules it
    # can follow (no import, no functools.cache, whose wrapped body dynamo
    # traces on every call, no dict that later lookups grow and its guards
    # would then fail on); only Triton's kernel modules are imported here, once.
    target = _IMPLS[op][backend]
    if backend in ("cpu", "cuda"):
        return getattr(torch.ops.pyoptim, op)
    if backend == "reference":
        from pyoptim import reference

        return getattr(reference, target.partition(":")[2])
    impl = _IMPORTED.get((op, backend))
    if impl is None:
        module, _, fn = target.partition(":")
        impl = _IMPORTED[(op, backend)] = getattr(importlib.import_module(module), fn)
    return impl


def _triton_norm_ops() -> str | None:
    """How the Triton norms are registered (note [triton ops]), or None without Triton."""
    if triton_version() is None:
        return None
    from pyoptim.kernels import _ops  # imports Triton: asked for, never at import

    return _ops.MODE


def backend_info() -> dict[str, Any]:
    """What was built, and which backend serves each op on each device type here."""
    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        "torch": torch.__version__,
        "extension_loaded": EXTENSION_LOADED,
        "extension_error": EXTENSION_ERROR,
        "built_with": BUILD_INFO,
        "cpu_capability": cpu_capability(),
        "cuda_archs": cuda_archs(),
        "cuda_available": torch.cuda.is_available(),
        "triton": triton_version(),
        "triton_interpret": triton_interpret(),
        "env_backend": os.environ.get("PYOPTIM_BACKEND"),
        "triton_norm_ops": _triton_norm_ops(),
        "ops": {
            op: {dt: {"available": available(op, dt), "default": (available(op, dt) or [None])[0]}
                 for dt in device_types}
            for op in _IMPLS
        },
    }
