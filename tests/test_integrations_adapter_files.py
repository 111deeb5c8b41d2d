"""load_adapter refuses malformed or oversized files with a ValueError before reading or allocating
much, and leaves the model unchanged; save_adapter replaces files atomically and refuses a directory
that holds an adapter unless told to overwrite. Malformed files are written by hand here (the
safetensors header bytes too)."""
import hashlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import textwrap
import tracemalloc

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers not installed (it is in the test extra)")
pytest.importorskip("safetensors", reason="safetensors not installed (it is in the test extra)")

import adapterkern as ak  # noqa: E402
from adapterkern.integrations.transformers import adapter_state_dict  # noqa: E402
from adapterkern.nn.bottleneck import BottleneckAdapter  # noqa: E402

from test_integrations_all_or_nothing import assert_unchanged, snapshot  # noqa: E402
from test_integrations_transformers import randomize, run, tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
SPARSE_BYTES = 8 << 30  # a weights file this big is refused from its size: never read (sparse on disk)


def safetensors_bytes(entries, metadata=None):
    """A safetensors file written by hand: {name: (dtype code, shape, raw bytes)}, data in that order."""
    header, data, offset = {}, b"", 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, (code, shape, raw) in entries.items():
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def read_pair(directory):
    return json.loads((directory / CONFIG).read_text()), (directory / WEIGHTS).read_bytes()


def write_pair(directory, meta, weights=None, fix_hash=True):
    """Write the config (a dict, or raw text) and the weights; with ``fix_hash`` the config's size and
    SHA-256 are made to match the weights, so that only the malformation itself is wrong."""
    directory.mkdir(parents=True, exist_ok=True)
    if weights is not None:
        (directory / WEIGHTS).write_bytes(weights)
    if isinstance(meta, dict):
        if fix_hash and weights is not None:
            fixed = {"weights_bytes": len(weights), "weights_sha256": hashlib.sha256(weights).hexdigest()}
            meta = {**meta, **{k: v for k, v in fixed.items() if k in meta}}
        meta = json.dumps(meta)
    (directory / CONFIG).write_text(meta)
    return directory


@pytest.fixture
def good(tmp_path):
    """A saved pfeiffer adapter of a tiny BERT (d=32, r=4, float32)."""
    src = tiny_model("bert")
    ak.add_adapter(src, "a", ak.AdapterConfig.pfeiffer(bottleneck_size=4))
    randomize(src, "a")
    return ak.save_adapter(src, "a", tmp_path / "good")


@pytest.fixture
def refuses():
    """refuses(directory, match): load_adapter raises a ValueError matching ``match`` and saying the model
    was not changed; the target model is bit-identical and gives the same output."""
    target = tiny_model("bert")
    ak.add_adapter(target, "keep", ak.AdapterConfig.pfeiffer(bottleneck_size=4))
    randomize(target, "keep")
    ids = torch.randint(0, 97, (2, 5))
    before, out = snapshot(target), run(target, ids)

    def check(directory, match):
        with pytest.raises(ValueError, match=match) as info:
            ak.load_adapter(target, directory)
        assert "the model was not changed" in str(info.value)
        assert_unchanged(target, before)
        assert torch.equal(run(target, ids), out)

    return check


def first_place(meta):
    return meta["places"][0]["module"]


