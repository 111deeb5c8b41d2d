"""Several adapters at once on add_adapter models: per-sequence routing, AdapterDrop, multi-task
forward with shared lower layers. References: the same model run one adapter at a time."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers not installed (it is in the test extra)")

import adapterkern as ak  # noqa: E402
from adapterkern.integrations.compose import (  # noqa: E402
    StochasticAdapterDrop,
    multi_task_forward,
    route_adapters,
    set_adapter_drop,
)
from adapterkern.integrations.transformers import adapter_modules  # noqa: E402

from conftest import rel_err  # noqa: E402
from test_integrations_transformers import randomize, run, tiny_model  # noqa: E402

NAMES = ["a", "b", "c"]


def model_with_adapters(family, config_fn=ak.AdapterConfig.houlsby, backend="torch", **kw):
    model = tiny_model(family)
    for name in NAMES:
        ak.add_adapter(model, name, config_fn(bottleneck_size=4, backend=backend, **kw))
        randomize(model, name)
    return model


def one_at_a_time(model, ids, names_per_row):
    """Each row through its own adapter (None: no adapter), one forward per row."""
    rows = []
    for i, name in enumerate(names_per_row):
        ak.set_active_adapter(model, name)
        rows.append(run(model, ids[i : i + 1]))
    return torch.cat(rows)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("placement", ["houlsby", "parallel"])
def test_route_matches_one_adapter_at_a_time(family, placement):
    model = model_with_adapters(family, getattr(ak.AdapterConfig, placement), scaling="learned")
    ids = torch.randint(0, 97, (5, 7))
    index = torch.tensor([2, 0, -1, 1, 2])
    with route_adapters(model, NAMES, index):
        out = run(model, ids)
    assert ak.get_active_adapter(model) == "c"  # restored
    expected = one_at_a_time(model, ids, [NAMES[i] if i >= 0 else None for i in index.tolist()])
    assert rel_err(out, expected) < 1e-5


def test_route_with_triton_and_gradients():
    model = model_with_adapters("bert", backend="triton")
    ids = torch.randint(0, 97, (4, 6))
    index = torch.tensor([1, 0, 1, 2])
    labels = torch.tensor([0, 1, 1, 0])
    for name in NAMES:
        ak.train_adapter(model, name)  # freezes the rest
    for p in (p for n in NAMES for a in adapter_modules(model, n).values() for p in a.parameters()):
        p.requires_grad_(True)
    with route_adapters(model, NAMES, index):
        loss = torch.nn.functional.cross_entropy(run(model, ids), labels, reduction="sum")
    loss.backward()
    routed = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    ref = copy.deepcopy(model)
    for a in ref.modules():
        if isinstance(a, ak.nn.BottleneckAdapter):
            a.backend = "torch"
    total = 0
    for i, name in enumerate(NAMES):
        rows = (index == i).nonzero().flatten()
        ak.set_active_adapter(ref, name)
        total = total + torch.nn.functional.cross_entropy(run(ref, ids[rows]), labels[rows], reduction="sum")
    total.backward()
    assert rel_err(loss.detach(), total.detach()) < 1e-5
    for k, g in routed.items():
        assert rel_err(g, dict(ref.named_parameters())[k].grad) < 1e-4, k


def test_drop_equals_leave_out():
    model = model_with_adapters("llama")
    ids = torch.randint(0, 97, (2, 7))
    ak.set_active_adapter(model, "b")
    full = run(model, ids)
    set_adapter_drop(model, 2)
    dropped = run(model, ids)
    # the model whose first 2 layers have no adapter: the same weights, placed with leave_out
    other = tiny_model("llama")
    other.load_state_dict({k: v for k, v in model.state_dict().items() if "bottleneck_adapters" not in k}, strict=False)
    ak.add_adapter(other, "b", ak.AdapterConfig.houlsby(bottleneck_size=4, leave_out=[0, 1]))
    src = adapter_modules(model, "b")
    for place, adapter in adapter_modules(other, "b").items():
        adapter.load_state_dict(src[place].state_dict())
    assert torch.equal(dropped, run(other, ids))
    assert not torch.allclose(dropped, full)
    set_adapter_drop(model, 0)
    assert torch.equal(run(model, ids), full)


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("drop", [0, 2])
def test_multi_task_forward_shares_the_lower_layers(family, drop):
    model = model_with_adapters(family)
    ids = torch.randint(0, 97, (2, 6))
    kwargs = {"attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2])}
    layers = model.bert.encoder.layer if family == "bert" else model.layers
    batch_seen = []  # the batch each layer's output has: B below `drop`, N * B from `drop` on
    handles = [layer.register_forward_hook(lambda m, a, o: batch_seen.append((o[0] if isinstance(o, tuple) else o).shape[0])) for layer in layers]
    out = multi_task_forward(model, NAMES, drop_layers=drop, input_ids=ids, **kwargs)
    for h in handles:
        h.remove()
    out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    assert batch_seen == [2] * drop + [6] * (len(layers) - drop)
    assert out.shape[0] == 3 * 2
    set_adapter_drop(model, drop)
    for i, name in enumerate(NAMES):
        ak.set_active_adapter(model, name)
        expected = model(input_ids=ids, **kwargs)
        expected = expected.logits if hasattr(expected, "logits") else expected.last_hidden_state
        assert rel_err(out[i * 2 : (i + 1) * 2], expected) < 1e-5, name
    set_adapter_drop(model, 0)


def test_stochastic_drop_is_reproducible():
    model = model_with_adapters("bert")
    a = StochasticAdapterDrop(model, seed=3)
    ks = [a.step() for _ in range(20)]
    assert set(ks) <= {0, 1, 2} and len(set(ks)) > 1
    assert [StochasticAdapterDrop(model, seed=3).step() for _ in range(1)] == ks[:1]
    b = StochasticAdapterDrop(model, seed=3)
    assert [b.step() for _ in range(20)] == ks
    from adapterkern.integrations.transformers import _iter_slots

    assert all(slot.dropped == (slot.layer < ks[-1]) for _, _, slot in _iter_slots(model))
    b.disable()
    assert not any(slot.dropped for _, _, slot in _iter_slots(model))


def test_bad_calls():
    model = model_with_adapters("bert")
    with pytest.raises(ValueError, match="no adapter 'zz'"):
        with route_adapters(model, ["a", "zz"], torch.tensor([0, 1])):
            pass
    with pytest.raises(ValueError, match="adapter_index"):
        with route_adapters(model, ["a", "b"], torch.tensor([0, 2])):
            pass
    with pytest.raises(TypeError, match="adapter_index"):
        with route_adapters(model, ["a", "b"], torch.tensor([0.0, 1.0])):
            pass
    ak.add_adapter(model, "wide", ak.AdapterConfig.houlsby(bottleneck_size=6))
    with pytest.raises(ValueError, match="bottleneck size"):
        with route_adapters(model, ["a", "wide"], torch.tensor([0, 1])):
            run(model, torch.randint(0, 97, (2, 5)))
    with pytest.raises(ValueError, match="num_layers"):
        set_adapter_drop(model, -1)
    with pytest.raises(ValueError, match="drop_layers"):
        multi_task_forward(model, ["a"], drop_layers=7, input_ids=torch.randint(0, 97, (1, 3)))
