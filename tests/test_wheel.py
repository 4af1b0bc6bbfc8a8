"""The wheel: tools/check_wheel.sh (build, install into a fresh venv outside the tree, smoke test there), and
the fallbacks of note [torch mismatch] / [missing extension] on the working tree's own build.

The full check builds a wheel; after `make build` that reuses the objects under build/ and only links, about
a minute in all. PYOPTIM_SKIP_WHEEL_CHECK=1 skips it (`make check-wheel` runs it on its own)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import pyoptim
from pyoptim import _backends

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import wheel_smoke  # noqa: E402

built = pytest.mark.skipif(not _backends.EXTENSION_LOADED or _backends.BUILD_INFO is None,
                           reason="the extension is not built here (or was built before it recorded its torch)")


def test_release() -> None:
    assert _backends._release("2.14.1+cu130") == (2, 14)
    assert _backends._release("2.15.0.dev20260101") == (2, 15)


@built
def test_build_info_matches_the_library() -> None:
    """The record read before loading says what the loaded library reports."""
    info = _backends.BUILD_INFO
    assert _backends._release(info["TORCH_VERSION"]) == _backends._release(pyoptim.backend_info()["torch"])
    assert info["CUDA_ARCHS"] == _backends.cuda_archs()
    assert _backends.cpu_capability() in info["CPU_ISAS"]


@built
def test_fallbacks() -> None:
    """The package copied: as built it loads with no warning; without its library, or recording another torch
    release, it warns once, never loads the library, and serves an AdamW step and a LayerNorm pass."""
    reports = wheel_smoke.check_fallbacks(Path(pyoptim.__file__).resolve().parent)
    assert set(reports) == {"as built", "no library", "other torch"}


@built
@pytest.mark.skipif(os.environ.get("PYOPTIM_SKIP_WHEEL_CHECK") == "1", reason="PYOPTIM_SKIP_WHEEL_CHECK=1")
def test_check_wheel(tmp_path: Path) -> None:
    """tools/check_wheel.sh end to end, with this interpreter building the wheel."""
    env = dict(os.environ, PYTHON=sys.executable, TMPDIR=str(tmp_path))
    env.pop("PYTHONPATH", None)
    r = subprocess.run(["bash", str(ROOT / "tools" / "check_wheel.sh")], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=1800)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    for line in ("wheel smoke test: passed", "metadata: Requires-Dist torch", "fallback, other torch"):
        assert line in r.stdout, r.stdout[-4000:]
