"""adapterkern's bottleneck adapters as a PEFT method (adapterkern.peft), against adapterkern's own
add_adapter path: same places, same numbers; PEFT's save / load / several adapters / disable / heads."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("safetensors")

import adapterkern as ak  # noqa: E402
import adapterkern.peft  # noqa: E402,F401
from adapterkern.integrations.peft_method import check_peft_version  # noqa: E402
from adapterkern.peft import BottleneckConfig  # noqa: E402
from safetensors import safe_open  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[5, 17, 42, 8, 3, 61], [9, 2, 33, 71, 14, 6]])
TINY = dict(num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, vocab_size=97)


def _base(family, directory=None):
    """A tiny random-weight model (seeded), saved to ``directory`` and loaded from there when given."""
    torch.manual_seed(0)
    if family == "bert":
        model = transformers.BertForSequenceClassification(transformers.BertConfig(hidden_size=32, **TINY))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(hidden_size=32, num_key_value_heads=2, **TINY))
    if directory is not None:
        model.save_pretrained(directory)
        model = type(model).from_pretrained(directory)
    return model.eval()


def _task(family):
    return "SEQ_CLS" if family == "bert" else "CAUSAL_LM"


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _randomise(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "bottleneck_adapters" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


PRESETS = {"pfeiffer": ak.AdapterConfig.pfeiffer, "houlsby": ak.AdapterConfig.houlsby, "parallel": ak.AdapterConfig.parallel}


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("preset, options", [("pfeiffer", {}), ("houlsby", {"scaling": "learned"}),
                                             ("parallel", {"reduction_factor": 4})])
def test_peft_model_computes_what_add_adapter_computes(family, preset, options):
    own = _base(family)
    ak.add_adapter(own, "default", PRESETS[preset](**options))
    pm = peft.get_peft_model(_base(family), BottleneckConfig(preset=preset, task_type=_task(family), **options))
    inner = pm.get_base_model()
    own_places = [n for n, _ in own.named_modules() if n.endswith("bottleneck_adapters")]
    assert [n for n, _ in inner.named_modules() if n.endswith("bottleneck_adapters")] == own_places and own_places
    _randomise(own)
    _randomise(inner)
    torch.testing.assert_close(_logits(pm), _logits(own), rtol=0, atol=0)  # the same code computes both
    own_sd = {k: v for k, v in own.state_dict().items() if "bottleneck_adapters" in k}
    assert own_sd.keys() == {k for k in inner.state_dict() if "bottleneck_adapters" in k}


def test_trainable_parameters_and_a_training_step():
    pm = peft.get_peft_model(_base("bert"), BottleneckConfig(preset="pfeiffer", task_type="SEQ_CLS"))
    trainable, total = pm.get_nb_trainable_parameters()
    d, r, layers, labels = 32, 2, 3, 2
    adapter = layers * (2 * d * r + r + d)
    head = d * labels + labels  # the classifier, wrapped by PEFT (modules_to_save) and trained
    assert trainable == adapter + head
    assert total == sum(p.numel() for p in _base("bert").parameters()) + adapter + head  # + PEFT's copy of the head
    pm.train()
    loss = torch.nn.functional.cross_entropy(pm(input_ids=IDS).logits, torch.tensor([0, 1]))
    loss.backward()
    grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(p.grad is None for n, p in pm.named_parameters() if not p.requires_grad)
    assert any("bottleneck_adapters.default.adapter_up" in n and g.abs().sum() > 0 for n, g in grads.items())


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_save_pretrained_writes_the_adapter_only_and_auto_peft_reloads_it(family, tmp_path):
    pm = peft.get_peft_model(_base(family, tmp_path / "base"),
                             BottleneckConfig(preset="houlsby", scaling="channel", task_type=_task(family)))
    _randomise(pm.get_base_model())
    if family == "bert":
        with torch.no_grad():
            pm.base_model.model.classifier.modules_to_save["default"].weight.normal_()
    expected = _logits(pm)
    pm.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADAPTERKERN_BOTTLENECK" and "import adapterkern.peft" in config["loader"]
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    heads = [k for k in keys if "bottleneck_adapters" not in k]
    assert heads == (["base_model.model.classifier.bias", "base_model.model.classifier.weight"] if family == "bert" else [])
    assert len(keys) - len(heads) == 3 * 2 * 5  # 3 layers x 2 places x (down w, b, up w, b, channel scaling)
    auto = peft.AutoPeftModelForSequenceClassification if family == "bert" else peft.AutoPeftModelForCausalLM
    torch.testing.assert_close(_logits(auto.from_pretrained(tmp_path / "adapter").eval()), expected, rtol=0, atol=0)
    reloaded = peft.PeftModel.from_pretrained(_base(family, tmp_path / "base2"), tmp_path / "adapter").eval()
    torch.testing.assert_close(_logits(reloaded), expected, rtol=0, atol=0)


def test_several_adapters_set_delete_and_disable():
    base_logits = _logits(_base("bert"))
    pm = peft.get_peft_model(_base("bert"), BottleneckConfig(preset="pfeiffer", task_type="SEQ_CLS"))
    pm.add_adapter("par", BottleneckConfig(preset="parallel", task_type="SEQ_CLS"))
    _randomise(pm.get_base_model())
    out_default = _logits(pm)
    assert pm.active_adapter == "default"
    pm.set_adapter("par")
    out_par = _logits(pm)
    assert ak.get_active_adapter(pm.get_base_model()) == "par"
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert any(".par." in n for n in trainable) and not any("bottleneck_adapters.default." in n for n in trainable)
    assert (out_par - out_default).abs().max() > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "irregular" warning from PEFT's status check
        with pm.disable_adapter():
            out_off = _logits(pm)
    assert ak.get_active_adapter(pm.get_base_model()) == "par"
    torch.testing.assert_close(out_off, base_logits, rtol=0, atol=0)  # no adapter, the original head
    with pm.disable_adapter():
        assert ak.get_active_adapter(pm.get_base_model()) is None
    torch.testing.assert_close(_logits(pm), out_par, rtol=0, atol=0)
    status = pm.get_model_status()
    assert status.enabled is True and status.active_adapters == ["par"] and status.available_adapters == ["default", "par"]
    pm.delete_adapter("par")
    assert ak.list_adapters(pm.get_base_model()) == ["default"] and pm.active_adapters == ["default"]
    torch.testing.assert_close(_logits(pm), out_default, rtol=0, atol=0)
    with pytest.raises(ValueError, match="one adapter is active at a time"):
        pm.base_model.set_adapter(["default", "default2"])


def test_disable_adapter_gives_the_backbone():
    base = _base("llama")
    expected = _logits(base)
    pm = peft.get_peft_model(_base("llama"), BottleneckConfig(preset="houlsby", task_type="CAUSAL_LM"))
    _randomise(pm.get_base_model())
    assert (_logits(pm) - expected).abs().max() > 1e-3
    with pm.disable_adapter():
        torch.testing.assert_close(_logits(pm), expected, rtol=0, atol=0)


def test_merge_is_refused_and_unload_gives_the_plain_model():
    expected = _logits(_base("llama"))
    pm = peft.get_peft_model(_base("llama"), BottleneckConfig(preset="parallel", task_type="CAUSAL_LM"))
    _randomise(pm.get_base_model())
    for merge in (pm.merge_and_unload, pm.merge_adapter):
        with pytest.raises(ValueError, match="not a weight delta.*optimize_for_inference"):
            merge()
    assert ak.list_adapters(pm.get_base_model()) == ["default"]  # refused before anything changed
    plain = pm.unload()
    assert ak.list_adapters(plain) == [] and not any("bottleneck_adapters" in k for k in plain.state_dict())
    torch.testing.assert_close(_logits(plain), expected, rtol=0, atol=0)


def test_layers_to_transform_and_bad_configs():
    pm = peft.get_peft_model(_base("bert"), BottleneckConfig(preset="pfeiffer", layers_to_transform=[1], task_type="SEQ_CLS"))
    places = [n for n, _ in pm.get_base_model().named_modules() if n.endswith("bottleneck_adapters")]
    assert places == ["bert.encoder.layer.1.output.dense.bottleneck_adapters"]
    with pytest.raises(ValueError, match="MAM's adapter is 'parallel'"):
        BottleneckConfig(preset="mam")
    with pytest.raises(ValueError, match="give one of them"):
        BottleneckConfig(layers_to_transform=[0], leave_out=[1])
    with pytest.raises(ValueError, match="activation"):
        BottleneckConfig(activation="no-such-activation")
    model = _base("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layers_to_transform: this model has no layers \[7\]"):
        peft.get_peft_model(model, BottleneckConfig(layers_to_transform=[7], task_type="SEQ_CLS"))
    assert ak.list_adapters(model) == [] and before.keys() == model.state_dict().keys()


def test_untested_peft_versions_are_refused(monkeypatch):
    monkeypatch.setattr(peft, "__version__", "0.99.0")
    monkeypatch.delenv("ADAPTERKERN_PEFT_ANY_VERSION", raising=False)
    with pytest.raises(ImportError, match="tested with peft 0.21.x, not 0.99.0"):
        check_peft_version()
    monkeypatch.setenv("ADAPTERKERN_PEFT_ANY_VERSION", "1")
    check_peft_version()


def test_loading_without_adapterkern_peft_names_the_missing_type(tmp_path):
    pm = peft.get_peft_model(_base("bert", tmp_path / "base"), BottleneckConfig(task_type="SEQ_CLS"))
    pm.save_pretrained(tmp_path / "adapter")
    code = ("import peft, sys\n"
            "try:\n    peft.PeftConfig.from_pretrained(sys.argv[1])\n"
            "except KeyError as exc:\n    print('KeyError', exc)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "adapter")], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "KeyError 'ADAPTERKERN_BOTTLENECK'" in out.stdout
