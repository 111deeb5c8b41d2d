"""Adapter files: ``save_adapter`` / ``load_adapter`` of an :func:`~adapterkern.add_adapter` model.

A saved adapter is a directory with two files: ``adapter_model.safetensors`` (the adapter's tensors,
keyed ``<place>.<tensor>``, and those of its config's ``modules_to_save``, keyed ``<module>.<tensor>``)
and ``adapter_config.json`` (format, name, kind, config, places, every tensor's shape and dtype, the
weights file's size and SHA-256). Nothing is unpickled; every size is checked against the config and
the safetensors header before anything is read or allocated, and the model is changed only after
every check passed.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import reprlib
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .slots import (
    MODES, Place, SlotConfig, adapter_configs, check_adapter_name, check_not_optimized, config_class, iter_slots,
    model_type, require_adapter, slot_of,
)
from .transformers import (
    adapter_places_in, adapter_state_dict, insert_adapter_modules, module_tensors, saved_modules, saved_tensors,
    set_active_adapter,
)

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "load_adapter", "replace_files", "save_adapter"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "adapterkern.adapter/1"


MAX_CONFIG_BYTES = 1 << 20  # an adapter's config is a few KiB; larger files are refused unread
MAX_HEADER_BYTES = 1 << 23  # the safetensors header: ~150 bytes per tensor
# safetensors dtype code -> (the dtype's name in adapter_config.json, bytes per element); adapters are floating point
_FLOAT_DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2)}
_DTYPE_NAMES = {name: code for code, (name, _) in _FLOAT_DTYPES.items()}
_REQUIRED_FIELDS = ("format", "name", "config", "places", "tensors", "weights_bytes", "weights_sha256")
# "kind" is optional in format /1 (absent: an adapter); "modules_to_save": the qualified names of the
# modules saved with the adapter (absent: none)
_OPTIONAL_FIELDS = ("kind", "model_type", "num_parameters", "modules_to_save")
_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlevel = 80, 80, 3  # bounded, and no recursion into nested values


def _write_temp(path: Path, data: bytes) -> Path:
    """``data`` in a new temporary file next to ``path`` (same directory: renaming it over ``path`` is atomic), on disk."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _fsync_directory(directory: Path) -> None:
    # makes the renames durable; skipped where a directory cannot be opened or synced (Windows)
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


_TOO_LARGE = object()  # an old file larger than MAX_CONFIG_BYTES: not read back for a rollback


def replace_files(directory: Path, files: Dict[str, bytes]) -> None:
    """Put new files (name -> contents) in ``directory``, in the given order: every one written to a
    temporary file first (a failure there leaves the old files untouched), then renamed over the old one.
    If a rename fails, the files renamed before it get their old contents back (or, where there were
    none, are removed). A crash between two renames leaves a mix, which the loaders refuse: adapterkern's
    config holds the weights' SHA-256, the adapters library's weights must match its config's shapes."""
    temps, done = [], []  # done: (path, old contents or None)
    try:
        for name, data in files.items():
            temps.append(_write_temp(directory / name, data))
        for (name, _), tmp in zip(list(files.items()), list(temps)):
            path = directory / name
            old = None if not path.is_file() else path.read_bytes() if path.stat().st_size <= MAX_CONFIG_BYTES else _TOO_LARGE
            try:
                os.replace(tmp, path)
            except BaseException:
                for undo_path, undo_old in reversed(done):
                    try:
                        if undo_old is _TOO_LARGE:  # not kept in memory: the new file stays
                            continue
                        if undo_old is None:
                            undo_path.unlink(missing_ok=True)
                        else:
                            restore = _write_temp(undo_path, undo_old)
                            temps.append(restore)
                            os.replace(restore, undo_path)
                    except OSError:
                        pass  # a mix of new and old files stays: the loaders refuse it
                raise
            done.append((path, old))
        _fsync_directory(directory)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