MALFORMED_CONFIGS = {
    "bogus mode": (lambda m: m["places"][0].update(mode="bogus"), r"places\[0\]\.mode"),
    "parallel_skip on a Linear": (lambda m: m["places"][0].update(mode="parallel_skip"), r"parallel_skip adapter on .*output\.dense"),
    "prefix on a Linear": (lambda m: m["places"][0].update(mode="prefix"), r"prefix adapter on"),
    "the root module": (lambda m: m["places"][0].update(module=""), r"places\[0\]\.module"),
    "a module that is no place": (lambda m: m["places"][0].update(module="bert.pooler.dense"), r"not a place of its config"),
    "a place twice": (lambda m: m["places"].append(dict(m["places"][0])), r"listed twice"),
    "a place without mode": (lambda m: m["places"][0].pop("mode"), r"places\[0\]"),
    "a place that is a string": (lambda m: m["places"].__setitem__(0, "bert"), r"places\[0\]"),
    "places: 5": (lambda m: m.update(places=5), r"places: expected a non-empty list"),
    "hidden_size true": (lambda m: m["places"][0].update(hidden_size=True), r"hidden_size"),
    "a tensor entry that is no dict": (lambda m: m["tensors"].update({next(iter(m["tensors"])): 5}), r"tensors\["),
    "an int tensor": (lambda m: next(iter(m["tensors"].values())).update(dtype="int64"), r"dtype"),
    "a nested shape": (lambda m: next(iter(m["tensors"].values())).update(shape=[[[[4]]]]), r"shape"),
    "config: a list": (lambda m: m.update(config=["pfeiffer"]), r"config"),
    "leave_out: an int": (lambda m: m["config"].update(leave_out=3), r"leave_out"),
    "scaling: NaN": (lambda m: m["config"].update(scaling="NaN"), r"scaling"),
    "an unknown field": (lambda m: m.update(extra=1), r"unknown fields \['extra'\]"),
    "no weights_sha256": (lambda m: m.pop("weights_sha256"), r"lacks fields \['weights_sha256'\]"),
    "name: a list": (lambda m: m.update(name=["a"]), r"name"),
    "a name that is a slot attribute": (lambda m: m.update(name="keys"), r"name"),
    "bottleneck_size 10**9": (lambda m: m["config"].update(bottleneck_size=10**9), r"lists tensor .*adapter_down\.weight.* shape"),
    "reduction_factor 1e-300": (lambda m: m["config"].update(bottleneck_size=None, reduction_factor=1e-300), r"no adapter can be built|shape"),
    "num_parameters wrong": (lambda m: m.update(num_parameters=m["num_parameters"] + 1), r"num_parameters"),
}


@pytest.fixture
def no_large_allocation(monkeypatch):
    """A BottleneckAdapter of more than a million rows may be built on the meta device only (shapes, no memory)."""
    real = BottleneckAdapter.__init__

    def guarded(self, hidden_size, bottleneck_size, *args, device=None, **kwargs):
        if isinstance(bottleneck_size, int) and bottleneck_size > 10**6 and torch.device(device or "cpu").type != "meta":
            raise AssertionError(f"allocated a bottleneck of {bottleneck_size} before checking it against the file")
        real(self, hidden_size, bottleneck_size, *args, device=device, **kwargs)

    monkeypatch.setattr(BottleneckAdapter, "__init__", guarded)


@pytest.mark.parametrize("case", sorted(MALFORMED_CONFIGS))
def test_load_refuses_a_malformed_config(case, good, refuses, tmp_path, no_large_allocation):
    edit, match = MALFORMED_CONFIGS[case]
    meta, weights = read_pair(good)
    edit(meta)
    refuses(write_pair(tmp_path / "bad", meta, weights), match)


@pytest.mark.parametrize(
    "text, match",
    [
        ("[" * 200_000 + "]" * 200_000, "corrupt"),  # nested deeper than the parser's recursion limit
        ('{"format": "adapterkern.adapter/1", "config": ' + "[" * 900 + "]" * 900 + "}", "malformed|missing"),
        ("{not json", "corrupt"),
        (b"\xff\xfe{}".decode("latin-1"), "corrupt"),
        ('{"format": "adapterkern.adapter/1", "scaling": NaN}', "corrupt"),
    ],
)
def test_load_refuses_config_text_that_is_not_a_config(text, match, good, refuses, tmp_path):
    _, weights = read_pair(good)
    refuses(write_pair(tmp_path / "bad", text, weights), match)


def test_load_refuses_a_config_over_one_mebibyte_unread(good, refuses, tmp_path, monkeypatch):
    meta, weights = read_pair(good)
    directory = write_pair(tmp_path / "big", json.dumps(meta) + " " * (2 << 20), weights)
    tracemalloc.start()
    try:
        refuses(directory, "at most")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < (1 << 20), peak


def sparse_weights(directory, size, config_says_so):
    """The good adapter with its weights file grown to ``size`` bytes (a hole on disk, nothing written)."""
    meta, weights = read_pair(directory)
    with open(directory / WEIGHTS, "r+b") as f:
        f.truncate(size)
    if config_says_so:
        meta["weights_bytes"] = size
        write_pair(directory, meta, fix_hash=False)
    return directory


@pytest.mark.parametrize("config_says_so", [False, True])
def test_load_checks_the_file_size_before_reading_it(config_says_so, good, refuses):
    """A weights file of 8 GiB is refused from its size (against the config, and against the header and
    the tensors the config implies) without being read: the load's peak memory stays small."""
    directory = sparse_weights(good, SPARSE_BYTES, config_says_so)
    tracemalloc.start()
    try:
        refuses(directory, "bytes")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < (16 << 20), peak


