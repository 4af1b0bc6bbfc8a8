"""The smoke test of an installed pyoptim: what a user touches first, and the fallbacks when the library cannot load.

tools/check_wheel.sh runs it in a fresh venv outside the source tree, on the wheel it just built;
tests/test_wheel.py runs its fallback checks on the working tree's build. Each check raises
AssertionError with what it saw.

    python tools/wheel_smoke.py [--archs sm_80,sm_90] [--site DIR]

  --archs  the CUDA archs the wheel must list (`python -m pyoptim info`); "" for a CPU-only build
  --site   the directory pyoptim must be imported from (the fresh venv's site-packages)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional


def check_import(site: Optional[str]) -> Any:
    """pyoptim imports (from `site` when given) with its compiled library loaded."""
    import pyoptim

    where = Path(pyoptim.__file__).resolve()
    if site is not None:
        assert Path(site).resolve() in where.parents, f"pyoptim imported from {where}, not from {site}"
    info = pyoptim.backend_info()
    assert info["extension_loaded"], f"the compiled library did not load: {info['extension_error']}"
    print(f"import: {where.parent} (pyoptim {pyoptim.__version__}, torch {info['torch']})")
    return pyoptim


def check_info(archs: Optional[list[str]]) -> dict:
    """`python -m pyoptim info` runs and lists the archs the library was built for (`archs`, when given)."""
    out = subprocess.run([sys.executable, "-m", "pyoptim", "info", "--compact"], capture_output=True, text=True,
                         check=True).stdout
    info = json.loads(out)
    assert info["extension_loaded"], info["extension_error"]
    built = info["built_with"]
    assert built is not None, "no build information (pyoptim/_build_info.py) in the install"
    assert info["cuda_archs"] == built["CUDA_ARCHS"], (info["cuda_archs"], built["CUDA_ARCHS"])
    if archs is not None:
        assert info["cuda_archs"] == archs, f"the library lists archs {info['cuda_archs']}, expected {archs}"
    assert info["cpu_capability"] in built["CPU_ISAS"], (info["cpu_capability"], built["CPU_ISAS"])
    print(f"info: archs {info['cuda_archs'] or '(none: CPU kernels only)'}, CPU {info['cpu_capability']}, "
          f"built against torch {built['TORCH_VERSION']}")
    return info


def check_metadata() -> str:
    """The install's metadata pins the torch release the library was built against, and this torch meets it."""
    from importlib import metadata

    import torch

    from pyoptim import _backends

    reqs = [r for r in metadata.requires("pyoptim") or [] if r.split(";")[0].replace(" ", "").startswith("torch")]
    assert len(reqs) == 1, f"torch requirements in the metadata: {reqs}"
    major, minor = _backends._release(_backends.BUILD_INFO["TORCH_VERSION"])
    expected = {f">={major}.{minor}", f"<{major}.{minor + 1}"}
    spec = set(reqs[0].replace(" ", "").removeprefix("torch").split(","))
    assert spec == expected, f"metadata requires {reqs[0]!r}, expected torch{','.join(sorted(expected))}"
    assert _backends._release(torch.__version__) == (major, minor), (torch.__version__, reqs[0])
    print(f"metadata: Requires-Dist {reqs[0]}")
    return reqs[0]


def adamw_step(pyoptim) -> str:
    """One AdamW step equals torch's (params and both moments) and moves the params; the backend that served."""
    import torch

    torch.manual_seed(0)
    p0 = [torch.randn(33, 7), torch.randn(1000)]
    grads = [torch.randn_like(p) for p in p0]
    ours, theirs = [p.clone().requires_grad_() for p in p0], [p.clone().requires_grad_() for p in p0]
    for a, b, g in zip(ours, theirs, grads):
        a.grad, b.grad = g.clone(), g.clone()
    opt = pyoptim.optim.AdamW(ours, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, foreach=False)
    opt.step()
    ref.step()
    for a, b, p in zip(ours, theirs, p0):
        assert not torch.equal(a.detach(), p), "the AdamW step did not move the params"
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[a][key], ref.state[b][key], rtol=1e-5, atol=1e-6)
    return pyoptim._backends.select("adam_step_", "cpu")


