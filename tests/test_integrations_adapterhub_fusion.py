"""adapterkern.nn.AdapterFusion against the AdapterHub ``adapters`` library's own ``BertFusion``
(adapters/methods/modeling.py), fed as the library's ``compose_fuse`` feeds it (the N adapters' ``up``
stacked on dim -2, passed as both key and value): the same seed gives the same initial weights, the
library's state dict loads into ours, and the outputs, attention probabilities, gradients and the
temperature state agree over several calls in train mode (dropout on: the same seed draws the same
mask) and in eval mode, for the "dynamic" and "static" presets and every config branch; and on a tiny
BERT with a Fuse block, adapterkern's fuse_adapters reproduces the library's fused layer output.
Run by ``make test-adapterhub`` (the library's own venv); elsewhere the module skips, unless
ADAPTERKERN_REQUIRE_ADAPTERS=1.
"""
import itertools
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from conftest import import_adapters  # noqa: E402

adapters = import_adapters()

import torch  # noqa: E402
from adapters import AdapterFusionConfig  # noqa: E402
from adapters.methods.modeling import BertFusion  # noqa: E402

from adapterkern.nn import AdapterFusion, fusion_regularization_loss  # noqa: E402
from conftest import rel_err  # noqa: E402

D, N = 24, 3
TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


pytestmark = pytest.mark.usefixtures("one_thread")


def pair(cfg, dtype, dropout=0.0, seed=0):
    """The library's BertFusion and ours from the same seed, then both given the same random
    (non-initial) weights, in ``dtype``."""
    torch.manual_seed(seed)
    lib = BertFusion(cfg, D, dropout)
    torch.manual_seed(seed)
    ours = AdapterFusion(D, config=cfg, attention_probs_dropout_prob=dropout)
    lib_init = lib.state_dict()
    assert list(ours.state_dict()) == list(lib_init)
    for k, v in ours.state_dict().items():  # the same initialisation, bit for bit
        assert torch.equal(v, lib_init[k]), k
    lib, ours = lib.to(dtype), ours.to(dtype)
    with torch.no_grad():
        for p in lib.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    ours.load_state_dict(lib.state_dict())
    assert (lib.T, lib.reduction) == (ours.T, ours.reduction)
    return lib, ours


def run_both(lib, ours, dtype, seed):
    z, h = torch.randn(2, 5, D, dtype=dtype), torch.randn(2, 5, D, dtype=dtype)
    U = torch.randn(N, 2, 5, D, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (z, U, h)] + [t.clone().requires_grad_() for t in (z, U, h)]
    up = leaves[1].permute(1, 2, 0, 3) * 1.0  # compose_fuse: stack(ups).permute(1, 2, 0, 3); a non-leaf (the library adds in place)
    torch.manual_seed(seed)
    y_lib, a_lib = lib(leaves[0], up, up, leaves[2], output_attentions=True)
    torch.manual_seed(seed)
    y, a = ours(leaves[3], leaves[4], leaves[5], output_attentions=True)
    return y_lib, torch.as_tensor(a_lib), y, a, leaves


CONFIGS = {"dynamic": {}, "static": {}}
CONFIGS.update({
    f"dynamic-{'-'.join(k for k, v in zip(('residual_before', 'value_after_softmax', 'temperature'), bits) if v) or 'plain'}": dict(
        residual_before=bits[0], value_before_softmax=not bits[1], temperature=bits[2]
    )
    for bits in itertools.product([False, True], repeat=3)
    if any(bits)
})
CONFIGS.update({"static-residual_before-temperature": dict(residual_before=True, temperature=True),
                "no-query": dict(query=False), "no-key": dict(key=False), "value-only": dict(query=False, key=False),
                "value-not-initialized": dict(value_initialized=False)})


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_bert_fusion(name, dtype):
    base = "static" if name.startswith("static") else "dynamic"
    cfg = AdapterFusionConfig.load(base, **CONFIGS[name])
    lib, ours = pair(cfg, dtype, dropout=0.2)
    names = [k for k, _ in ours.named_parameters()]
    # train, train, eval, eval: the temperature falls on every call in both modes, in both modules
    for step, mode in enumerate(("train", "train", "eval", "eval")):
        lib.train(mode == "train"), ours.train(mode == "train")
        T_before = ours.T
        y_lib, a_lib, y, a, leaves = run_both(lib, ours, dtype, seed=100 + step)
        assert ours.T == lib.T and (ours.T < T_before or T_before == 1.0)
        assert rel_err(y, y_lib) <= TOL[dtype], (mode, rel_err(y, y_lib))
        assert rel_err(a, a_lib) <= TOL[dtype]
        dy = torch.randn_like(y)
        g_lib = torch.autograd.grad(y_lib, leaves[:3] + list(lib.parameters()), dy, allow_unused=True)
        g = torch.autograd.grad(y, leaves[3:] + list(ours.parameters()), dy, allow_unused=True)
        grads = dict(zip(["query", "adapter_outputs", "residual"] + names, zip(g_lib, g)))
        for name, (gl, go) in grads.items():
            if gl is None:  # the library's unused ``dense``
                assert go is None, name
                continue
            # d/d key.bias is 0 but for rounding without dropout (softmax ignores a per-token
            # constant): measured against the key weight's gradient there
            scale = grads["key.weight"][0] if name == "key.bias" else None
            bound = TOL[dtype] * (10 if dtype == torch.float32 else 1)
            assert rel_err(go, gl, scale) <= bound, (mode, name, rel_err(go, gl, scale))


