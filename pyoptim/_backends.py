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
import sys
import warnings
from typing import Any, Callable

import torch

from pyoptim import _sources

log = logging.getLogger("pyoptim")

BACKENDS = ("cuda", "triton", "cpu", "reference")
# Fastest first, per device type.
_PREFERENCE = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}
# op name -> backend -> "module:function"
# The ops over lists of tensors, the optimizers' steps and the clip's (their Triton launchers become dispatcher
# ops under torch.compile: note [triton step ops]), and the norms' ops (Triton ops of their own: note [triton
# ops]); each with its kernel module under pyoptim/kernels.
_LIST_OPS = [
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
]
LIST_OPS = tuple(op for op, _ in _LIST_OPS)
_IMPLS: dict[str, dict[str, str]] = {
    op: {
        "cuda": f"torch.ops.pyoptim.{op}",
        "cpu": f"torch.ops.pyoptim.{op}",
        "triton": f"pyoptim.kernels.{module}:{op.rstrip('_')}_triton",
        "reference": f"pyoptim.reference:{op.rstrip('_')}_ref",
    }
    for op, module in _LIST_OPS + [
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


def _stale_sources(record: dict[str, Any] | None, package_dir: str, library: str | None) -> str | None:
    """Why the library file `library` of the package in `package_dir`, built as `record` says, is older than
    the checkout's sources (note [stale library]); None when it is not, or when this is no checkout."""
    # note [stale library]: in a checkout (an in-place or editable build), a
    # `git pull` or an edit under csrc/ without a rebuild leaves a library
    # compiled from other sources than the Python beside it calls: an op that
    # takes other arguments fails mid-step, one whose arguments mean something
    # else silently computes the wrong thing. The build records a fingerprint
    # of the compiled sources (pyoptim/_sources.py); a checkout whose sources
    # differ from it never loads the library: one warning, and the
    # triton/reference backends serve, as under another torch. The contents
    # are compared, not the files' times: a checkout of another branch and
    # back touches files without changing them. An installed wheel carries no
    # sources (its library came with its Python) and is not checked here.
    csrc = _sources.checkout_csrc(package_dir)
    if csrc is None or record is None or library is None or not os.path.exists(library):
        return None  # no checkout, or no library (the import says so)
    files = _sources.source_files(csrc)
    built = record.get("SOURCES_SHA256")
    if built is None:  # a build from before the record had the fingerprint: the times are all there is
        stale = _sources.newest_mtime(csrc, files) > os.stat(library).st_mtime
    else:
        stale = _sources.fingerprint(csrc, files) != built
    if not stale:
        return None
    return (f"it is older than the sources: {csrc} changed after it was built, and its ops may not match "
            f"what this Python calls; rebuild it with `pip install --no-build-isolation -e .` (or `make build`)")


def _missing_ops() -> list[str]:
    """The ops this Python calls that the loaded library lacks (a library older than the Python sources)."""
    missing = []
    for op in list(_IMPLS) + ["_cuda_archs", "_cpu_capability"]:
        try:
            getattr(torch.ops.pyoptim, op)
        except (AttributeError, RuntimeError):
            missing.append(op)
    if not hasattr(sys.modules.get("pyoptim._C"), "StepPlan"):
        missing.append("StepPlan")
    return missing


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
    spec = importlib.util.find_spec("pyoptim._C")
    stale = _stale_sources(BUILD_INFO, os.path.dirname(os.path.abspath(__file__)), spec.origin if spec else None)
    if stale is not None:
        return False, stale
    try:
        importlib.import_module("pyoptim._C")
    except (ImportError, OSError) as e:  # not built, or built against another torch
        return False, f"{type(e).__name__}: {e}"
    missing = _missing_ops()
    if missing:
        # Loaded, but older than the Python sources: its ops stay registered and
        # unused (nothing selects the cpu/cuda backends while it counts as not loaded).
        return False, (f"it is older than the Python sources: it lacks {', '.join(missing)}; rebuild or "
                       f"reinstall pyoptim")
    return True, None


BUILD_INFO = _build_info()
EXTENSION_LOADED, EXTENSION_ERROR = _load_extension()
# The fallback's one warning (None when the library loaded), shown again by `python -m pyoptim info`.
FALLBACK_WARNING: str | None = None
if not EXTENSION_LOADED:
    # note [missing extension]: logged once, never raised; the reference
    # backend (and Triton on GPUs) still serve every op.
    FALLBACK_WARNING = (
        f"pyoptim: the compiled extension pyoptim._C is not available ({EXTENSION_ERROR}); "
        "falling back to the triton/reference backends. In a checkout, build it with "
        "`pip install --no-build-isolation -e .`."
    )
    warnings.warn(FALLBACK_WARNING, RuntimeWarning, stacklevel=2)


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
        "fallback_warning": FALLBACK_WARNING,
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