def save_adapter(model: nn.Module, name: str, directory: Union[str, Path], *, overwrite: bool = False) -> Path:
    """Write adapter ``name`` to ``directory`` (created if needed): ``adapter_model.safetensors`` (its
    tensors, and those of the modules its config's ``modules_to_save`` names, e.g. a task head; never
    the backbone's) and ``adapter_config.json`` (kind, config, places, tensor shapes and dtypes, file
    size and SHA-256 of the weights). Returns the directory.

    A directory that already holds either file is refused (``FileExistsError``), whatever adapter it
    holds, the same name included, unless ``overwrite=True``. The files are replaced atomically: a reader
    sees the old adapter, the new one, or (across a crash between the two renames only) the new config
    with the old weights, which ``load_adapter`` refuses by their SHA-256. An unwritable directory is an
    ``OSError`` naming it."""
    from safetensors.torch import save as save_safetensors

    require_adapter(model, name)
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite: expected a bool, got {type(overwrite).__name__}")
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory: expected a path, got {type(directory).__name__}")
    config = adapter_configs(model)[name]
    directory = Path(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model, name).items()}
    heads = saved_modules(model, name)
    for module_name, module in heads.items():
        tensors.update({f"{module_name}.{k}": v.detach().contiguous().cpu() for k, v in module_tensors(module).items()})
    unsupported = {k: str(t.dtype) for k, t in tensors.items() if str(t.dtype).replace("torch.", "") not in _DTYPE_NAMES}
    if unsupported:
        raise ValueError(f"name: adapter {name!r} has tensors of dtypes {unsupported}; saved adapters are {', '.join(_DTYPE_NAMES)}")
    blob = save_safetensors(tensors, metadata={"format": FORMAT, "name": name})
    places = [{"module": place, "mode": slot.mode, "hidden_size": slot.hidden_size} for place, _, slot in iter_slots(model) if name in slot]
    meta = {
        "format": FORMAT,
        "name": name,
        "kind": config.kind,
        "model_type": model_type(model),
        "config": config.to_dict(),
        "places": places,
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in tensors.items()},
        "num_parameters": sum(v.numel() for v in tensors.values()),
        **({"modules_to_save": list(heads)} if heads else {}),
        "weights_bytes": len(blob),
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
    }
    config_bytes = (json.dumps(meta, indent=2, allow_nan=False) + "\n").encode()
    existing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if os.path.lexists(directory / n)]
    if existing and not overwrite:
        raise FileExistsError(errno.EEXIST, f"save_adapter: directory already holds {' and '.join(existing)}; "
                              f"pass overwrite=True to replace them", str(directory))
    try:
        directory.mkdir(parents=True, exist_ok=True)
        replace_files(directory, {CONFIG_NAME: config_bytes, WEIGHTS_NAME: blob})
    except OSError as exc:
        raise OSError(exc.errno, f"save_adapter: cannot write the adapter to directory {directory} ({exc.strerror or exc})",
                      str(directory)) from exc
    return directory


def _load_error(directory: Path, why: str) -> ValueError:
    return ValueError(f"load_adapter: {directory} {why}; the model was not changed")


def _refuse_constant(constant):
    raise ValueError(f"{constant} is not JSON")


