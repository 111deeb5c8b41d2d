"""add_adapter, add_fusion and load_adapter change a model completely or not at all: a refused name
or a failure part-way leaves it bit-identical (state dict, hooks of every module, active adapter,
the record, the attention implementation)."""
import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="transformers not installed (it is in the test extra)")
pytest.importorskip("safetensors", reason="safetensors not installed (it is in the test extra)")

import adapterkern as ak  # noqa: E402
from adapterkern.integrations.compose import add_fusion  # noqa: E402
from adapterkern.integrations.prefix_attention import prefix_attention_enabled  # noqa: E402
from adapterkern.integrations.slots import AdapterSlot, adapter_configs, iter_slots  # noqa: E402

from test_integrations_transformers import randomize, run, tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(model):
    """Everything add_adapter / add_fusion / load_adapter may change."""
    configs = [m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation_internal")]
    return {
        "state": [(k, v.detach().clone()) for k, v in model.state_dict().items()],
        "hooks": [
            (n, len(m._forward_hooks), len(m._forward_pre_hooks), list(m._forward_hooks.values()), list(m._forward_pre_hooks.values()))
            for n, m in model.named_modules()
        ],
        "modules": [n for n, _ in model.named_modules()],
        "active": ak.get_active_adapter(model),
        "record": list(adapter_configs(model).items()),
        "slots": [(n, slot.mode, list(slot), slot.active, slot.dropped) for n, _, slot in iter_slots(model)],
        "attention": [c._attn_implementation_internal for c in configs],
        "prefix_attention": prefix_attention_enabled(model),
        "dict": sorted(model.__dict__),
    }


def assert_unchanged(model, before):
    after = snapshot(model)
    assert [k for k, _ in after["state"]] == [k for k, _ in before["state"]]
    for (key, a), (_, b) in zip(after["state"], before["state"]):
        assert a.dtype == b.dtype and torch.equal(a, b), key
    for field in before:
        if field != "state":
            assert after[field] == before[field], field


def model_with_adapter(family="bert"):
    model = tiny_model(family)
    ak.add_adapter(model, "a", ak.AdapterConfig.pfeiffer(bottleneck_size=4))
    randomize(model, "a")
    return model


RESERVED = ["keys", "training", "forward", "mode", "layer", "items", "values", "update", "T_destination",
            "active", "dropped", "hidden_size", "current", "apply", "_modules", "__init__", "dump_patches"]
INVALID = ["a.b", "", "9lives", "-x", "has space", "caf\u00e9", None, 3, ("a",)]


@pytest.mark.parametrize("name", RESERVED + INVALID)
@pytest.mark.parametrize("with_adapter", [False, True])
def test_add_adapter_refuses_names_a_slot_cannot_hold(name, with_adapter):
    model = model_with_adapter() if with_adapter else tiny_model("bert")
    before = snapshot(model)
    with pytest.raises(ValueError, match="name"):
        ak.add_adapter(model, name, ak.AdapterConfig.pfeiffer(bottleneck_size=4))
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", ["keys", "forward", "training", "a.b"])
def test_add_fusion_and_load_adapter_refuse_them_too(name, tmp_path):
    model = model_with_adapter()
    ak.add_adapter(model, "b", ak.AdapterConfig.pfeiffer(bottleneck_size=4))
    directory = ak.save_adapter(model, "a", tmp_path / "a")
    target = tiny_model("bert")
    ak.add_adapter(target, "b", ak.AdapterConfig.pfeiffer(bottleneck_size=4))
    before, before_target = snapshot(model), snapshot(target)
    with pytest.raises(ValueError, match="name"):
        add_fusion(model, name, ["a", "b"])
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="name"):
        ak.load_adapter(target, directory, name=name)
    assert_unchanged(target, before_target)


def fail_on_call(monkeypatch, owner, attr, n):
    """Make call number ``n`` of ``owner.attr`` raise (the calls before it go through)."""
    real = getattr(owner, attr)
    calls = []

    def failing(*args, **kwargs):
        calls.append(None)
        if len(calls) == n:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, attr, failing)


