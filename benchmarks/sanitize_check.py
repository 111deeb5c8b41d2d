"""A short forward + backward of the CUDA and Triton backends, for compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 ADAPTERKERN_TRITON_CONFIGS=few \
        compute-sanitizer --tool memcheck --error-exitcode 99 python3 benchmarks/sanitize_check.py
    compute-sanitizer --tool racecheck --error-exitcode 99 python3 benchmarks/sanitize_check.py --racecheck

Odd sizes (T, d, r not multiples of any tile), every dtype, bias/scaling variants, a separate
residual: every bounds check in the kernels is exercised. Without the caching allocator every tensor
is an allocation of its own, so memcheck sees an access past a tensor's end; with two Triton configs
per kernel (and autotuning not cached, which gpu_check.sh arranges) both configs run. Exits 0 when
every step ran and matched the torch backend; memcheck's own exit code reports invalid accesses.

``--racecheck``: one small bf16 forward + backward of the CUDA backend only, the kernels that use
shared memory by hand (racecheck is slow and checks shared-memory hazards); no comparison.
"""
import argparse
import sys

import torch

import adapterkern

KERNEL_BACKENDS = ("cuda", "triton")


def _case(backend, dtype, t, d, r, residual, scaling):
    """Max relative difference of the op and its gradients on ``backend`` vs the torch backend."""
    x = torch.randn(t, d, device="cuda", dtype=dtype, requires_grad=True)
    wd = (torch.randn(r, d, device="cuda") * d**-0.5).to(dtype).requires_grad_()
    bd = torch.randn(r, device="cuda", dtype=dtype, requires_grad=True)
    wu = (torch.randn(d, r, device="cuda") * r**-0.5).to(dtype).requires_grad_()
    bu = torch.randn(d, device="cuda", dtype=dtype, requires_grad=True)
    s = {"channel": torch.rand(d, device="cuda", requires_grad=True),
         "scalar": torch.rand(1, device="cuda", requires_grad=True)}.get(scaling, scaling)
    res = torch.randn(t, d, device="cuda", dtype=dtype, requires_grad=True) if residual else None
    leaves = [v for v in (x, wd, bd, wu, bu, s, res) if isinstance(v, torch.Tensor)]
    outs = {}
    for b in (backend, "torch"):
        y = adapterkern.bottleneck_adapter(x, wd, bd, wu, bu, activation="gelu", scaling=s, residual=res, backend=b)
        outs[b] = [y] + list(torch.autograd.grad(y.float().square().sum(), leaves))
    torch.cuda.synchronize()
    return max(((a.float() - c.float()).abs().max() / c.float().abs().max().clamp_min(1e-6)).item()
               for a, c in zip(outs[backend], outs["torch"]))


def memcheck_cases(backends) -> int:
    failures = 0
    for backend in backends:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for t, d, r, residual, scaling in ((1, 40, 3, False, 0.5), (37, 200, 17, True, "channel"),
                                               (130, 72, 64, False, "scalar")):
                worst = _case(backend, dtype, t, d, r, residual, scaling)
                ok = worst < (2e-2 if dtype != torch.float32 else 1e-3)
                failures += not ok
                print(f"{'ok  ' if ok else 'FAIL'} {backend} {str(dtype)[6:]} T={t} d={d} r={r}: max rel diff {worst:.1e}",
                      flush=True)
    return failures


def racecheck_case() -> None:
    x = torch.randn(37, 200, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    wd = (torch.randn(17, 200, device="cuda") * 200**-0.5).to(torch.bfloat16).requires_grad_()
    wu = (torch.randn(200, 17, device="cuda") * 17**-0.5).to(torch.bfloat16).requires_grad_()
    y = adapterkern.bottleneck_adapter(x, wd, None, wu, None, activation="gelu", scaling=0.5, backend="cuda")
    torch.autograd.grad(y.float().square().sum(), [x, wd, wu])
    torch.cuda.synchronize()
    print("ok   cuda bfloat16 T=37 d=200 r=17: forward + backward ran", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default=",".join(KERNEL_BACKENDS),
                   help="comma-separated kernel backends to check (default: cuda,triton, those available)")
    p.add_argument("--racecheck", action="store_true", help="one small call of the CUDA backend only")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("sanitize_check: no CUDA device")
        return 0
    available = adapterkern.available_backends("cuda")
    if args.racecheck:
        if "cuda" not in available:
            print("sanitize_check: the cuda backend is not available; nothing to racecheck")
            return 0
        racecheck_case()
        return 0
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    backends = [b for b in wanted if b in available]
    for b in wanted:
        if b not in available:
            print(f"sanitize_check: backend {b} not available, skipped", flush=True)
    torch.manual_seed(0)
    return 1 if memcheck_cases(backends) else 0


if __name__ == "__main__":
    sys.exit(main())
