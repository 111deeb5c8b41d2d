"""The Triton decode kernels (T <= 64: the d-reduction split across programs, then a deterministic
second pass) against float64 maths written here, and against the one-row-tile kernel they replace
there; NaN-poisoned outputs, every element written. The default (auto) also sends every small-T test
of test_functional*.py through them; here ``force`` / ``off`` pin each path."""
import pytest
import torch

from adapterkern.backends import is_available

pytestmark = pytest.mark.skipif(not is_available("triton", torch.device("cpu")) and not torch.cuda.is_available(),
                                reason="Triton is not installed")

from conftest import rel_err, stack_case, stack_reference  # noqa: E402

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def _bottleneck():
    from adapterkern.backends.triton import bottleneck

    return bottleneck


def _run(c, mode, monkeypatch, activation="gelu_new", scale_value=0.5, add_residual=True, save_preact=True):
    from adapterkern.activations import get_activation

    monkeypatch.setenv(_bottleneck().DECODE_ENV, mode)
    return _bottleneck().multi_adapter_forward(
        c["x"], c["w_down"], c["b_down"], c["w_up"], c["b_up"], c["scale"], scale_value, c["residual"], add_residual,
        get_activation(activation).kernel_id, save_preact,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("n,T,d,r", [(1, 1, 100, 8), (1, 5, 768, 48), (2, 16, 200, 5), (3, 64, 96, 64), (1, 33, 1000, 17)])
def test_decode_kernels_match_float64_and_the_tiled_kernel(dtype, n, T, d, r, monkeypatch, poison_empty):
    c = stack_case(n, T, d, r, dtype, seed=T + d)
    y_ref, h_ref = stack_reference(c, "gelu_new", 0.5, True)
    y_dec, h_dec = _run(c, "force", monkeypatch)
    y_old, h_old = _run(c, "off", monkeypatch)
    for y, h in ((y_dec, h_dec), (y_old, h_old)):
        assert torch.isfinite(y).all() and torch.isfinite(h).all()  # every element written (poisoned with NaN)
        assert rel_err(y, y_ref) <= TOL[dtype], (dtype, n, T, d, r)
        assert rel_err(h, h_ref) <= TOL[dtype]
    bound = 2 * max(rel_err(y_old, y_ref), torch.finfo(dtype).eps)  # no worse than the kernel it replaces, twice over
    assert rel_err(y_dec, y_ref) <= max(bound, TOL[dtype])


@pytest.mark.parametrize("variant", ["no_biases", "learned_scale", "float_scale", "residual", "no_residual", "no_preact"])
def test_decode_kernel_variants(variant, monkeypatch, poison_empty):
    options = dict(biases=variant != "no_biases", residual=variant == "residual",
                   scale={"learned_scale": "learned", "float_scale": None}.get(variant, "channel"))
    c = stack_case(2, 7, 130, 12, torch.float32, **options)
    add_residual, save_preact = variant != "no_residual", variant != "no_preact"
    y_ref, h_ref = stack_reference(c, "silu", 1.7, add_residual)
    y, h = _run(c, "force", monkeypatch, activation="silu", scale_value=1.7, add_residual=add_residual,
                save_preact=save_preact)
    assert rel_err(y, y_ref) <= TOL[torch.float32]
    if save_preact:
        assert rel_err(h, h_ref) <= TOL[torch.float32]
    else:
        assert h.numel() == 0


def test_decode_kernels_are_deterministic(monkeypatch):
    c = stack_case(1, 9, 700, 32, torch.float32, seed=3)
    first, _ = _run(c, "force", monkeypatch)
    for _ in range(2):
        again, _ = _run(c, "force", monkeypatch)
        assert torch.equal(again, first)


def test_when_the_decode_kernels_run(monkeypatch):
    b = _bottleneck()
    monkeypatch.delenv(b.DECODE_ENV, raising=False)
    assert b.use_decode_kernels(1, False) and b.use_decode_kernels(b.DECODE_MAX_TOKENS, False)
    assert not b.use_decode_kernels(b.DECODE_MAX_TOKENS + 1, False)
    assert b.use_decode_kernels(1, False, 128) and not b.use_decode_kernels(1, False, 129)  # R_PAD 256: spills
    assert not b.use_decode_kernels(4, True) and not b.use_decode_kernels(0, False)  # token groups; nothing to do
    monkeypatch.setenv(b.DECODE_ENV, "off")
    assert not b.use_decode_kernels(1, False)
    monkeypatch.setenv(b.DECODE_ENV, "force")
    assert b.use_decode_kernels(1000, False) and not b.use_decode_kernels(1000, True)
    monkeypatch.setenv(b.DECODE_ENV, "sometimes")
    with pytest.raises(ValueError, match="ADAPTERKERN_TRITON_DECODE"):
        b.use_decode_kernels(1, False)


@pytest.mark.parametrize("d,n", [(1, 1), (64, 1), (65, 2), (4096, 3), (1000, 1)])
def test_decode_grid_covers_d_exactly(d, n):
    b = _bottleneck()
    splits, chunk, per_program = b.decode_grid(8, d, 16, n, torch.device("cpu"))
    assert chunk % b.DECODE_BLOCK_D == 0 and (splits - 1) * chunk < d <= splits * chunk
    assert per_program >= b.DECODE_BLOCK_D