@pytest.mark.parametrize(
    "family, config, fail",
    [
        ("bert", ak.AdapterConfig.houlsby(bottleneck_size=4), ("register_forward_hook", 2)),  # 2nd new place
        ("bert", ak.AdapterConfig.parallel(bottleneck_size=4), ("register_forward_pre_hook", 3)),
        ("llama", ak.AdapterConfig.houlsby(bottleneck_size=4), ("slot_setitem", 4)),  # places that already hold "a"
        ("llama", ak.AdapterConfig.mam(prefix_length=2, prefix_bottleneck=8), ("register_forward_hook", 2)),  # prefix attention on
    ],
)
def test_add_adapter_failing_part_way_changes_nothing(family, config, fail, monkeypatch):
    model = model_with_adapter(family)
    ids = torch.randint(0, 97, (2, 5))
    expected, before = run(model, ids), snapshot(model)
    what, n = fail
    if what == "slot_setitem":
        fail_on_call(monkeypatch, AdapterSlot, "__setitem__", n)
    else:
        fail_on_call(monkeypatch, nn.Module, what, n)
    with pytest.raises(RuntimeError, match="injected failure"):
        ak.add_adapter(model, "new", config)
    monkeypatch.undo()
    assert_unchanged(model, before)
    assert torch.equal(run(model, ids), expected)
    ak.add_adapter(model, "new", config)  # the name is free: nothing of the failed call is left
    assert ak.list_adapters(model) == ["a", "new"]


def test_add_fusion_failing_part_way_changes_nothing(monkeypatch):
    model = model_with_adapter("llama")
    ak.add_adapter(model, "b", ak.AdapterConfig.pfeiffer(bottleneck_size=4))
    before = snapshot(model)
    fail_on_call(monkeypatch, AdapterSlot, "__setitem__", 3)
    with pytest.raises(RuntimeError, match="injected failure"):
        add_fusion(model, "fz", ["a", "b"])
    monkeypatch.undo()
    assert_unchanged(model, before)


@pytest.mark.parametrize("placement", ["pfeiffer", "mam"])
def test_load_adapter_failing_part_way_changes_nothing(placement, tmp_path, monkeypatch):
    src = tiny_model("llama")
    config = getattr(ak.AdapterConfig, placement)(bottleneck_size=4, **({"prefix_length": 2, "prefix_bottleneck": 8} if placement == "mam" else {}))
    ak.add_adapter(src, "a", config)
    directory = ak.save_adapter(src, "a", tmp_path / "a")
    target = tiny_model("llama")
    before = snapshot(target)
    fail_on_call(monkeypatch, nn.Module, "register_forward_hook", 3)
    with pytest.raises(RuntimeError, match="injected failure"):
        ak.load_adapter(target, directory)
    monkeypatch.undo()
    assert_unchanged(target, before)
    assert ak.load_adapter(target, directory) == "a"


def test_a_child_called_like_the_slot_is_not_replaced():
    model = tiny_model("bert")
    squatter = nn.Identity()
    model.bert.encoder.layer[1].output.dense.add_module("bottleneck_adapters", squatter)
    before = snapshot(model)
    with pytest.raises(ValueError, match="bottleneck_adapters"):
        ak.add_adapter(model, "a", ak.AdapterConfig.pfeiffer(bottleneck_size=4))
    assert_unchanged(model, before)
    assert model.bert.encoder.layer[1].output.dense.bottleneck_adapters is squatter


def test_deep_copy_after_a_refused_call_is_a_plain_model():
    """A refused call stores nothing in the model (not even an empty record): a copy behaves the same."""
    model = tiny_model("gpt2")
    with pytest.raises(ValueError):
        ak.add_adapter(model, "keys")
    clone = copy.deepcopy(model)
    assert ak.list_adapters(clone) == [] and snapshot(clone)["dict"] == snapshot(tiny_model("gpt2"))["dict"]
