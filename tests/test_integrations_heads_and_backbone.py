"""A task head saved and loaded with its adapter (``AdapterConfig(modules_to_save=...)``), and the
clean backbone of an ``add_adapter`` model (``backbone_state_dict`` / ``save_backbone``)."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import adapterkern as ak  # noqa: E402
from adapterkern.integrations.transformers import get_adapter_config  # noqa: E402

from test_integrations_all_or_nothing import assert_unchanged, snapshot  # noqa: E402
from test_integrations_transformers import randomize, run, tiny_model  # noqa: E402

IDS = torch.tensor([[5, 17, 42, 8, 3, 61], [9, 2, 33, 71, 14, 6]])


def _with_head(seed=0, **config):
    torch.manual_seed(seed)
    model = tiny_model("bert")
    ak.add_adapter(model, "task", ak.AdapterConfig.pfeiffer(modules_to_save=["classifier"], **config))
    randomize(model, "task")
    return model


def test_train_adapter_trains_the_config_modules_to_save():
    model = _with_head()
    summary = ak.train_adapter(model, "task")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert all(".bottleneck_adapters.task." in n or n.startswith("classifier.") for n in trainable), trainable
    assert summary.trainable == sum(p.numel() for n, p in model.named_parameters() if n in trainable)


def test_head_round_trips_with_the_adapter(tmp_path):
    model = _with_head()
    with torch.no_grad():
        model.classifier.weight.normal_()
        model.classifier.bias.normal_()
    expected = run(model, IDS)
    ak.save_adapter(model, "task", tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["modules_to_save"] == ["classifier"]
    assert {"classifier.weight", "classifier.bias"} <= set(meta["tensors"])
    assert not any(k.startswith(("bert.embeddings", "bert.encoder.layer.0.attention")) for k in meta["tensors"])

    torch.manual_seed(123)  # another random head and backbone init: the backbone is copied, the head must come from the file
    fresh = tiny_model("bert")
    backbone = {k: v for k, v in ak.backbone_state_dict(model).items() if not k.startswith("classifier.")}
    fresh.load_state_dict(backbone, strict=False)
    assert not torch.equal(fresh.classifier.weight, model.classifier.weight)
    ak.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(run(fresh, IDS), expected, rtol=0, atol=0)
    assert get_adapter_config(fresh, "task").modules_to_save == ("classifier",)


def test_head_of_another_shape_is_refused_before_the_model_changes(tmp_path):
    model = _with_head()
    ak.save_adapter(model, "task", tmp_path)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=97, num_labels=5)
    other = transformers.BertForSequenceClassification(cfg).eval()
    before = snapshot(other)
    with pytest.raises(ValueError, match=r"classifier\.weight.*shape"):
        ak.load_adapter(other, tmp_path)
    assert ak.list_adapters(other) == []
    assert_unchanged(other, before)


def test_a_file_naming_a_missing_head_module_is_refused(tmp_path):
    model = _with_head()
    ak.save_adapter(model, "task", tmp_path)
    other = transformers.BertForMaskedLM(model.config).eval()  # the same places, no classifier
    with pytest.raises(ValueError, match="classifier.*does not have"):
        ak.load_adapter(other, tmp_path)
    assert ak.list_adapters(other) == []


@pytest.mark.parametrize("names, match", [
    (["nonexistent"], "no module named 'nonexistent'"),
    (["encoder"], "holds adapter places"),
    (["output.dense"], "holds adapter places"),
])
def test_bad_modules_to_save_are_refused_by_add_adapter(names, match):
    model = tiny_model("bert")
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        ak.add_adapter(model, "x", ak.AdapterConfig.pfeiffer(modules_to_save=names))
    assert ak.list_adapters(model) == []
    assert_unchanged(model, before)


def test_modules_to_save_type_errors():
    with pytest.raises(ValueError, match="modules_to_save"):
        ak.AdapterConfig.pfeiffer(modules_to_save=[3])


def test_state_dict_holds_the_adapters_backbone_state_dict_does_not():
    plain = tiny_model("bert")
    model = tiny_model("bert")
    model.load_state_dict(plain.state_dict())
    ak.add_adapter(model, "a", ak.AdapterConfig.houlsby())
    ak.add_adapter(model, "b", ak.AdapterConfig.parallel())
    full = model.state_dict()
    adapter_keys = {k for k in full if ".bottleneck_adapters." in k}
    assert adapter_keys and any(".bottleneck_adapters.a." in k for k in adapter_keys) \
        and any(".bottleneck_adapters.b." in k for k in adapter_keys)
    assert set(full) - adapter_keys == set(plain.state_dict())  # the backbone's keys do not change
    clean = ak.backbone_state_dict(model)
    assert set(clean) == set(plain.state_dict())
    assert all(torch.equal(clean[k], v) for k, v in plain.state_dict().items())


def test_save_backbone_loads_without_adapterkern_keys(tmp_path, caplog):
    torch.manual_seed(0)
    model = tiny_model("bert")
    expected = run(model, IDS)
    ak.add_adapter(model, "a", ak.AdapterConfig.pfeiffer())
    randomize(model, "a")
    ak.save_backbone(model, tmp_path / "clean")
    model.save_pretrained(tmp_path / "mixed")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "clean" / "model.safetensors"), "pt") as f:
        assert not any("bottleneck_adapters" in k for k in f.keys())
    with safe_open(str(tmp_path / "mixed" / "model.safetensors"), "pt") as f:
        assert any("bottleneck_adapters" in k for k in f.keys())  # what save_pretrained alone writes
    reloaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "clean").eval()
    torch.testing.assert_close(run(reloaded, IDS), expected, rtol=0, atol=0)
    with pytest.raises(TypeError, match="state_dict"):
        ak.save_backbone(model, tmp_path / "x", state_dict={})


def test_backbone_state_dict_is_refused_on_an_optimised_model():
    model = tiny_model("bert")
    ak.add_adapter(model, "a", ak.AdapterConfig.parallel())
    ak.optimize_for_inference(model)
    with pytest.raises(RuntimeError, match="backbone_state_dict"):
        ak.backbone_state_dict(model)
