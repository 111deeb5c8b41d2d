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
    from adapterkern.integrations.slots import iter_slots

    assert all(slot.dropped == (slot.layer < ks[-1]) for _, _, slot in iter_slots(model))
    b.disable()
    assert not any(slot.dropped for _, _, slot in iter_slots(model))


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


def test_fusion_over_named_adapters(tmp_path):
    """add_fusion == the fusion layer applied by hand to the adapters' outputs at each place; stage-2
    training touches the fusion only; save/load round trip."""
    from adapterkern.integrations.compose import add_fusion
    from adapterkern.nn.fusion import AdapterFusion

    model = model_with_adapters("llama", ak.AdapterConfig.pfeiffer)
    ids = torch.randint(0, 97, (2, 6))
    add_fusion(model, "fz", NAMES, "dynamic")
    fusions = adapter_modules(model, "fz")
    assert len(fusions) == 3 and all(isinstance(f, AdapterFusion) for f in fusions.values())
    with torch.no_grad():
        for f in fusions.values():
            for p in f.parameters():
                p.add_(torch.randn_like(p) * 0.3)
            f.T = 1.0
            f.reduction = 0.0
    out = run(model, ids)

    # by hand: hooks on the same places computing the library formula from each adapter's own module
    ref = copy.deepcopy(model)
    ak.set_active_adapter(ref, None)
    ref_places = {n: ref.get_submodule(n) for n in fusions}

    def manual(place):
        slot = ref_places[place].bottleneck_adapters

        def hook(module, args, output):
            ups = torch.stack([slot[n](output) - output for n in NAMES])  # each adapter's contribution
            f = slot["fz"]
            q, k = f.query(output), f.key(ups)
            probs = torch.softmax((q.unsqueeze(0) * k).sum(-1) / f.T, dim=0)
            return output + f.value((probs.unsqueeze(-1) * ups).sum(0))

        return hook

    handles = [m.register_forward_hook(manual(n)) for n, m in ref_places.items()]
    expected = run(ref, ids)
    for h in handles:
        h.remove()
    assert rel_err(out, expected) < 1e-5
    assert not torch.allclose(out, run(ref, ids))

    summary = ak.train_adapter(model, "fz")
    assert summary.trainable == sum(p.numel() for f in fusions.values() for p in f.parameters())
    run(model, ids).square().mean().backward()
    assert all(p.grad is None for n in NAMES for a in adapter_modules(model, n).values() for p in a.parameters())
    assert all(p.grad is not None for f in fusions.values() for p in f.parameters())

    directory = ak.save_adapter(model, "fz", tmp_path / "fz")
    other = copy.deepcopy(model)
    ak.delete_adapter(other, "fz")
    with pytest.raises(ValueError, match="fusion"):
        ak.delete_adapter(model, "a")
    assert ak.load_adapter(other, directory) == "fz"
    for f in adapter_modules(other, "fz").values():
        f.T, f.reduction = 1.0, 0.0
    assert rel_err(run(other, ids), out) < 1e-6
    bare = tiny_model("llama")
    with pytest.raises(ValueError, match="add or load those adapters first"):
        ak.load_adapter(bare, directory)
