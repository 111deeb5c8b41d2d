"""Find the CUDA toolkit root that the extension build needs (no torch import; setup.py loads this file).

torch.utils.cpp_extension guesses CUDA_HOME from the nvcc on PATH as ``dirname(dirname(nvcc))``. Where
``nvcc`` is a wrapper script (``/usr/local/bin/nvcc`` running ``/usr/local/cuda-13.0/bin/nvcc``) that
guess is ``/usr/local``, which has no ``cuda_runtime.h``, and the build fails on the first host file that
includes torch's CUDA headers. ``toolkit_root`` asks nvcc itself where its toolkit is.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from typing import Optional


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