def layer_norm_fwd_bwd(pyoptim) -> str:
    """One LayerNorm forward and backward equal torch's (y, dx, dw, db); the backend that served."""
    import torch

    torch.manual_seed(0)
    x = torch.randn(8, 37, requires_grad=True)
    ours, theirs = pyoptim.nn.LayerNorm(37), torch.nn.LayerNorm(37)
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(torch.linspace(0.5, 1.5, 37))
            m.bias.copy_(torch.linspace(-0.1, 0.1, 37))
    dy = torch.randn(8, 37)
    y = ours(x)
    dx, dw, db = torch.autograd.grad(y, (x, ours.weight, ours.bias), dy)
    y_ref = theirs(x)
    dx_ref, dw_ref, db_ref = torch.autograd.grad(y_ref, (x, theirs.weight, theirs.bias), dy)
    for got, want in ((y, y_ref), (dx, dx_ref), (dw, dw_ref), (db, db_ref)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    return pyoptim._backends.select("layer_norm_fwd", "cpu")


def check_benchmark() -> dict:
    """`python -m pyoptim.benchmark` runs from the install (no checkout): SGD over a tiny parameter list, its
    table of picks written, and no git SHA claimed."""
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-m", "pyoptim.benchmark", "--shapes", "1024*4", "--ops", "sgd", "--quick",
                            "--no-plot", "--no-progress", "--impls", "pyoptim-*,torch-fused", "--out", tmp],
                           capture_output=True, text=True, cwd=tmp)
        assert r.returncode == 0, f"python -m pyoptim.benchmark failed:\n{r.stdout}\n{r.stderr}"
        picks = json.loads(next(Path(tmp).glob("picks_*.json")).read_text())["picks"]
        meta = json.loads(next(Path(tmp).glob("sgd_*.json")).read_text())["meta"]
    assert len(picks) == 1 and picks[0]["op"] == "sgd" and picks[0]["ms"] > 0, picks
    assert meta["git_sha"] == "unknown", f"an installed pyoptim reported git SHA {meta['git_sha']}"
    print(f"benchmark: python -m pyoptim.benchmark ran; pick for sgd over 4 x 1024: {picks[0]['pick']}")
    return picks[0]


# --------------------------------------------------------------------------
# Fallbacks: the package copied out, its library removed or its build information changed
# --------------------------------------------------------------------------

def _child() -> None:
    """In a subprocess: import pyoptim with warnings recorded, take an AdamW step and a LayerNorm pass, report."""
    import warnings

    # An editable install's finder (setuptools' __editable___*_finder, on sys.meta_path after the path
    # finder) would serve pyoptim._C from its checkout when the copy has none: the copy must be the only
    # pyoptim this process sees.
    sys.meta_path[:] = [f for f in sys.meta_path if not str(getattr(f, "__module__", "")).startswith("__editable__")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import pyoptim

        adam_backend = adamw_step(pyoptim)
        ln_backend = layer_norm_fwd_bwd(pyoptim)
        import pyoptim.optim  # noqa: F401  (importing again must not warn again)
        # `python -m pyoptim info`, run in this process (no second interpreter): what it prints
        import contextlib
        import io

        from pyoptim.__main__ import main as info_main

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            info_main(["info", "--compact"])
        info = json.loads(buf.getvalue())
    ours = [str(w.message) for w in caught if str(w.message).startswith("pyoptim:")]
    print(json.dumps(dict(warnings=ours, loaded=pyoptim._backends.EXTENSION_LOADED,
                          library_imported="pyoptim._C" in sys.modules, file=pyoptim.__file__,
                          adam_backend=adam_backend, ln_backend=ln_backend,
                          info_loaded=info["extension_loaded"], info_warning=info["fallback_warning"],
                          info_built_with=info["built_with"])))


def copy_package(package_dir: Path, dest: Path) -> Path:
    """A copy of the installed package `package_dir` under `dest` (the Triton kernels included, wherever an
    editable install keeps them); returns the copy's directory."""
    import importlib.util

    out = dest / "pyoptim"
    shutil.copytree(package_dir, out, ignore=shutil.ignore_patterns("__pycache__"))
    if not (out / "kernels").exists():  # an editable install maps pyoptim.kernels to the checkout's kernels/
        spec = importlib.util.find_spec("pyoptim.kernels")
        if spec is not None and spec.submodule_search_locations:
            shutil.copytree(list(spec.submodule_search_locations)[0], out / "kernels",
                            ignore=shutil.ignore_patterns("__pycache__"))
    return out


def run_copy(root: Path) -> dict:
    """Run _child() with the package copy under `root` first on the path; its report."""
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONWARNINGS="default")
    env.pop("PYOPTIM_BACKEND", None)
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child"], capture_output=True, text=True,
                       env=env, cwd=root)
    assert r.returncode == 0, f"the import with the library {root} failed:\n{r.stdout}\n{r.stderr}"
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(report["file"]).resolve().parent == (root / "pyoptim").resolve(), report["file"]
    return report


