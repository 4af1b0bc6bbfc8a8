"""Build pyoptim and its extension pyoptim._C.

The CPU kernels are always built. The CUDA kernels are built whenever torch is
a CUDA build and nvcc is found: a build machine without a GPU still builds
them (nothing here asks for a GPU). Environment:

  TORCH_CUDA_ARCH_LIST  archs to build for (default "8.0;9.0"; e.g.
                        "7.5;8.0;8.6;8.9;9.0;10.0+PTX" for a release wheel)
  CUDA_HOME             the CUDA toolkit (default /usr/local/cuda when present)
  PYOPTIM_NO_CUDA=1     build the CPU kernels only
  MAX_JOBS              parallel compile jobs (ninja)
  PYOPTIM_DEBUG=1       -O0 -g builds
"""

import importlib.util
import os
import platform
import subprocess
import sys

if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        # torch.utils.cpp_extension reads CUDA_HOME at import; without this it
        # guesses /usr/local and the link fails on -lcudart.
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

ROOT = os.path.dirname(os.path.abspath(__file__))

_NO_TORCH = """
pyoptim compiles its library against the torch it will run with, and this build cannot import torch.
- torch is installed, but the build runs in an isolated environment without it (python -m build, uv, or
  pip's --use-feature=venv-isolation): build in your environment instead:
      pip install setuptools wheel ninja
      pip install --no-build-isolation .        (python -m build --no-isolation; uv pip install --no-build-isolation .)
- torch is not installed: install the release you train with first (https://pytorch.org/get-started), then run
  the lines above.
"""


def _import_torch():
    """torch: the build environment's, or else the one this interpreter imports outside pip's build isolation.

    `pip install .` builds in an isolated environment holding only [build-system] requires, which leave torch
    out on purpose: from there pip would download the newest torch (GBs), compile against it, pin the wheel to
    that release and so replace the user's torch at install. The library must match the torch it runs with
    (note [torch mismatch]), so the build takes this interpreter's own torch: pip's default isolation runs the
    build with the user's interpreter and only hides its site-packages, which a subprocess without pip's
    environment (-E) still sees. Elsewhere (a separate build venv) nothing is found, and the message says
    what to run.
    """
    try:
        import torch

        return torch
    except ImportError:
        pass
    probe = subprocess.run([sys.executable, "-E", "-c",
                            "import sys; sys.path[:] = [p for p in sys.path if p]; import os, torch; "
                            "print(os.path.dirname(os.path.dirname(torch.__file__)))"],
                           capture_output=True, text=True)
    site = probe.stdout.strip().splitlines()[-1] if probe.returncode == 0 and probe.stdout.strip() else None
    if site is None or not os.path.isdir(os.path.join(site, "torch")):
        sys.exit(_NO_TORCH)
    # Appended: the isolated environment's setuptools, wheel and ninja stay first.
    sys.path.append(site)
    import torch

    print(f"pyoptim: building against torch {torch.__version__} from {site}, the torch of {sys.executable} "
          "(hidden by pip's build isolation; `pip install --no-build-isolation .` builds there directly)",
          file=sys.stderr)
    return torch


torch = _import_torch()
from setuptools import find_packages, setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402


def _load_sources_helper():
    """pyoptim/_sources.py, loaded by its path: importing the package would load the library being built."""
    spec = importlib.util.spec_from_file_location("_pyoptim_sources", os.path.join(ROOT, "pyoptim", "_sources.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_SOURCES = _load_sources_helper()
DEBUG = os.environ.get("PYOPTIM_DEBUG", "0") == "1"

# CPU kernel sources built once per instruction set, each into namespace
# pyoptim::cpu::<ISA>; csrc/cpu/*.cpp picks one at run time. The -m flags
# apply to these files alone, so the library loads on any x86-64 CPU.
ISA_SOURCES = ["csrc/cpu/adam_cpu_kernel.cpp", "csrc/cpu/sgd_cpu_kernel.cpp", "csrc/cpu/clip_cpu_kernel.cpp",
               "csrc/cpu/lion_cpu_kernel.cpp", "csrc/cpu/lamb_cpu_kernel.cpp",
               "csrc/cpu/adagrad_cpu_kernel.cpp", "csrc/cpu/rmsprop_cpu_kernel.cpp",
               "csrc/cpu/norm_cpu_kernel.cpp", "csrc/cpu/batch_norm_cpu_kernel.cpp"]
ISAS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}
if platform.machine() not in ("x86_64", "AMD64"):
    ISAS = {"DEFAULT": []}
# PYOPTIM_CPU_ISAS=DEFAULT,AVX512 builds a subset (a quicker build; the run
# time choice then ranges over what was built). DEFAULT is always built.
if os.environ.get("PYOPTIM_CPU_ISAS"):
    _wanted = {"DEFAULT"} | {s.strip().upper() for s in os.environ["PYOPTIM_CPU_ISAS"].split(",")}
    ISAS = {k: v for k, v in ISAS.items() if k in _wanted}


def _with_cuda() -> bool:
    if os.environ.get("PYOPTIM_NO_CUDA", "0") == "1":
        return False
    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        return False
    return os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))