def _parse_json(data: bytes):
    """Strict JSON (no NaN / Infinity); ValueError for anything else, nesting too deep included."""
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _is_count(value, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check_meta(directory: Path, meta) -> None:
    """ValueError unless the parsed config has the fields, types and ranges save_adapter writes."""
    def bad(field: str, expected: str, got) -> ValueError:
        return _load_error(directory, f"has a malformed {CONFIG_NAME}: {field}: expected {expected}, got {_short.repr(got)}")

    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _load_error(directory, f"{CONFIG_NAME} is not an adapterkern adapter (format {FORMAT!r} expected)")
    unknown = sorted(set(meta) - set(_REQUIRED_FIELDS) - set(_OPTIONAL_FIELDS))
    missing = [f for f in _REQUIRED_FIELDS if f not in meta]
    if unknown or missing:
        what = ([f"lacks fields {missing}"] if missing else []) + ([f"has unknown fields {_short.repr(unknown)}"] if unknown else [])
        raise _load_error(directory, f"has a malformed {CONFIG_NAME}: it {' and '.join(what)}")
    for field_name, kind, expected in (("name", str, "a string"), ("model_type", str, "a string"), ("config", dict, "an object"),
                                       ("places", list, "a non-empty list"), ("tensors", dict, "a non-empty object")):
        if field_name in meta and (not isinstance(meta[field_name], kind) or (kind is not str and not meta[field_name])):
            raise bad(field_name, expected, meta[field_name])
    places = meta["places"]
    for i, place in enumerate(places):
        if not isinstance(place, dict) or set(place) != {"module", "mode", "hidden_size"}:
            raise bad(f"places[{i}]", "an object with fields module, mode, hidden_size", place)
        if not isinstance(place["module"], str) or not place["module"]:
            raise bad(f"places[{i}].module", "the name of a module of the model", place["module"])
        if place["mode"] not in MODES:
            raise bad(f"places[{i}].mode", f"one of {', '.join(MODES)}", place["mode"])
        if not _is_count(place["hidden_size"], 1):
            raise bad(f"places[{i}].hidden_size", "a positive int", place["hidden_size"])
    for key, entry in meta["tensors"].items():
        if not isinstance(entry, dict) or set(entry) != {"shape", "dtype"}:
            raise bad(f"tensors[{key!r}]", "an object with fields shape, dtype", entry)
        shape = entry["shape"]
        if not isinstance(shape, list) or len(shape) > 8 or not all(_is_count(n) for n in shape):
            raise bad(f"tensors[{key!r}].shape", "a list of sizes", shape)
        if entry["dtype"] not in _DTYPE_NAMES:
            raise bad(f"tensors[{key!r}].dtype", f"one of {', '.join(_DTYPE_NAMES)} (adapters are floating point)", entry["dtype"])
    saved = meta.get("modules_to_save", [])
    if not isinstance(saved, list) or not all(isinstance(m, str) and m for m in saved) or len(set(saved)) != len(saved):
        raise bad("modules_to_save", "a list of distinct module names", saved)
    if "num_parameters" in meta and not _is_count(meta["num_parameters"]):
        raise bad("num_parameters", "an int >= 0", meta["num_parameters"])
    if not _is_count(meta["weights_bytes"], 8):
        raise bad("weights_bytes", "an int >= 8", meta["weights_bytes"])
    if not isinstance(meta["weights_sha256"], str) or not re.fullmatch(r"[0-9a-f]{64}", meta["weights_sha256"]):
        raise bad("weights_sha256", "64 hexadecimal digits", meta["weights_sha256"])


def _read_config(directory: Path) -> dict:
    """adapter_config.json, parsed and checked; its size is checked before it is read."""
    path = directory / CONFIG_NAME
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise _load_error(directory, f"has a {size}-byte {CONFIG_NAME}; an adapter config is at most {MAX_CONFIG_BYTES} bytes")
    with open(path, "rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:  # grew since the stat
        raise _load_error(directory, f"has a {CONFIG_NAME} of more than {MAX_CONFIG_BYTES} bytes")
    try:
        meta = _parse_json(data)
    except ValueError as exc:
        raise _load_error(directory, f"has a corrupt {CONFIG_NAME} ({_short.repr(str(exc))})") from None
    _check_meta(directory, meta)
    return meta


def _check_saved_places(model: nn.Module, directory: Path, config: SlotConfig, saved: list) -> List[Place]:
    """The saved places as places of this model: each must be one where ``config`` puts its entry in
    this model (:meth:`SlotConfig.places_in`), with the saved mode and width."""
    modules = dict(model.named_modules())
    lacking = [a for a in config.requires if a not in adapter_configs(model)]
    if lacking:
        raise _load_error(directory, f"is a {config.kind} of {list(config.requires)}; add or load those adapters first (this model lacks {lacking})")
    candidates, places = None, []
    for i, p in enumerate(saved):
        module_name, mode, width = p["module"], p["mode"], p["hidden_size"]
        module = modules.get(module_name)
        if module is None:
            raise _load_error(directory, f"puts an adapter on {module_name!r}, which this {model_type(model)} model does not have")
        if any(place.name == module_name for place in places):
            raise _load_error(directory, f"has a malformed {CONFIG_NAME}: places[{i}]: {module_name!r} is listed twice")
        slot = slot_of(module)
        if config.requires and (slot is None or not all(a in slot for a in config.requires)):
            raise _load_error(
                directory, f"is a {config.kind} of {list(config.requires)}; add or load those adapters first (missing at {module_name!r})"
            )
        if candidates is None:
            try:
                candidates = {c.name: c for c in config.places_in(model)}
            except ValueError as exc:
                raise _load_error(directory, f"holds a {config.kind} that has no place in this {model_type(model)} model ({exc})") from None
        place = candidates.get(module_name)
        if place is None:
            raise _load_error(directory, f"puts an adapter on {module_name!r}, which is not a place of its config in this {model_type(model)} "
                                         f"model (those are {_short.repr(list(candidates))})")
        if place.mode != mode:
            raise _load_error(directory, f"puts a {mode} adapter on {module_name!r}; its config puts a {place.mode} one there")
        if place.hidden_size != width:
            raise _load_error(directory, f"was saved for hidden size {width} at {module_name!r}; this model has {place.hidden_size}")
        places.append(place)
    return places


def _expected_tensors(model: nn.Module, directory: Path, config: SlotConfig, places: Sequence[Place]) -> Dict[str, Tuple[int, ...]]:
    """Name -> shape of every tensor the config's adapter has at these places, from modules built on
    the meta device (shapes only: nothing is allocated, whatever sizes the config asks for)."""
    try:
        modules = config.build_for_load(model, places, device="meta")
    except (ValueError, TypeError, RuntimeError, OverflowError) as exc:
        raise _load_error(directory, f"has a config no adapter can be built from ({type(exc).__name__}: {_short.repr(str(exc))})") from None
    return {f"{place.name}.{key}": tuple(t.shape) for place, m in zip(places, modules) for key, t in saved_tensors(m).items()}


def _saved_heads(model: nn.Module, directory: Path, meta: dict, places: Sequence[Place]) -> Dict[str, nn.Module]:
    """The modules of this model the file's ``modules_to_save`` names (exact qualified names), each
    holding no adapter place."""
    modules = dict(model.named_modules())
    heads = {}
    for module_name in meta.get("modules_to_save", []):
        module = modules.get(module_name)
        if module is None or not module_name:
            raise _load_error(directory, f"holds module {module_name!r} (modules_to_save), which this {model_type(model)} model does not have")
        if adapter_places_in(model, module_name, places):
            raise _load_error(directory, f"holds module {module_name!r} (modules_to_save), which holds adapter places in this model")
        heads[module_name] = module
    return heads


def _check_tensor_table(directory: Path, meta: dict, expected: Dict[str, Tuple[int, ...]]) -> None:
    """The config's tensor table against the tensors its adapter config implies."""
    table = meta["tensors"]
    missing, extra = sorted(set(expected) - set(table)), sorted(set(table) - set(expected))
    if missing:
        raise _load_error(directory, f"lacks tensors {missing[:4]} of its adapter (or of its modules_to_save)")
    if extra:
        raise _load_error(directory, f"has tensors {_short.repr(extra[:4])} that belong to no place of its adapter")
    for key, shape in expected.items():
        if tuple(table[key]["shape"]) != shape:
            raise _load_error(directory, f"lists tensor {key!r} with shape {tuple(table[key]['shape'])}; its adapter config "
                                         f"(or this model's module) implies {shape}")
    numel = sum(math.prod(shape) for shape in expected.values())
    if meta.get("num_parameters", numel) != numel:
        raise _load_error(directory, f"says num_parameters {meta['num_parameters']}; its tensors hold {numel}")


def _read_weights(directory: Path, meta: dict) -> bytes:
    """The weights file, read only once its size and safetensors header match the config: every
    tensor's name, dtype, shape and byte extent, and the file size (header + data)."""
    path = directory / WEIGHTS_NAME
    size, table = path.stat().st_size, meta["tensors"]
    if size != meta["weights_bytes"]:
        raise _load_error(directory, f"{WEIGHTS_NAME}: the file has {size} bytes; {CONFIG_NAME} records {meta['weights_bytes']} bytes "
                                     f"(and its SHA-256): corrupt or replaced")
    extent = {k: math.prod(e["shape"]) * _FLOAT_DTYPES[_DTYPE_NAMES[e["dtype"]]][1] for k, e in table.items()}
    data_bytes = sum(extent.values())
    with open(path, "rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little")
        if len(head) < 8 or header_len > MAX_HEADER_BYTES or 8 + header_len + data_bytes != size:
            raise _load_error(directory, f"{WEIGHTS_NAME}: its header length ({header_len} bytes) and the {data_bytes} bytes of "
                                         f"the tensors its config lists do not add up to its {size} bytes")
        raw = f.read(header_len)
        try:
            header = _parse_json(raw)
        except ValueError as exc:
            raise _load_error(directory, f"{WEIGHTS_NAME}: its header is corrupt ({_short.repr(str(exc))})") from None
        _check_header(directory, header, table, extent)
        data = f.read(data_bytes + 1)
    if len(raw) != header_len or len(data) != data_bytes:
        raise _load_error(directory, f"{WEIGHTS_NAME}: the file changed while it was read")
    return head + raw + data


def _check_header(directory: Path, header, table: dict, extent: Dict[str, int]) -> None:
    def bad(why: str) -> ValueError:
        return _load_error(directory, f"{WEIGHTS_NAME}: its header {why}")

    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("is not a JSON object with __metadata__ (if any) an object of strings")
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    if set(entries) != set(table):
        raise bad(f"lists tensors {_short.repr(sorted(set(entries) ^ set(table))[:4])} not matching its {CONFIG_NAME}")
    spans = []
    for key, entry in entries.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"has a malformed entry for {key!r}")
        code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if code not in _FLOAT_DTYPES:
            raise bad(f"gives tensor {key!r} dtype {_short.repr(code)}; adapter tensors are floating point ({', '.join(_FLOAT_DTYPES)})")
        if _FLOAT_DTYPES[code][0] != table[key]["dtype"] or shape != table[key]["shape"]:
            raise bad(f"gives tensor {key!r} shape {_short.repr(shape)}, dtype {code}; its {CONFIG_NAME} says "
                      f"{table[key]['shape']}, {table[key]['dtype']}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets) or offsets[1] - offsets[0] != extent[key]:
            raise bad(f"gives tensor {key!r} data offsets {_short.repr(offsets)}; its shape and dtype take {extent[key]} bytes")
        spans.append(offsets)
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            raise bad("has tensors whose data overlap or leave gaps")
        end = stop


def load_adapter(model: nn.Module, directory: Union[str, Path], name: Optional[str] = None, *, set_active: bool = True) -> str:
    """Load an adapter written by :func:`save_adapter` into ``model`` (under ``name``, default the saved
    name) and return its name. Checked before anything large is read or allocated, and before the model
    is touched: the config (at most 1 MiB; every field), the places (each a place of the saved config in
    this model, with the saved mode and width), the safetensors header against the tensors the config
    implies (names, dtypes, shapes, byte extents, file size), then the SHA-256. Nothing is unpickled.
    On any mismatch a ``ValueError`` says what, and the model is left unchanged. The tensors of the
    file's ``modules_to_save`` (e.g. a task head; the same module names and shapes in this model) are
    copied into this model's modules, which are shared by every adapter of the model."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    check_not_optimized(model, "load_adapter")
    if name is not None:
        check_adapter_name(name)
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory: expected a path, got {type(directory).__name__}")
    directory = Path(directory)
    for path in (directory / CONFIG_NAME, directory / WEIGHTS_NAME):
        if not path.is_file():
            raise _load_error(directory, f"has no {path.name}")
    meta = _read_config(directory)
    try:
        config = config_class(meta.get("kind", "adapter")).from_dict(meta["config"])
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        raise _load_error(directory, f"is corrupt or incomplete ({type(exc).__name__}: {_short.repr(str(exc))})") from None
    if name is None:
        name = meta["name"]
        try:
            check_adapter_name(name)
        except ValueError as exc:
            raise _load_error(directory, f"holds an adapter whose name cannot be used ({exc}); pass name=...") from None
    if name in adapter_configs(model):
        raise _load_error(directory, f"holds adapter {name!r}, which this model already has (pass name=...)")
    places = _check_saved_places(model, directory, config, meta["places"])
    heads = _saved_heads(model, directory, meta, places)
    expected = _expected_tensors(model, directory, config, places)
    expected.update({f"{m}.{k}": tuple(t.shape) for m, module in heads.items() for k, t in module_tensors(module).items()})
    _check_tensor_table(directory, meta, expected)
    blob = _read_weights(directory, meta)
    if hashlib.sha256(blob).hexdigest() != meta["weights_sha256"]:
        raise _load_error(directory, f"{WEIGHTS_NAME} does not match the size and SHA-256 in {CONFIG_NAME} (corrupt or replaced)")
    try:
        tensors = load_safetensors(blob)
    except SafetensorError as exc:
        raise _load_error(directory, f"has a corrupt {WEIGHTS_NAME} ({exc})") from None
    adapters = config.build_for_load(model, places)  # the shapes _expected_tensors checked the file against
    for place, adapter in zip(places, adapters):
        own = adapter.state_dict()
        adapter.load_state_dict({k: tensors[f"{place.name}.{k}"].to(own[k].dtype) for k in own})
    head_values = [(target, tensors[f"{m}.{k}"]) for m, module in heads.items() for k, target in module_tensors(module).items()]
    insert_adapter_modules(model, name, config, places, adapters)
    with torch.no_grad():  # shapes checked above; state_dict's tensors share the modules' storage
        for target, value in head_values:
            target.copy_(value)
    if set_active:
        set_active_adapter(model, name)
    return name
