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
    assert set(reports) == {"as built", "no library", "other torch", "stale sources"}


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


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_sources_fingerprint(tmp_path: Path) -> None:
    """The fingerprint follows the compiled sources' names and contents, not their times or other files."""
    from pyoptim import _sources

    csrc = _tree(tmp_path / "csrc", {"ops.cpp": "a", "include/pyoptim/adam.h": "b", "cuda/x.cu": "c",
                                     "README.md": "not compiled"})
    assert _sources.source_files(str(csrc)) == sorted(["ops.cpp", os.path.join("include", "pyoptim", "adam.h"),
                                                       os.path.join("cuda", "x.cu")])
    before = _sources.fingerprint(str(csrc))
    os.utime(csrc / "ops.cpp", (1, 1))  # touched (a checkout of another branch and back): the same sources
    (csrc / "README.md").write_text("edited")
    assert _sources.fingerprint(str(csrc)) == before
    (csrc / "ops.cpp").write_text("A")
    assert _sources.fingerprint(str(csrc)) != before
    (csrc / "ops.cpp").write_text("a")
    (csrc / "cuda" / "y.cuh").write_text("")  # a new header, even empty
    assert _sources.fingerprint(str(csrc)) != before
    # the names count: the same bytes split otherwise are other sources
    a = _tree(tmp_path / "a", {"x.h": "ab", "y.h": ""})
    b = _tree(tmp_path / "b", {"x.h": "a", "y.h": "b"})
    assert _sources.fingerprint(str(a)) != _sources.fingerprint(str(b))


def test_stale_sources(tmp_path: Path) -> None:
    """note [stale library]: a checkout's library is stale when its sources differ from those it recorded
    (or, with no fingerprint recorded, are newer than it); never outside a checkout or without a library."""
    from pyoptim import _sources

    root = _tree(tmp_path, {"setup.py": "", "csrc/ops.cpp": "v1", "pyoptim/__init__.py": "", "pyoptim/_C.so": ""})
    pkg, lib = str(root / "pyoptim"), str(root / "pyoptim" / "_C.so")
    record = {"TORCH_VERSION": "2.14.1", "SOURCES_SHA256": _sources.fingerprint(str(root / "csrc"))}
    assert _backends._stale_sources(record, pkg, lib) is None
    os.utime(root / "csrc" / "ops.cpp", None)  # touched after the build, unchanged
    os.utime(lib, (1, 1))
    assert _backends._stale_sources(record, pkg, lib) is None
    (root / "csrc" / "ops.cpp").write_text("v2")
    why = _backends._stale_sources(record, pkg, lib)
    assert why is not None and "older than the sources" in why and str(root / "csrc") in why
    assert "pip install --no-build-isolation -e ." in why
    assert _backends._stale_sources(record, pkg, None) is None  # no library: the import reports that
    # a record from before the fingerprint: the library's time against the sources'
    old = {"TORCH_VERSION": "2.14.1"}
    assert _backends._stale_sources(old, pkg, lib) is not None
    os.utime(lib, None)
    os.utime(root / "csrc" / "ops.cpp", (1, 1))
    assert _backends._stale_sources(old, pkg, lib) is None
    # an installed package (no setup.py and csrc/ beside it) is never checked
    (root / "setup.py").unlink()
    assert _backends._stale_sources(record, pkg, lib) is None


@built
def test_missing_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loaded library that lacks an op this Python calls is older than the Python sources."""
    assert _backends._missing_ops() == []
    impls = dict(_backends._IMPLS, not_in_the_library_=_backends._IMPLS["adam_step_"])
    monkeypatch.setattr(_backends, "_IMPLS", impls)
    assert _backends._missing_ops() == ["not_in_the_library_"]


def test_info_shows_the_fallback() -> None:
    """`python -m pyoptim info` says whether the library loaded, and the fallback's warning when not."""
    info = pyoptim.backend_info()
    assert info["fallback_warning"] == _backends.FALLBACK_WARNING
    assert (info["fallback_warning"] is None) == info["extension_loaded"]


def _setup_py(python: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`python setup.py --version` in this checkout: setup.py's module level (where it finds torch) runs, nothing
    is built."""
    return subprocess.run([python, str(ROOT / "setup.py"), "--version"], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)


def test_setup_under_pip_isolation_takes_this_torch(tmp_path: Path) -> None:
    """`pip install .` without --no-build-isolation: pip runs setup.py with this interpreter and hides its
    site-packages (PYTHONNOUSERSITE, a sitecustomize on PYTHONPATH that drops them from sys.path); setup.py
    builds against this interpreter's torch, says so, and pins that release, rather than the newest torch an
    isolated environment would have downloaded (pyproject's build-system requires leave torch out)."""
    import torch

    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nsys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path), PYTHONNOUSERSITE="1", PYOPTIM_NO_CUDA="1")
    hidden = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert hidden.returncode != 0, "the simulated isolation did not hide torch"
    r = _setup_py(sys.executable, env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"building against torch {torch.__version__}" in r.stderr, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == pyoptim.__version__
    import tomllib

    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert not [q for q in requires if q.replace(" ", "").startswith("torch")], requires


def test_setup_without_torch_says_what_to_run(tmp_path: Path) -> None:
    """A build environment with no torch at all (python -m build's venv, uv, or no torch installed): setup.py
    stops at once and says what to run."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True, timeout=120)
    python = str(tmp_path / "venv" / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    # a venv sees none of its base interpreter's site-packages
    assert subprocess.run([python, "-c", "import torch"], capture_output=True, env=env).returncode != 0
    r = _setup_py(python, env)
    assert r.returncode != 0
    assert "pip install --no-build-isolation ." in r.stderr, r.stderr[-2000:]
    assert "cannot import torch" in r.stderr, r.stderr[-2000:]
