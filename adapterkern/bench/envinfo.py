"""Where a number came from: device name, library versions, git commit and date, for every CSV row."""
from __future__ import annotations

import datetime as _dt
import functools
import os
import platform
import subprocess
from typing import Dict

import torch


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else ``platform.processor()``, with the CPU count.

    The torch thread count is a separate column (``threads``): it can change between points."""
    name = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "cpu"
    return f"{name} ({os.cpu_count()} cpus)"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def device_slug(device: torch.device) -> str:
    """A short file-name-safe name for the device: ``cpu`` or e.g. ``nvidia-h200``."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - any import failure means "not there"
        return ""
    return str(getattr(mod, "__version__", ""))


def adapterkern_version() -> str:
    try:
        from importlib.metadata import version

        return version("adapterkern")
    except Exception:  # noqa: BLE001 - not installed as a distribution (plain checkout)
        return _version("adapterkern")


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    """Short commit of the checkout this package is imported from, ``+dirty`` when it has local changes.

    ``$ADAPTERKERN_GIT_COMMIT`` wins when set: a copy of the tree without ``.git`` (the GPU machine's,
    see benchmarks/gpu_check.sh) has no other way to know its commit."""
    given = os.environ.get("ADAPTERKERN_GIT_COMMIT", "").strip()
    if given:
        return given
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if not commit:
            return ""
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True,
            timeout=10,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def environment(device: torch.device) -> Dict[str, str]:
    """The provenance columns shared by every row of one run."""
    return {
        "date": now_utc(),
        "device": device_name(device),
        "device_type": device.type,
        "threads": str(torch.get_num_threads()) if device.type == "cpu" else "",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda or "",
        "adapterkern": adapterkern_version(),
        "git_commit": git_commit(),
    }
