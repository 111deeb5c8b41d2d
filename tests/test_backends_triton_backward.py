"""The Triton backward's T-splits: the split count per config (bwd_main_kernel's grid follows the
config's BLOCK_D) and the host's sum of the partials the kernel actually wrote (the workspaces have room
for the most splits any config takes; a launch with fewer must be summed over its own splits only)."""
import pytest
import torch
import triton

import adapterkern
from adapterkern.backends import is_available

pytestmark = pytest.mark.skipif(not is_available("triton", torch.device("cpu")) and not torch.cuda.is_available(),
                                reason="Triton is not installed")

from conftest import DEVICE, rel_err, reference_activation  # noqa: E402

H200_SMS = 132


def _bottleneck():
    from adapterkern.backends.triton import bottleneck

    return bottleneck


@pytest.mark.parametrize("block_d", [32, 64, 128])
@pytest.mark.parametrize("block_t", [16, 32, 64])
def test_split_count_at_the_target_shape(block_t, block_d):
    """T = 16384, d = 4096, r = 64 on an H200: two programs per SM, whatever BLOCK_D the autotuner takes."""
    b = _bottleneck()
    d_blocks = 4096 // block_d
    splits = b.bwd_splits(16384, d_blocks, block_t, 2 * H200_SMS, b.MIN_SPLIT_TOKENS)
    assert splits == {32: 2, 64: 4, 128: 8}[block_d]
    assert d_blocks * splits == 256  # 1.94 programs per SM: 97% of two whole waves of one program per SM


@pytest.mark.parametrize("num_tokens", [1, 17, 256, 1000, 16384, 100000])
@pytest.mark.parametrize("per_split", [1, 3, 32, 64, 128, 200, 264, 1000])
@pytest.mark.parametrize("block_t", [16, 32, 64])
def test_split_count_fills_without_overfilling(num_tokens, per_split, block_t):
    b = _bottleneck()
    programs = 2 * H200_SMS
    splits = b.bwd_splits(num_tokens, per_split, block_t, programs, b.MIN_SPLIT_TOKENS)
    assert 1 <= splits <= triton.cdiv(num_tokens, block_t)  # never more splits than token blocks
    assert splits <= triton.cdiv(num_tokens, b.MIN_SPLIT_TOKENS)
    assert splits == 1 or splits * per_split <= programs  # within the programs wanted ...
    if splits < triton.cdiv(num_tokens, b.MIN_SPLIT_TOKENS):
        assert (splits + 1) * per_split > programs  # ... and as many as fit there


FORMS = ("one", "stack", "batch")  # one adapter; N adapters on every token; each token through its adapter (or none)


def _case(form, T, d, r, n=2):
    """float32 inputs (leaves requiring grad) of one call of ``form``: weights (n, r, d) / (n, d, r), biases,
    per-channel scales (n, d); ``index`` (T,) in [-1, n) for the batch."""
    n = 1 if form == "one" else n
    g = torch.Generator().manual_seed(T + d + r + n)

    def rand(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(DEVICE).requires_grad_()

    return dict(x=rand(T, d), w_down=rand(n, r, d, s=d ** -0.5), b_down=rand(n, r, s=0.5),
                w_up=rand(n, d, r, s=r ** -0.5), b_up=rand(n, d, s=0.5),
                scaling=(torch.rand(n, d, generator=g) + 0.5).to(DEVICE).requires_grad_(),
                index=torch.randint(-1, n, (T,), generator=g).to(DEVICE))


LEAVES = ("x", "w_down", "b_down", "w_up", "b_up", "scaling")


def _triton(form, c):
    if form == "one":
        return adapterkern.bottleneck_adapter(c["x"], c["w_down"][0], c["b_down"][0], c["w_up"][0], c["b_up"][0],
                                              activation="gelu", scaling=c["scaling"][0], backend="triton")
    weights = (c["w_down"], c["b_down"], c["w_up"], c["b_up"])
    if form == "stack":
        return adapterkern.multi_adapter(c["x"], *weights, activation="gelu", scaling=c["scaling"], backend="triton")
    return adapterkern.bottleneck_adapter_batched(c["x"], c["index"], *weights, activation="gelu", scaling=c["scaling"],
                                                  backend="triton")


def _reference(form, c):
    """float64: y[n] = x + s_n * (act(x @ w_down[n].T + b_down[n]) @ w_up[n].T + b_up[n]) for the stack,
    y[0] for one adapter, row t of y[index[t]] (x where index[t] = -1) for the batch."""
    f = {k: c[k].detach().double().requires_grad_() for k in LEAVES}
    act = reference_activation("gelu")
    ys = torch.stack([f["x"] + f["scaling"][k] * (act(f["x"] @ f["w_down"][k].t() + f["b_down"][k]) @ f["w_up"][k].t()
                                                   + f["b_up"][k]) for k in range(f["w_down"].shape[0])])
    if form == "one":
        ys = ys[0]
    elif form == "batch":
        index = c["index"]
        rows = ys[index.clamp_min(0), torch.arange(len(index), device=index.device)]
        ys = torch.where((index >= 0)[:, None], rows, f["x"])
    return ys, f


@pytest.mark.parametrize("form", FORMS)
def test_partials_are_summed_over_the_launched_splits(form, monkeypatch, poison_empty):
    """bwd_main_kernel with a config that takes fewer T-splits than another of its configs: the workspaces
    have room for the other's, and only the launched splits' rows (written, the rest NaN) are summed."""
    from adapterkern.backends.triton import kernels

    T, d, r = 100, 64, 8
    few, many = (triton.Config({"BLOCK_T": 16, "BLOCK_D": bd}, num_warps=4, num_stages=1) for bd in (16, 64))
    adapters = 1 if form != "stack" else 2
    splits_of = _bottleneck().bwd_split_count(T, d, adapters, DEVICE)
    if not splits_of(few.kwargs) < splits_of(many.kwargs):
        pytest.skip(f"on {DEVICE} both configs take {splits_of(few.kwargs)} T-splits at T = {T}")
    monkeypatch.setattr(kernels.bwd_main_kernel, "configs", [few, many])
    monkeypatch.setattr(kernels.bwd_main_kernel, "early_config_prune", lambda configs, named, **kw: configs[:1])
    monkeypatch.setattr(kernels.bwd_main_kernel, "cache", {})  # no earlier pick for this key

    c = _case(form, T, d, r)
    y = _triton(form, c)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    grads = torch.autograd.grad(y, [c[k] for k in LEAVES], dy)
    assert kernels.bwd_main_kernel.best_config is few
    y_ref, f = _reference(form, c)
    refs = torch.autograd.grad(y_ref, [f[k] for k in LEAVES], dy.double())
    assert rel_err(y, y_ref) < 1e-5
    for name, g, ref in zip(LEAVES, grads, refs):
        assert rel_err(g, ref) < 1e-4, name
