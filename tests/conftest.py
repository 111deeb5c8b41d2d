"""Test harness. Runs unchanged on a CUDA machine (native kernels) and on a CPU-only one (Triton interpreter)."""
import os
import shutil

# Must happen before triton (or adapterkern) is imported: the interpreter is chosen at kernel definition.
# Without a GPU, Triton kernels run on the CPU interpreter.
if shutil.which("nvidia-smi") is None and not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402,F401
import torch  # noqa: E402

from adapterkern.backends.triton import INTERPRET  # noqa: E402  (the product's own reading)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def poison_empty(monkeypatch):
    """Fill every fresh torch.empty / empty_like float tensor with NaN, so an unwritten output element fails."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


# ------------------------------------------------------------------------------------------------
# An independent float64 reference, written from the formula (not by calling adapterkern):
#   y = residual + scaling * (act(x @ w_down.T + b_down) @ w_up.T + b_up)
# ------------------------------------------------------------------------------------------------
import math  # noqa: E402

_REF_ACTIVATIONS = {
    "relu": lambda h: torch.where(h > 0, h, torch.zeros_like(h)),
    "gelu": lambda h: 0.5 * h * (1 + torch.erf(h / math.sqrt(2))),
    "gelu_new": lambda h: 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3))),
    "quick_gelu": lambda h: h / (1 + torch.exp(-1.702 * h)),
    "silu": lambda h: h / (1 + torch.exp(-h)),
    "tanh": lambda h: torch.tanh(h),
    "sigmoid": lambda h: 1 / (1 + torch.exp(-h)),
    "leakyrelu": lambda h: torch.where(h > 0, h, 0.01 * h),
    "relu6": lambda h: torch.clamp(h, 0, 6),
    "linear": lambda h: h,
}
REF_ALIASES = {"gelu_pytorch_tanh": "gelu_new", "gelu_fast": "gelu_new", "swish": "silu", "leaky_relu": "leakyrelu", "identity": "linear"}
ACTIVATIONS = sorted(_REF_ACTIVATIONS)


def reference_activation(name):
    name = name.lower()
    return _REF_ACTIVATIONS[REF_ALIASES.get(name, name)]


def reference_adapter(x, w_down, b_down, w_up, b_up, activation="relu", scaling=1.0, residual=None):
    """float64 maths on float64 copies of the inputs (differentiable w.r.t. the float64 copies)."""
    d = x.shape[-1]
    h = x.reshape(-1, d) @ w_down.t()
    if b_down is not None:
        h = h + b_down
    u = reference_activation(activation)(h) @ w_up.t()
    if b_up is not None:
        u = u + b_up
    u = u * scaling
    res = x if residual is None else residual
    return (res.reshape(-1, d) + u).reshape(x.shape)


def rel_err(out, ref, scale=None):
    """max |out - ref| / max |ref|: the error relative to the tensor's scale. For a sum whose terms
    cancel, pass ``scale`` = sum |terms| (its condition scale) to use instead of |ref| where larger."""
    if ref.numel() == 0:
        assert out.numel() == 0
        return 0.0
    denom = ref.double().abs().max()
    if scale is not None:
        denom = torch.maximum(denom, scale.double().abs().max())
    return ((out.double() - ref.double()).abs().max() / denom.clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Different random data for every test case, the same on every run (failures reproduce)."""
    import zlib

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


# ------------------------------------------------------------------------------------------------
# Checks shared by the many-adapter ops' tests (multi_adapter, bottleneck_adapter_batched).
# ------------------------------------------------------------------------------------------------
STACK_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}


