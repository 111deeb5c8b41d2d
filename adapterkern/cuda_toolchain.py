"""How the CUDA extension (csrc/) is built: the one home of its nvcc flags, target architectures and
sources, and of the CUDA toolkit root the build needs. No torch import: setup.py loads this file by
path (the package is not importable while it is being built), .ci/check_cuda.sh runs it for the flags
(``python adapterkern/cuda_toolchain.py --nvcc-flags``), and the JIT build of
:mod:`adapterkern.backends.cuda` imports it.

The toolkit root: torch.utils.cpp_extension guesses CUDA_HOME from the nvcc on PATH as
``dirname(dirname(nvcc))``. Where ``nvcc`` is a wrapper script (``/usr/local/bin/nvcc`` running
``/usr/local/cuda-13.0/bin/nvcc``) that guess is ``/usr/local``, which has no ``cuda_runtime.h``, and
the build fails on the first host file that includes torch's CUDA headers. ``toolkit_root`` asks nvcc
itself where its toolkit is.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

NVCC_FLAGS = ["-O3", "-lineinfo"]  # never --use_fast_math: the kernels promise IEEE maths
CXX_FLAGS = ["-O3"]
ARCHS_ENV_VAR = "ADAPTERKERN_CUDA_ARCHS"
DEFAULT_ARCHS = "80;90"


def cuda_arch_flags(archs: Optional[str] = None) -> List[str]:
    """nvcc -gencode flags for ``archs`` ("80;90"; default ``$ADAPTERKERN_CUDA_ARCHS`` or "80;90"):
    SASS for each, plus PTX of the newest so later GPUs can JIT it."""
    archs = archs if archs is not None else os.environ.get(ARCHS_ENV_VAR, DEFAULT_ARCHS)
    items = [a.strip().replace(".", "") for a in archs.replace(",", ";").split(";") if a.strip()]
    if not items:
        raise ValueError(f"{ARCHS_ENV_VAR}: expected architectures such as '80;90', got {archs!r}")
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in items]
    flags.append(f"-gencode=arch=compute_{items[-1]},code=compute_{items[-1]}")
    return flags


def extension_sources(csrc: Path) -> List[Path]:
    """The translation units of the extension under ``csrc``: every ``*.cu`` and the bindings."""
    return sorted(csrc.glob("*.cu")) + [csrc / "bindings.cpp"]


def has_cuda_headers(root: Optional[str]) -> bool:
    return bool(root) and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))


def _nvcc_top(nvcc: str) -> Optional[str]:
    """The toolkit root nvcc reports in a dry run (``#$ TOP=...``), or None."""
    try:
        out = subprocess.run([nvcc, "-dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match else None


def toolkit_root(guess: Optional[str] = None) -> Optional[str]:
    """A CUDA toolkit root with ``include/cuda_runtime.h``: ``$CUDA_HOME``/``$CUDA_PATH`` or ``guess`` if
    they have the headers, else the root the nvcc on PATH reports, else ``/usr/local/cuda``, else the
    newest ``/usr/local/cuda-*``. None when none of them has the headers."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), guess]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(_nvcc_top(nvcc))
    candidates.append("/usr/local/cuda")
    candidates.extend(sorted(glob.glob("/usr/local/cuda-*"), reverse=True))
    return next((c for c in candidates if has_cuda_headers(c)), None)


def fix_cpp_extension(cpp_extension) -> Optional[str]:
    """Give ``torch.utils.cpp_extension`` (the module, already imported) a CUDA_HOME with headers where
    its own guess has none: its module global, which its include paths and nvcc path read, and the
    environment. Returns the root it set, or None when it changed nothing."""
    if has_cuda_headers(cpp_extension.CUDA_HOME):
        return None
    root = toolkit_root(cpp_extension.CUDA_HOME)
    if root:
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"] = root
    return root


if __name__ == "__main__":
    if sys.argv[1:] != ["--nvcc-flags"]:
        raise SystemExit("usage: python adapterkern/cuda_toolchain.py --nvcc-flags")
    print(" ".join(NVCC_FLAGS))