def tensors_of(weights):
    from safetensors.torch import load

    return load(weights)


def raw(t):
    return t.contiguous().numpy().tobytes()


def edited_header(weights, edit):
    """The weights file with its header parsed, changed by ``edit(header)`` and written back (the data as it was)."""
    length = int.from_bytes(weights[:8], "little")
    header = json.loads(weights[8 : 8 + length])
    edit(header)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + weights[8 + length :]


def header_cases(weights):
    """name -> (hand-written weights bytes, shapes to write into the config's tensor table, match)."""
    tensors = tensors_of(weights)
    entries = {k: ("F32", tuple(t.shape), raw(t)) for k, t in tensors.items()}
    first = next(iter(entries))
    same_size = [k for k in entries if k != first and len(entries[k][2]) == len(entries[first][2])][0]
    other_size = [k for k in entries if len(entries[k][2]) != len(entries[first][2])][0]
    length = int.from_bytes(weights[:8], "little")
    reshaped = {**entries, first: ("F32", (8, 16), entries[first][2])}  # the same bytes, another shape

    def swap(header):
        header[first]["data_offsets"], header[other_size]["data_offsets"] = header[other_size]["data_offsets"], header[first]["data_offsets"]

    def overlap(header):
        header[same_size]["data_offsets"] = list(header[first]["data_offsets"])

    return {
        "header length 2**40": (struct.pack("<Q", 2**40) + weights[8:], {}, "header length"),
        "header not JSON": (weights[:8] + b"{" + b" " * (length - 1) + weights[8 + length :], {}, "header is corrupt"),
        "an I32 tensor": (safetensors_bytes({**entries, first: ("I32",) + entries[first][1:]}), {}, "floating point"),
        "another shape in header and config": (safetensors_bytes(reshaped), {first: [8, 16]}, "shape"),
        "another shape in the header only": (safetensors_bytes(reshaped), {}, "shape"),
        "swapped offsets": (edited_header(weights, swap), {}, "offsets"),
        "overlapping tensors": (edited_header(weights, overlap), {}, "overlap"),
        "metadata not strings": (edited_header(weights, lambda h: h.update(__metadata__={"format": 1})), {}, "__metadata__"),
        "trailing bytes": (safetensors_bytes(entries) + b"\0" * 16, {}, "do not add up"),
        "a tensor missing": (safetensors_bytes({k: v for k, v in entries.items() if k != first}), {}, "do not add up|not matching"),
        "an extra tensor": (safetensors_bytes({**entries, "x.y": ("F32", (1,), b"\0" * 4)}), {}, "do not add up|not matching"),
        "a pickle": (pickle.dumps(Unpickled()), {}, "header"),
    }


UNPICKLED = []


class Unpickled:
    def __reduce__(self):
        return (UNPICKLED.append, ("unpickled",))


@pytest.mark.parametrize(
    "case",
    ["header length 2**40", "header not JSON", "an I32 tensor", "another shape in header and config", "another shape in the header only",
     "swapped offsets", "overlapping tensors", "metadata not strings", "trailing bytes", "a tensor missing", "an extra tensor", "a pickle"],
)
def test_load_checks_the_safetensors_header_against_the_config(case, good, refuses, tmp_path):
    meta, weights = read_pair(good)
    blob, table, match = header_cases(weights)[case]
    for key, shape in table.items():
        meta["tensors"][key]["shape"] = shape
    refuses(write_pair(tmp_path / "bad", meta, blob), match)
    assert UNPICKLED == []


def test_a_good_file_still_loads_and_matches(good):
    src_meta, _ = read_pair(good)
    target = tiny_model("bert")
    assert ak.load_adapter(target, good) == src_meta["name"]


# ------------------------------------------------------------------------------------------------
# save_adapter
# ------------------------------------------------------------------------------------------------


def saved(directory):
    """The adapter tensors a fresh model gets from ``directory``."""
    model = tiny_model("bert")
    return adapter_state_dict(model, ak.load_adapter(model, directory))


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def adapter_model(seed):
    torch.manual_seed(seed)
    model = tiny_model("bert")
    ak.add_adapter(model, "a", ak.AdapterConfig.pfeiffer(bottleneck_size=4))
    randomize(model, "a")
    return model