def _cuda_archs() -> list[int]:
    """TORCH_CUDA_ARCH_LIST as integers: "8.0;9.0+PTX" -> [80, 90]."""
    archs = []
    for item in os.environ["TORCH_CUDA_ARCH_LIST"].replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip().split("+")[0]
        if item:
            major, minor = item.split(".")
            archs.append(int(major) * 10 + int(minor.rstrip("af")))
    return archs


def _torch_release() -> tuple[int, int]:
    """(major, minor) of the torch this builds against: "2.14.1+cu130" -> (2, 14)."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


if _torch_release() < (2, 11):
    sys.exit(f"pyoptim builds against torch 2.11 or newer; this build imports torch {torch.__version__} "
             f"from {os.path.dirname(torch.__file__)}")


def _torch_requirement() -> str:
    """The torch releases pyoptim._C works with: the one it is compiled against. Its C++ uses ATen, c10 and
    the dispatcher, whose ABI holds within a release (2.14.0 to 2.14.x), not across releases; an import under
    another torch falls back to the triton/reference backends (note [torch mismatch] in pyoptim/_backends.py)."""
    major, minor = _torch_release()
    return f"torch>={major}.{minor},<{major}.{minor + 1}"


def _build_info_text(with_cuda: bool) -> str:
    """pyoptim/_build_info.py: what pyoptim._C was compiled against, read before the library is loaded."""
    fields = dict(TORCH_VERSION=torch.__version__, TORCH_RELEASE=list(_torch_release()),
                  TORCH_CUDA=torch.version.cuda if with_cuda else None,
                  CUDA_ARCHS=[f"sm_{a}" for a in _cuda_archs()] if with_cuda else [],
                  CPU_ISAS=list(ISAS), PYTHON=f"{sys.version_info.major}.{sys.version_info.minor}",
                  # what a checkout's import compares with its csrc/ (note [stale library])
                  SOURCES_SHA256=_SOURCES.fingerprint(os.path.join(ROOT, "csrc")))
    body = "".join(f"{k} = {v!r}\n" for k, v in fields.items())
    return ('"""What pyoptim._C was compiled against (written by setup.py\'s build_ext beside the library; read by\n'
            'pyoptim._backends before it loads the library: note [torch mismatch])."""\n\n' + body)


class BuildExt(cpp_extension.BuildExtension):
    """BuildExtension, plus the per-instruction-set CPU kernel objects and pyoptim/_build_info.py beside the library."""

    def finalize_options(self):
        super().finalize_options()
        # pip's editable install (`make build`) hands build_ext a fresh temporary
        # directory each time, so every source recompiled on every `make`. The
        # objects and ninja's logs live under build/ instead: ninja recompiles
        # what changed (sources, headers through its depfiles, or flags).
        tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__.split('+')[0]}"
        self.build_temp = os.path.join(ROOT, "build", f"temp-{platform.machine()}-{tag}")

    def build_extension(self, ext):
        isa_dir = os.path.join(os.path.abspath(self.build_temp), "isa")
        os.makedirs(isa_dir, exist_ok=True)
        cxx_flags = ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict) else list(ext.extra_compile_args)
        # One compile per instruction set, its sources built in parallel by ninja.
        for isa, mflags in ISAS.items():
            wrappers = []
            for src in ISA_SOURCES:
                stem = os.path.splitext(os.path.basename(src))[0]
                wrapper = os.path.join(isa_dir, f"{stem}_{isa.lower()}.cpp")
                text = f'#define CPU_CAPABILITY {isa}\n#define CPU_CAPABILITY_{isa} 1\n#include "{os.path.join(ROOT, src)}"\n'
                if not os.path.exists(wrapper) or open(wrapper).read() != text:
                    with open(wrapper, "w") as f:
                        f.write(text)
                wrappers.append(wrapper)
            objects = self.compiler.compile(
                wrappers,
                output_dir=os.path.join(isa_dir, isa.lower()),
                include_dirs=ext.include_dirs,
                extra_postargs={"cxx": cxx_flags + mflags, "nvcc": []},
                depends=ext.depends,
            )
            ext.extra_objects = list(ext.extra_objects or []) + objects
        # The library is relinked when the build information changed (another
        # torch, other archs) even if no source did: setuptools compares only
        # the sources' times with the library's.
        info_path = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), "_build_info.py")
        info = _build_info_text(_with_cuda())
        old = open(info_path).read() if os.path.exists(info_path) else None
        if old != info:
            self.force = True
        super().build_extension(ext)
        if old != info:
            with open(info_path, "w") as f:
                f.write(info)

    def copy_extensions_to_source(self):
        # --inplace and editable installs (`make build`) copy the library from
        # build/lib into the source tree; its build information goes with it.
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            info = os.path.join(os.path.dirname(regular_file), "_build_info.py")
            if os.path.exists(info):
                self.copy_file(info, os.path.join(os.path.dirname(inplace_file), "_build_info.py"), level=self.verbose)


