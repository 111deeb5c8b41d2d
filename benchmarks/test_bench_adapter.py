"""pytest-benchmark suite for the bottleneck adapter op (not part of the default test run).

Run:   pytest benchmarks/test_bench_adapter.py                       (CPU: fp32, d=768, r=64)
       pytest benchmarks/test_bench_adapter.py --benchmark-json=out.json
Each (mode, T, d, r) point is one benchmark group, so pytest-benchmark's table puts the
implementations of a point side by side. On CUDA the points are bf16 at d=4096, r=64 (the issue's
target shape) and every call ends with a synchronize. Nothing is asserted about speed; the grid
harness (python -m adapterkern.bench) is where floors and speedups are reported.
"""
import pytest
import torch

from adapterkern.bench import grid, impls, timing

if not torch.cuda.is_available():
    timing.tune_cpu_malloc()  # as the grid harness does: no page faults per call (see its docstring)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
HIDDEN, BOTTLENECK = (4096, 64) if DEVICE.type == "cuda" else (768, 64)
TOKENS = [64, 16384] if DEVICE.type == "cuda" else [64, 4096]
IMPLS = ["eager", "adapters", "compile", "adapterkern-torch", "adapterkern-triton", "adapterkern-cuda"]


def _impl(name):
    chosen, _ = impls.select([name], DEVICE)
    for impl in chosen:
        if impl.name == name:
            return impl
    pytest.skip(f"{name} cannot run on {DEVICE.type} here")


@pytest.mark.parametrize("impl_name", IMPLS)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_adapter(benchmark, mode, tokens, impl_name):
    impl = _impl(impl_name)
    if impl.compiled:
        torch._dynamo.reset()
    torch.manual_seed(0)
    eager = impls.EagerAdapter(HIDDEN, BOTTLENECK).to(DEVICE, DTYPE)
    forward, params = impl.build(eager)
    train = mode == "fwd_bwd"
    x = torch.randn(tokens, HIDDEN, device=DEVICE, dtype=DTYPE, requires_grad=train)
    dy = torch.randn_like(x) if train else None
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

    def call():
        with torch.set_grad_enabled(train):
            y = forward(x)
            if train:
                torch.autograd.grad(y, [x, *params], dy)
        sync()

    for _ in range(3):  # compile / autotune outside the measurement
        call()
    benchmark.group = f"{mode} T={tokens} d={HIDDEN} r={BOTTLENECK} {str(DTYPE).replace('torch.', '')} {DEVICE.type}"
    element = torch.empty((), dtype=DTYPE).element_size()
    benchmark.extra_info["floor_bytes"] = grid.floor_bytes(mode, tokens, HIDDEN, BOTTLENECK, element)
    benchmark.pedantic(call, rounds=20 if tokens >= 4096 else 100, warmup_rounds=2, iterations=1)