def test_save_refuses_a_directory_holding_an_adapter(tmp_path):
    first, second = adapter_model(1), adapter_model(2)
    directory = ak.save_adapter(first, "a", tmp_path / "d")
    ak.add_adapter(second, "b", ak.AdapterConfig.pfeiffer(bottleneck_size=4))
    for name in ("b", "a"):  # another adapter, and the same name with other weights
        with pytest.raises(FileExistsError, match="overwrite=True") as info:
            ak.save_adapter(second, name, directory)
        assert info.value.filename == str(directory)
        assert same_tensors(saved(directory), adapter_state_dict(first, "a"))
    ak.save_adapter(second, "a", directory, overwrite=True)
    assert same_tensors(saved(directory), adapter_state_dict(second, "a"))
    lone = tmp_path / "only_weights"
    lone.mkdir()
    (lone / WEIGHTS).write_bytes(b"x")
    with pytest.raises(FileExistsError, match=WEIGHTS):
        ak.save_adapter(first, "a", lone)


def fail_call(monkeypatch, owner, attr, n, exc=OSError(28, "No space left on device")):
    real = getattr(owner, attr)
    calls = []

    def failing(*args, **kwargs):
        calls.append(None)
        if len(calls) == n:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, attr, failing)


@pytest.mark.parametrize(
    "step",
    ["fsync of the 2nd temporary file", "rename of the weights"],
)
@pytest.mark.parametrize("had_adapter", [True, False])
def test_a_failed_save_leaves_the_old_adapter_or_none(step, had_adapter, tmp_path, monkeypatch):
    directory = tmp_path / "d"
    directory.mkdir()
    old = adapter_model(1)
    if had_adapter:
        ak.save_adapter(old, "a", directory)
    if step.startswith("fsync"):
        fail_call(monkeypatch, os, "fsync", 2)
    else:
        fail_call(monkeypatch, os, "replace", 2)
    with pytest.raises(OSError, match="save_adapter") as info:
        ak.save_adapter(adapter_model(2), "a", directory, overwrite=True)
    monkeypatch.undo()
    assert info.value.filename == str(directory)
    if had_adapter:
        assert sorted(p.name for p in directory.iterdir()) == [CONFIG, WEIGHTS]  # no temporary file left
        assert same_tensors(saved(directory), adapter_state_dict(old, "a"))
    else:
        assert list(directory.iterdir()) == []


def test_a_crash_between_the_renames_is_refused_at_load(tmp_path):
    """The config is renamed first, then the weights: a process killed between the two leaves the new
    config with the old weights, and load_adapter refuses that pair (SHA-256)."""
    directory = ak.save_adapter(adapter_model(1), "a", tmp_path / "d")
    old_weights = (directory / WEIGHTS).read_bytes()
    script = textwrap.dedent(f"""
        import os, sys, torch
        sys.path[:0] = {[os.path.dirname(__file__)]!r}
        import adapterkern as ak
        from test_integrations_adapter_files import adapter_model
        model = adapter_model(2)
        real, calls = os.replace, []
        def replace(src, dst):
            calls.append(dst)
            if len(calls) == 2:
                os._exit(0)  # killed between the two renames
            real(src, dst)
        os.replace = replace
        ak.save_adapter(model, "a", {str(directory)!r}, overwrite=True)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert (directory / WEIGHTS).read_bytes() == old_weights
    meta = json.loads((directory / CONFIG).read_text())
    assert meta["weights_sha256"] != hashlib.sha256(old_weights).hexdigest()  # the new config
    with pytest.raises(ValueError, match="SHA-256"):
        ak.load_adapter(tiny_model("bert"), directory)


def make_read_only(directory):
    """Make ``directory`` refuse new files (chmod; as root, which ignores modes, the immutable flag).
    Returns the undo, or skips where neither works."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        undo = lambda: directory.chmod(0o755)  # noqa: E731
    elif shutil.which("chattr") and subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode == 0:
        undo = lambda: subprocess.run(["chattr", "-i", str(directory)], check=True)  # noqa: E731
    else:
        pytest.skip("cannot make a directory read-only here")
    try:
        (directory / "probe").touch()
    except OSError:
        return undo
    (directory / "probe").unlink()
    undo()
    pytest.skip("the read-only directory still takes files here")


def test_save_to_a_read_only_directory_is_an_oserror_naming_it(tmp_path):
    directory = tmp_path / "ro"
    directory.mkdir()
    undo = make_read_only(directory)
    try:
        with pytest.raises(OSError, match="save_adapter") as info:
            ak.save_adapter(adapter_model(1), "a", directory)
        assert info.value.filename == str(directory) and str(directory) in str(info.value)
        assert list(directory.iterdir()) == []
    finally:
        undo()