def grads_of(y, case, dy):
    """{name: d(y . dy)/d case[name]} for every tensor of ``case`` that requires grad (zeros if unused)."""
    leaves = [(k, v) for k, v in case.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    got = torch.autograd.grad(y, [v for _, v in leaves], dy.to(y.dtype), allow_unused=True)
    return {k: (torch.zeros_like(v) if g is None else g) for (k, v), g in zip(leaves, got)}


def check_against_reference(y, ref, rounded, case):
    """y (the op) against ref (float64 maths) with the bound max(STACK_TOL[dtype], 2x the error of
    ``rounded``: float32 maths on the same inputs, its results rounded to the op's dtype, i.e. the
    error the dtype's own rounding of the results makes), then every gradient of ``case``'s tensors the
    same way (a gradient that is exactly zero in the reference, e.g. an adapter no token uses, must be zero)."""
    dtype = y.dtype
    assert y.shape == ref.shape
    bound = max(STACK_TOL[dtype], 2 * rel_err(rounded.to(dtype), ref))
    assert rel_err(y, ref) <= bound, ("y", rel_err(y, ref), bound)
    dy = torch.randn_like(ref)
    g, g_ref = grads_of(y, case, dy), grads_of(ref, case, dy)
    g_plain = {k: v.to(g[k].dtype) for k, v in grads_of(rounded, case, dy).items()}
    assert set(g) == set(g_ref)
    for k in g_ref:
        if g_ref[k].abs().max() == 0:
            assert g[k].abs().max() == 0, k
            continue
        bound = max(STACK_TOL[dtype] * 2, 2 * rel_err(g_plain[k], g_ref[k]))
        assert rel_err(g[k], g_ref[k]) <= bound, (k, rel_err(g[k], g_ref[k]), bound)


def stack_case(n, T, d, r, dtype, *, biases=True, scale="channel", residual=False, seed=0):
    """Inputs of a stack of ``n`` adapters on (T, d) tokens (multi_adapter_forward's arguments): fresh
    random data from ``seed``; per-channel (``"channel"``), learned (``"learned"``) or no scale tensor."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(DEVICE, dtype)

    case = dict(
        x=rand(T, d), w_down=rand(n, r, d, s=d ** -0.5), w_up=rand(n, d, r, s=r ** -0.5),
        b_down=rand(n, r) if biases else None, b_up=rand(n, d) if biases else None,
        scale=None if scale is None else (rand(n, 1) if scale == "learned" else rand(n, d)),
        residual=rand(T, d) if residual else None,
    )
    return case


def stack_reference(c, activation, scale_value, add_residual):
    """float64: y[n] = res + s_n * (act(x @ w_down[n].T + b_down[n]) @ w_up[n].T + b_up[n]); h[n] the pre-activation."""
    x = c["x"].double()
    ys, hs = [], []
    for k in range(c["w_down"].shape[0]):
        h = x @ c["w_down"][k].double().t()
        if c["b_down"] is not None:
            h = h + c["b_down"][k].double()
        u = reference_activation(activation)(h) @ c["w_up"][k].double().t()
        if c["b_up"] is not None:
            u = u + c["b_up"][k].double()
        u = u * (scale_value if c["scale"] is None else c["scale"][k].double())
        res = (x if c["residual"] is None else c["residual"].double()) if add_residual else 0
        ys.append(res + u)
        hs.append(h)
    return torch.stack(ys), torch.stack(hs)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models and tensors: one intra-op thread (on a busy 2-core machine two threads are many
    times slower per small op). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def import_adapters():
    """The AdapterHub ``adapters`` library for the test_integrations_adapterhub*.py files: the module skips with a
    stated reason where it is not installed, unless ADAPTERKERN_REQUIRE_ADAPTERS=1 (``make
    test-adapterhub``), where a missing library is a failure."""
    if os.environ.get("ADAPTERKERN_REQUIRE_ADAPTERS") == "1":
        import adapters  # noqa: F401

        return adapters
    return pytest.importorskip("adapters", reason="adapters library not installed; run by make test-adapterhub")


def assert_runs_close(got, ref, out_tol, grad_tol):
    """(output, {name: grad}) of a patched model vs the reference model: the output within ``out_tol``,
    each gradient relative to its own scale floored at 1e-3 of the largest gradient (some are exactly
    zero analytically, e.g. attention key biases, and only rounding noise in both runs)."""
    (out, grads), (out_ref, grads_ref) = got, ref
    assert out.shape == out_ref.shape
    assert rel_err(out, out_ref) < out_tol, rel_err(out, out_ref)
    assert grads.keys() == grads_ref.keys()
    floor = 1e-3 * max(g.abs().max() for g in grads_ref.values() if g is not None)
    for name in grads:
        g, gr = grads[name], grads_ref[name]
        assert (g is None) == (gr is None), name
        if gr is not None:
            err = rel_err(g, gr, scale=floor.expand(1))
            assert err < grad_tol, (name, err)


def assert_runs_equal(got, ref):
    """The same, bitwise (a module that takes the library's own path)."""
    (out, grads), (out_ref, grads_ref) = got, ref
    assert torch.equal(out, out_ref)
    for name in grads:
        assert (grads[name] is None) == (grads_ref[name] is None) and (grads[name] is None or torch.equal(grads[name], grads_ref[name])), name


def free_port() -> int:
    """A free TCP port on the loopback interface (for a gloo process group's rendezvous)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker, args: tuple, world: int, files, timeout_s: float, what: str) -> None:
    """``worker(rank, port, *args)`` in ``world`` spawned processes (a fresh loopback port), waited for.
    A rank that fails fails the caller. gloo's teardown has been seen to hang after the work was done
    (rare): past ``timeout_s`` the ranks are terminated, and only ``files`` not yet written fail the test."""
    import time
    import warnings

    ctx = torch.multiprocessing.start_processes(worker, args=(free_port(), *args), nprocs=world, join=False,
                                                start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1):  # raises if a rank failed
            if time.monotonic() > deadline:
                missing = [f.name for f in files if not f.is_file()]
                assert not missing, f"{what} ranks still running after {timeout_s} s without writing {missing}"
                warnings.warn(f"{what} ranks wrote their results but did not exit within {timeout_s} s; terminated")
                break
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)


# ------------------------------------------------------------------------------------------------
# The heaviest tests first (cold, on the 2-core dev machine: 40-150 s each), so that they start at once
# and the short tests fill in around them; collected in file order, the last of them would run alone at the
# end. make test runs pytest-xdist with --maxschedchunk 1: each worker starts with two of these (in this
# order: a two-process compile check beside a single-process one) and takes one test at a time after.
# ------------------------------------------------------------------------------------------------
HEAVY_FIRST = (
    "test_csrc_build.py::test_kernels_compile_for_sm80_sm90_without_spills",
    "test_csrc_emulation.py::test_kernels_match_float64_reference_under_asan_ubsan",
    "test_backends_triton_compile.py::test_triton_kernels_compile",
    "test_csrc_emulation.py::test_race_prone_cases_under_tsan",
    "test_integrations_fsdp.py::test_fsdp2_two_processes_match_one_process",
    "test_benchmarks_gpu_check.py::test_dry_run",
    "test_csrc_emulation.py::test_planted_bug_is_caught",
)


def pytest_collection_modifyitems(session, config, items):
    def rank(item):
        name = item.nodeid.rsplit("/", 1)[-1]
        return next((i for i, heavy in enumerate(HEAVY_FIRST) if name == heavy or name.startswith(heavy + "[")),
                    len(HEAVY_FIRST))

    items.sort(key=rank)  # stable: every other test keeps its place
