"""What :func:`adapterkern.patch_adapters` reports: :class:`AdapterPatchReport` and the one warning
(:class:`AdapterPatchWarning`) listing what keeps the ``adapters`` library's path, and why; and the
warning for adapters added after patching that keep it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

__all__ = ["AdapterPatchReport", "AdapterPatchWarning", "added_message", "qualified", "warning_message"]


class AdapterPatchWarning(UserWarning):
    """Emitted once by :func:`patch_adapters` when some adapter modules keep the library's path; once
    per adapter and reason when an adapter added after patching does; and once per layer and reason
    when a composition block first met at run time keeps the library's loop."""


def qualified(*parts: str) -> str:
    """A module's qualified name in the patched model from its parts (the model itself is named "")."""
    return ".".join(p for p in parts if p)


@dataclass
class AdapterPatchReport:
    """What :func:`patch_adapters` did, by qualified module name: every adapter module of the model
    (bottleneck adapters and invertible adapters' coupling blocks) is in ``fused`` or ``library``.

    ``fused``: modules that run through the fused op (value: what is fused).
    ``library``: modules that always keep the ``adapters`` library's path (value: why).
    ``library_in_training``: fused modules that take the library's path while in training mode (why).
    ``compositions`` / ``compositions_library``: the composition blocks of the active setup at patch
    time, per layer (``"<layer>: <block>"``), that run in one launch (value: how) / that keep the
    library's loop over their adapters (value: why). Setups activated later are decided per call.

    Adapter modules the library adds or deletes after patching (``add_adapter``, ``load_adapter``,
    ``average_adapter``, ``delete_adapter``) are patched and entered in, or removed from, the first
    three as it does so; ``compositions`` / ``compositions_library`` stay as at patch time.
    """

    backend: str
    fused: Dict[str, str] = field(default_factory=dict)
    library: Dict[str, str] = field(default_factory=dict)
    library_in_training: Dict[str, str] = field(default_factory=dict)
    compositions: Dict[str, str] = field(default_factory=dict)
    compositions_library: Dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.fused and not self.library:
            return "patch_adapters: no bottleneck adapter modules of the adapters library found"
        lines = [f"patch_adapters (backend={self.backend!r}): {len(self.fused)} fused, {len(self.library)} on the library path"]
        lines += [f"  fused    {name}: {what}" for name, what in self.fused.items()]
        lines += [f"  library  {name}: {why}" for name, why in self.library.items()]
        lines += [f"  library while training  {name}: {why}" for name, why in self.library_in_training.items()]
        lines += [f"  fused composition    {name}: {what}" for name, what in self.compositions.items()]
        lines += [f"  library composition  {name}: {why}" for name, why in self.compositions_library.items()]
        return "\n".join(lines)


def warning_message(report: AdapterPatchReport) -> Optional[str]:
    """The text of the one :class:`AdapterPatchWarning` for ``report``, or None when nothing needs saying."""
    if not report.fused and not report.library:
        return (
            "patch_adapters: no bottleneck adapter modules of the adapters library found in the model; "
            "adapters added to it later through the library are patched as they are added"
        )
    lines = []
    if report.library:
        lines.append(f"patch_adapters: {len(report.library)} adapter module(s) keep the adapters library's path:")
        lines += [f"  {name}: {why}" for name, why in report.library.items()]
    if report.library_in_training:
        lines.append(f"patch_adapters: {len(report.library_in_training)} fused module(s) take the library's path while training:")
        lines += [f"  {name}: {why}" for name, why in report.library_in_training.items()]
    if report.compositions_library:
        lines.append(
            f"patch_adapters: {len(report.compositions_library)} composition block(s) of the active setup keep the "
            "library's loop over their adapters:"
        )
        lines += [f"  {name}: {why}" for name, why in report.compositions_library.items()]
    return "\n".join(lines) if lines else None


def added_message(adapter: str, why: str, training: bool) -> str:
    """The :class:`AdapterPatchWarning` for modules of ``adapter``, added after patching, that keep the
    library's path (``training``: fused, but the library's path while training) because of ``why``."""
    if training:
        return (
            f"patch_adapters: adapter {adapter!r}, added after patching, takes the library's path while "
            f"training (report.library_in_training lists its modules): {why}"
        )
    return (
        f"patch_adapters: adapter {adapter!r}, added after patching, keeps the adapters library's path "
        f"(report.library lists its modules): {why}"
    )
