"""A short forward + backward of the CUDA backend (and the Triton one) for compute-sanitizer.

    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/sanitize_check.py

Odd sizes (T, d, r not multiples of any tile), every dtype, bias/scaling variants, a separate
residual: every bounds check in the kernels is exercised. Exits 0 when every step ran and matched the
torch backend; memcheck's own exit code reports invalid accesses.
"""
import sys

import torch

import adapterkern


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize_check: no CUDA device")
        return 0
    backends = [b for b in ("cuda", "triton") if b in adapterkern.available_backends("cuda")]
    torch.manual_seed(0)
    failures = 0
    for backend in backends:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for t, d, r, residual, scaling in ((1, 40, 3, False, 0.5), (37, 200, 17, True, "channel"), (130, 72, 64, False, "scalar")):
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
                worst = max(((a.float() - c.float()).abs().max() / c.float().abs().max().clamp_min(1e-6)).item()
                            for a, c in zip(outs[backend], outs["torch"]))
                ok = worst < (2e-2 if dtype != torch.float32 else 1e-3)
                failures += not ok
                print(f"{'ok  ' if ok else 'FAIL'} {backend} {str(dtype)[6:]} T={t} d={d} r={r}: max rel diff {worst:.1e}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
