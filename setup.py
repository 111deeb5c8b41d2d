"""Build script. The package is pure Python; the CUDA extension ``adapterkern._C`` (csrc/) is optional.

The extension is built when torch is importable at build time, is a CUDA build, and nvcc is found --
or when ``ADAPTERKERN_FORCE_CUDA=1`` (then a missing toolchain is an error, not a skip).
``ADAPTERKERN_CUDA_ARCHS`` (default "80;90") lists the GPU architectures to compile for.

pip's default build isolation hides the installed torch from this script, so a plain
``pip install -e .`` installs pure Python; build the extension with
``ADAPTERKERN_FORCE_CUDA=1 pip install --no-build-isolation -e .``. Without it the CUDA backend can
still JIT-build itself at first use (see adapterkern/backends/cuda.py).
"""
import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
CSRC = HERE / "csrc"


def _load_toolchain():
    """adapterkern/cuda_toolchain.py (flags, sources, CUDA_HOME fix), loaded from its file: the package
    itself is not importable while it is being built."""
    spec = importlib.util.spec_from_file_location("_adapterkern_cuda_toolchain", HERE / "adapterkern" / "cuda_toolchain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _log(msg: str) -> None:
    print(f"adapterkern setup: {msg}", file=sys.stderr)


def _cuda_extension_kwargs() -> dict:
    force = os.environ.get("ADAPTERKERN_FORCE_CUDA", "") == "1"
    try:
        import torch
        from torch.utils import cpp_extension
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except Exception as exc:  # build isolation, or torch not installed yet
        if force:
            raise SystemExit(f"adapterkern setup: ADAPTERKERN_FORCE_CUDA=1 but torch is not importable ({exc}); "
                             "use `pip install --no-build-isolation`")
        _log(f"torch not importable at build time ({exc.__class__.__name__}); skipping the CUDA extension")
        return {}
    if not force and torch.version.cuda is None:
        _log(f"torch {torch.__version__} is a CPU build; skipping the CUDA extension")
        return {}
    toolchain = _load_toolchain()
    root = toolchain.fix_cpp_extension(cpp_extension)
    if root:
        _log(f"CUDA_HOME={root}")
    cuda_home = cpp_extension.CUDA_HOME
    nvcc = shutil.which("nvcc") or (cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")))
    if not force:
        if not nvcc:
            _log("nvcc not found; skipping the CUDA extension")
            return {}
        if not CSRC.is_dir():
            _log("csrc/ not found; skipping the CUDA extension")
            return {}
    archs = os.environ.get(toolchain.ARCHS_ENV_VAR, toolchain.DEFAULT_ARCHS)
    try:
        arch_flags = toolchain.cuda_arch_flags(archs)
    except ValueError as exc:
        raise SystemExit(f"adapterkern setup: {exc}")
    _log(f"building adapterkern._C for sm {archs}")
    sources = [str(p.relative_to(HERE)) for p in toolchain.extension_sources(CSRC)]
    ext = CUDAExtension(
        name="adapterkern._C",
        sources=sources,
        include_dirs=[str(CSRC)],
        extra_compile_args={"cxx": toolchain.CXX_FLAGS, "nvcc": toolchain.NVCC_FLAGS + arch_flags},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**_cuda_extension_kwargs())