FALLBACK_CASES = ("as built", "no library", "other torch", "stale sources")


def check_fallbacks(package_dir: Path) -> dict:
    """Four copies of the package: as built (the library loads, no warning), without its library, with build
    information that names another torch release, and in a checkout whose C++ sources are not the ones the
    library was built from (note [stale library]). Each of the last three warns once, never loads the
    library, and still takes an AdamW step and a LayerNorm pass on the reference backend."""
    import torch

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        for case in FALLBACK_CASES:
            root = base / case.replace(" ", "_")
            pkg = copy_package(package_dir, root)
            if case == "no library":
                for so in pkg.glob("_C*.so"):
                    so.unlink()
            elif case == "stale sources":
                # The copy inside a checkout (setup.py and csrc/ beside the package) whose sources changed.
                (root / "setup.py").write_text("# a checkout's setup.py\n")
                (root / "csrc").mkdir()
                (root / "csrc" / "ops.cpp").write_text("// edited after the library was built\n")
            elif case == "other torch":
                info = pkg / "_build_info.py"
                assert info.exists(), f"no {info}: the build did not record its torch"
                major, minor = torch.__version__.split(".")[:2]
                other = f"{major}.{int(minor) - 1 if int(minor) > 0 else int(minor) + 1}.0"
                text = info.read_text()
                info.write_text("\n".join(f"TORCH_VERSION = {other!r}" if line.startswith("TORCH_VERSION =") else line
                                          for line in text.splitlines()) + "\n")
            report = run_copy(root)
            # `python -m pyoptim info` says the same: loaded or not, and the warning
            assert report["info_loaded"] == report["loaded"], report
            assert report["info_warning"] == (report["warnings"][0] if report["warnings"] else None), report
            if case != "no library":
                assert report["info_built_with"] is not None, report
            if case == "as built":
                assert report["loaded"] and report["library_imported"] and not report["warnings"], report
                assert report["adam_backend"] == "cpu" and report["ln_backend"] == "cpu", report
            else:
                assert not report["loaded"] and not report["library_imported"], report
                assert len(report["warnings"]) == 1, f"{case}: warnings {report['warnings']}"
                assert "falling back to the triton/reference backends" in report["warnings"][0], report
                if case == "other torch":
                    assert f"built against torch {other}" in report["warnings"][0], report
                if case == "stale sources":
                    assert "older than the sources" in report["warnings"][0], report
                assert report["adam_backend"] == "reference" and report["ln_backend"] == "reference", report
            print(f"fallback, {case}: {report['warnings'][0] if report['warnings'] else 'no warning, library loaded'}")
            out[case] = report
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=None, help='the CUDA archs expected, like "sm_80,sm_90" ("": none)')
    parser.add_argument("--site", default=None, help="the directory pyoptim must be imported from")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.child:
        _child()
        return 0
    pyoptim = check_import(opts.site)
    check_info(None if opts.archs is None else [a for a in opts.archs.split(",") if a])
    check_metadata()
    print(f"AdamW step: equals torch.optim.AdamW (backend {adamw_step(pyoptim)})")
    print(f"LayerNorm forward/backward: equal torch.nn.LayerNorm (backend {layer_norm_fwd_bwd(pyoptim)})")
    check_benchmark()
    check_fallbacks(Path(pyoptim.__file__).resolve().parent)
    print("wheel smoke test: passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
