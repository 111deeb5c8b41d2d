"""The slot layer under add_adapter / add_fusion: the table of config kinds that saving, loading,
activating and deleting dispatch on, and all-or-nothing edits of a model."""
import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers not installed (it is in the test extra)")
pytest.importorskip("safetensors", reason="safetensors not installed (it is in the test extra)")

import adapterkern as ak  # noqa: E402
from adapterkern.integrations.compose import Fuse, FusionConfig, add_fusion  # noqa: E402
from adapterkern.integrations.slots import CONFIG_KINDS, SlotConfig, config_class, iter_slots  # noqa: E402

from test_integrations_transformers import run, tiny_model  # noqa: E402


def test_the_table_names_every_kind():
    assert CONFIG_KINDS == {"adapter": ak.AdapterConfig, "fusion": FusionConfig}
    for kind, cls in CONFIG_KINDS.items():
        assert cls.kind == kind and config_class(kind) is cls
    for bad in ("lora", None, ["adapter"]):
        with pytest.raises(ValueError, match="kind: expected one of adapter, fusion"):
            config_class(bad)


def test_a_kind_is_taken_once():
    with pytest.raises(TypeError, match="'fusion' is already the kind of .*FusionConfig"):

        class Another(SlotConfig, kind="fusion"):  # noqa: F841
            pass

    assert CONFIG_KINDS["fusion"] is FusionConfig


def _model_with_fusion():
    model = tiny_model("bert")
    for name in ("a", "b"):
        ak.add_adapter(model, name, ak.AdapterConfig.pfeiffer(bottleneck_size=4))
    add_fusion(model, "fz", ["a", "b"])
    return model


def test_saved_kind_round_trips(tmp_path):
    model = _model_with_fusion()
    for name, cls in (("a", ak.AdapterConfig), ("fz", FusionConfig)):
        directory = ak.save_adapter(model, name, tmp_path / name)
        meta = json.loads((directory / "adapter_config.json").read_text())
        assert meta["kind"] == cls.kind
    other = tiny_model("bert")
    ak.load_adapter(other, tmp_path / "a")
    ak.load_adapter(other, tmp_path / "a", name="b")
    ak.load_adapter(other, tmp_path / "fz")
    assert [type(ak.integrations.transformers.get_adapter_config(other, n)) for n in ("a", "b", "fz")] == [
        ak.AdapterConfig, ak.AdapterConfig, FusionConfig
    ]


@pytest.mark.parametrize("kind", ["lora", 3])
def test_unknown_kind_in_a_saved_file_is_refused(tmp_path, kind):
    src = tiny_model("bert")
    ak.add_adapter(src, "a", ak.AdapterConfig.pfeiffer(bottleneck_size=4))
    directory = ak.save_adapter(src, "a", tmp_path / "a")
    meta_path = directory / "adapter_config.json"
    meta = json.loads(meta_path.read_text())
    meta["kind"] = kind  # the SHA-256 covers the weights only: the file still passes the integrity check
    meta_path.write_text(json.dumps(meta))
    target = tiny_model("bert")
    keys = list(target.state_dict())
    with pytest.raises(ValueError, match=r"kind: expected one of adapter, fusion, got .*the model was not changed"):
        ak.load_adapter(target, directory)
    assert ak.list_adapters(target) == [] and list(target.state_dict()) == keys
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in target.modules())


def test_deleting_the_active_fusion_clears_its_slots():
    model = _model_with_fusion()
    fused = [slot for _, _, slot in iter_slots(model) if "fz" in slot]
    assert fused and all(slot.active == Fuse("fz", ("a", "b")) for slot in fused)
    ak.delete_adapter(model, "fz")
    assert ak.get_active_adapter(model) is None
    assert all(slot.active is None for _, _, slot in iter_slots(model))
    ak.set_active_adapter(model, "b")
    run(model, torch.randint(0, 97, (1, 4)))


def test_a_place_of_another_mode_leaves_the_model_unchanged():
    """The second adapter's places are all checked before any is changed: its first place is free,
    a later one holds sequential adapters."""
    model = tiny_model("bert")
    ak.add_adapter(model, "seq", ak.AdapterConfig.pfeiffer(bottleneck_size=4))  # N.output.dense
    before = copy.deepcopy(model)
    config = ak.AdapterConfig.parallel(bottleneck_size=4, target_modules=["attention.output.dense", r"\d+\.output\.dense"])
    with pytest.raises(ValueError, match="already holds sequential adapters"):
        ak.add_adapter(model, "par", config)
    assert ak.list_adapters(model) == ["seq"]
    assert list(model.state_dict()) == list(before.state_dict())
    assert [len(m._forward_hooks) for m in model.modules()] == [len(m._forward_hooks) for m in before.modules()]