def _extension():
    with_cuda = _with_cuda()
    opt = ["-O0", "-g"] if DEBUG else ["-O3"]
    defines = ["-DPYOPTIM_WITH_CUDA"] if with_cuda else []
    # Build information for ops.cpp only (nvcc would split the commas).
    arch_list = ",".join(map(str, _cuda_archs())) if with_cuda else ""
    # -fopenmp: at::parallel_for is inline, and runs its body on one thread
    # unless the calling code is compiled with OpenMP (as torch's CPU build is).
    # -ffp-contract=off (and --fmad=false below): no multiply-add fused behind
    # the code's back. GCC contracts a*b - c into one fma by default where the
    # ISA has one, which turns an exact cancellation (LayerNorm's dx over a
    # row of one element: d*w - mean(d*w) == 0) into the rounding error of a*b
    # scaled by rstd, and makes each ISA's build round differently. Where a
    # kernel wants an fma it writes one. The kernels are memory-bound: the
    # extra instructions cost nothing measurable.
    cxx = opt + defines + [f"-DPYOPTIM_HAVE_{isa}=1" for isa in ISAS] + ["-fopenmp", f"-DPYOPTIM_CUDA_ARCH_LIST={arch_list}", "-fno-math-errno",
                           "-ffp-contract=off", "-Wall", "-Wno-unused-function", "-Wno-maybe-uninitialized"]
    sources = ["csrc/ops.cpp", "csrc/multi_tensor_host.cpp", "csrc/optim_host.cpp", "csrc/cpu/cpu_isa.cpp",
               "csrc/cpu/adam_cpu.cpp", "csrc/cpu/sgd_cpu.cpp", "csrc/cpu/clip_cpu.cpp",
               "csrc/norm_host.cpp", "csrc/norm_dispatch.cpp", "csrc/cpu/norm_cpu.cpp", "csrc/batch_norm_host.cpp", "csrc/cpu/batch_norm_cpu.cpp",
               "csrc/cpu/fresh_output.cpp", "csrc/cpu/lion_cpu.cpp", "csrc/cpu/lamb_cpu.cpp", "csrc/cpu/adagrad_cpu.cpp",
               "csrc/cpu/rmsprop_cpu.cpp", "csrc/step_plan.cpp"]
    kwargs = dict(
        name="pyoptim._C",
        include_dirs=[os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")],
        depends=[os.path.join(ROOT, "csrc", d, f)
                 for d in ("include/pyoptim", "", "cpu", "cuda")
                 for f in os.listdir(os.path.join(ROOT, "csrc", d)) if f.endswith((".h", ".cuh"))],
        py_limited_api=False,
        extra_link_args=["-fopenmp"],
    )
    if not with_cuda:
        print("pyoptim: building the CPU kernels only (no CUDA torch or no nvcc)", file=sys.stderr)
        return cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)
    # No --use_fast_math: its approximate sqrt and division would part the GPU's
    # results from the CPU path's and from torch's.
    # --fmad=false: the GPU rounds as the CPU path that tests its math does.
    nvcc = opt + defines + ["-lineinfo", "--expt-relaxed-constexpr", "--fmad=false"]
    if os.environ.get("PYOPTIM_PTXAS_VERBOSE") == "1":
        nvcc.append("-Xptxas=-v")
    print(f"pyoptim: building CPU and CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}", file=sys.stderr)
    return cpp_extension.CUDAExtension(
        sources=sources + ["csrc/cuda/adam_cuda.cu", "csrc/cuda/sgd_cuda.cu", "csrc/cuda/clip_cuda.cu", "csrc/cuda/norm_cuda.cu",
                           "csrc/cuda/batch_norm_cuda.cu", "csrc/cuda/lion_cuda.cu", "csrc/cuda/lamb_cuda.cu",
                           "csrc/cuda/adagrad_cuda.cu", "csrc/cuda/rmsprop_cuda.cu"],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        **kwargs,
    )


setup(
    # pyproject.toml declares dependencies dynamic: the torch release the library is built against.
    install_requires=[_torch_requirement()],
    # kernels/ (the Triton kernels) ships inside the package as pyoptim.kernels.
    packages=find_packages(include=["pyoptim", "pyoptim.*"]) + ["pyoptim.kernels"],
    package_dir={"pyoptim.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
)