def test_temperature_state_over_many_calls():
    cfg = AdapterFusionConfig.load("dynamic", temperature=True)
    lib, ours = pair(cfg, torch.float32)
    z, U, h = torch.randn(1, 2, D), torch.randn(N, 1, 2, D), torch.randn(1, 2, D)
    with torch.no_grad():
        for i in range(1000):
            lib.train(i % 2 == 0), ours.train(i % 2 == 0)
            up = U.permute(1, 2, 0, 3).clone()
            lib(z, up, up, h)
            ours(z, U, h)
            assert ours.T == lib.T, i
            assert (ours.T == 1.0) == (i >= 981 - 1), i  # the 982nd call is the first at T = 1
    assert ours.T == 1.0


def test_regularization_matches_model_mixin():
    """model_mixin.get_fusion_regularization_loss on a tiny BERT with two Fuse layers vs ours on the same value matrices."""
    import transformers
    from adapters import SeqBnConfig
    from adapters.composition import Fuse

    model = transformers.BertModel(transformers.BertConfig(
        hidden_size=D, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, vocab_size=50, max_position_embeddings=16,
    ))
    adapters.init(model)
    for name in ("a", "b"):
        model.add_adapter(name, config=SeqBnConfig(reduction_factor=4))
    model.add_adapter_fusion(Fuse("a", "b"), "dynamic")
    model.train_adapter_fusion(Fuse("a", "b"))
    ours = []
    for m in model.modules():
        if isinstance(m, BertFusion):
            with torch.no_grad():
                m.value.weight.add_(torch.randn_like(m.value.weight) * 0.1)
            f = AdapterFusion(D)
            f.load_state_dict(m.state_dict())
            ours.append(f)
    assert len(ours) == 2
    expected = model.get_fusion_regularization_loss()
    got = fusion_regularization_loss(ours)
    assert abs(got.item() - expected.item()) <= 1e-6 * expected.item()


def test_fuse_adapters_reproduces_a_bert_fuse_layer():
    """A tiny BERT with three SeqBn adapters under Fuse: for every fusion layer, the adapters' input,
    the fusion's query and residual are captured from the library's forward; fuse_adapters on
    BottleneckAdapter.from_linear views of the library's adapters must give the layer's fused output."""
    import transformers
    from adapters import SeqBnConfig
    from adapters.composition import Fuse
    from adapters.methods.bottleneck import BottleneckLayer

    from adapterkern.nn import BottleneckAdapter, fuse_adapters

    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(
        hidden_size=D, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=50, max_position_embeddings=16,
    ))
    adapters.init(model)
    for name, scaling in (("a", 1.0), ("b", "learned"), ("c", 0.5)):
        model.add_adapter(name, config=SeqBnConfig(reduction_factor=4, non_linearity="gelu", scaling=scaling))
    model.add_adapter_fusion(Fuse("a", "b", "c"), AdapterFusionConfig.load("dynamic", temperature=True))
    model.set_active_adapters(Fuse("a", "b", "c"))
    with torch.no_grad():  # away from the near-identity init, so every term matters
        for n, p in model.named_parameters():
            if "adapter" in n:
                p.add_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.1))
    model.eval()
    captured = {}
    hooks = []
    for layer in model.modules():
        if isinstance(layer, BottleneckLayer) and len(layer.adapter_fusion_layer):
            fusion = layer.adapter_fusion_layer["a,b,c"]

            def pre(mod, args, layer=layer):
                query, _, _, residual = args
                captured[layer] = dict(query=query.detach().clone(), residual=residual.detach().clone(), T=mod.T)

            def post(mod, args, out, layer=layer):
                captured[layer]["out"] = out.detach().clone()

            def adapter_in(mod, args, layer=layer):
                captured.setdefault(("x", layer), args[0].detach().clone())

            hooks += [fusion.register_forward_pre_hook(pre), fusion.register_forward_hook(post),
                      layer.adapters["a"].register_forward_pre_hook(adapter_in)]
    assert hooks, "no fusion layer found"
    with torch.no_grad():
        model(torch.randint(0, 50, (2, 7)))
    for h in hooks:
        h.remove()
    assert len(captured) == 2 and all("out" in v for v in captured.values() if isinstance(v, dict))
    for layer in [k for k in captured if isinstance(k, BottleneckLayer)]:
        c = captured[layer]
        lib_fusion = layer.adapter_fusion_layer["a,b,c"]
        ours = AdapterFusion(D, 3, config=lib_fusion.config)
        ours.load_state_dict(lib_fusion.state_dict())
        ours.T = c["T"]
        ours.eval()
        ours_adapters = [
            BottleneckAdapter.from_linear(layer.adapters[n].adapter_down[0], layer.adapters[n].adapter_up, activation="gelu",
                                          scaling=layer.adapters[n].scaling, backend="torch")
            for n in ("a", "b", "c")
        ]
        with torch.no_grad():
            y = fuse_adapters(captured[("x", layer)], ours_adapters, ours, residual=c["residual"], query=c["query"])
        assert rel_err(y, c["out"]) <= 2e-5, rel_err(y, c["out"])
        assert not torch.equal(c["residual"], c["query"])  # SeqBn: residual before the LayerNorm, query after
