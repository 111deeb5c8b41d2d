"""The Triton forward's two schedules (ADAPTERKERN_TRITON_FORWARD): L2-resident (fewer programs than row
tiles, each looping over its tiles, so the x tiles in flight fit the L2) and one program per row tile. Both
against float64 maths written in conftest, NaN-poisoned outputs; the interpreter gives the L2-resident
schedule three programs (bottleneck.INTERPRETER_PROGRAMS), so the shapes here take several tiles each."""
import pytest
import torch

from adapterkern.backends import is_available

pytestmark = pytest.mark.skipif(not is_available("triton", torch.device("cpu")) and not torch.cuda.is_available(),
                                reason="Triton is not installed")

from conftest import INTERPRET, rel_err, stack_case, stack_reference  # noqa: E402

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _bottleneck():
    from adapterkern.backends.triton import bottleneck

    return bottleneck


def _forward(c, mode, monkeypatch, add_residual=True):
    from adapterkern.activations import get_activation

    b = _bottleneck()
    monkeypatch.setenv(b.FORWARD_ENV, mode)
    monkeypatch.setenv(b.DECODE_ENV, "off")
    schedules = []  # the program counts the L2-resident grid asked for, one per config launched
    real = b.forward_programs

    def spy(num_tokens, row_bytes, device):
        programs = real(num_tokens, row_bytes, device)
        return lambda meta: schedules.append(programs(meta)) or schedules[-1]

    monkeypatch.setattr(b, "forward_programs", spy)
    y, h = b.multi_adapter_forward(c["x"], c["w_down"], c["b_down"], c["w_up"], c["b_up"], c["scale"], 0.5,
                                   c["residual"], add_residual, get_activation("gelu_new").kernel_id, True)
    return y, h, schedules


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,T,d,r", [(1, 229, 96, 24), (2, 130, 200, 7), (1, 97, 40, 64)])
def test_both_schedules_match_float64(dtype, n, T, d, r, monkeypatch, poison_empty):
    c = stack_case(n, T, d, r, dtype, seed=T * d + r)
    y_ref, h_ref = stack_reference(c, "gelu_new", 0.5, True)
    for mode in ("l2", "rowtile"):
        y, h, schedules = _forward(c, mode, monkeypatch)
        assert torch.isfinite(y).all() and torch.isfinite(h).all(), mode  # every element written
        assert rel_err(y, y_ref) <= TOL[dtype], (mode, rel_err(y, y_ref))
        assert rel_err(h, h_ref) <= TOL[dtype], mode
        assert bool(schedules) == (mode == "l2"), (mode, schedules)  # the grid of the schedule asked for
        if INTERPRET:  # its one config has 32-row tiles: 4 to 8 of them here, over 3 programs
            assert set(schedules) <= {3}, schedules


@pytest.mark.parametrize("variant", ["residual", "no_residual"])
def test_other_residuals_keep_one_program_per_tile(variant, monkeypatch, poison_empty):
    """The L2-resident schedule is for x's second read: a separate residual, or none, reads x once anyway."""
    c = stack_case(1, 150, 64, 16, torch.float32, residual=variant == "residual", seed=5)
    add_residual = variant == "residual"
    y_ref, h_ref = stack_reference(c, "gelu_new", 0.5, add_residual)
    y, h, schedules = _forward(c, "l2", monkeypatch, add_residual=add_residual)
    assert schedules == []
    assert rel_err(y, y_ref) <= TOL[torch.float32] and rel_err(h, h_ref) <= TOL[torch.float32]


def test_l2_resident_program_count():
    """x tiles of 32 or 16 rows of d = 4096 bf16 (8 KiB a row) in half of a 60 MiB L2 (the H200's)."""
    programs = _bottleneck().l2_resident_programs
    half_l2 = 30 * 2 ** 20
    assert programs(16384, 32, 8192, half_l2) == 120  # 256 KiB tiles
    assert programs(16384, 16, 8192, half_l2) == 240
    assert programs(16384, 128, 8192, half_l2) == 30
    assert programs(100, 32, 8192, half_l2) == 4  # x fits: one program per tile, as the row-tile grid
    assert programs(16384, 128, 8192, 1000) == 1  # a tile larger than the budget: still one program


def test_forward_mode_is_checked(monkeypatch):
    b = _bottleneck()
    monkeypatch.delenv(b.FORWARD_ENV, raising=False)
    assert b.forward_mode() == "l2"
    monkeypatch.setenv(b.FORWARD_ENV, " RowTile ")
    assert b.forward_mode() == "rowtile"
    monkeypatch.setenv(b.FORWARD_ENV, "persistent")
    with pytest.raises(ValueError, match="ADAPTERKERN_TRITON_FORWARD"):
        b.forward_mode()
