"""Compile every Triton kernel ahead of time for sm_80 and sm_90 (Triton's own ptxas), no GPU needed.

The interpreter accepts things the GPU compiler rejects (dot shapes under 16, dtype mixes, constexpr
misuse); this catches them on a CPU-only machine. It runs in a subprocess without TRITON_INTERPRET
(under the interpreter the kernels are not compilable objects), and needs the NVIDIA backend and
ptxas that ship with Triton's Linux wheel.
"""
import os
import subprocess
import sys

import pytest

_INT_ARGS = {"T", "D", "R", "T_BUCKET", "SPLITS"}
ARCHS = (80, 90)


def _compile(autotuned, dtype, constexprs, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit = autotuned.fn
    signature = {}
    for p in jit.params:
        name = p.name
        if p.is_constexpr:
            signature[name] = "constexpr"
        elif name == "scale_value":
            signature[name] = "fp32"
        elif name.startswith("stride") or name in _INT_ARGS:
            signature[name] = "i32"
        elif name == "PERM":
            signature[name] = "*i64"  # token groups of the batched form
        elif name in ("COUNTS", "STARTS"):
            signature[name] = "*i32"
        elif name == "S" or name.endswith("_P"):
            signature[name] = "*fp64" if dtype == "fp64" else "*fp32"  # scaling / partial sums
        else:
            signature[name] = "*" + dtype
    src = ASTSource(fn=jit, signature=signature, constexprs={(jit.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32))
    assert compiled.asm.get("cubin"), "no cubin produced"


# dtype -> PRECISION: a half type, IEEE fp32, fp64 (gradcheck). fp16 and TF32 fp32 also
# compiled when this was written (2026-11-29); left out to keep CI's 2 cores under budget (~4 s each).
CASES = {"bf16": None, "fp32": "ieee", "fp64": None}


def compile_all(archs=ARCHS, dtypes=tuple(CASES)) -> int:
    import triton.language as tl

    from adapterkern.backends.triton import kernels

    tiles = [(16, 16, 32), (512, 32, 32)]  # (R_PAD, BLOCK_T, BLOCK_D): smallest dots, widest bottleneck
    needs = dict(NEED_DX=True, NEED_DWD=True, NEED_DBD=True, NEED_DWU=True, NEED_DBU=True, NEED_DS=True)
    failures = 0
    for arch in archs:
        for dtype in dtypes:
            precision, acc = CASES[dtype], (tl.float64 if dtype == "fp64" else tl.float32)
            for r_pad, block_t, block_d in tiles:
                if dtype == "fp64" and r_pad > 16:
                    continue  # float64 serves gradcheck on tiny shapes only; saves CI ~45 s on 2 cores
                if dtype == "fp32" and r_pad > 16 and arch < 90:
                    # IEEE fp32 dots lower to FMA loops (no tensor cores), the same on both archs, and the
                    # widest one takes ~100 s of CPU to compile cold: sm_90 (the lent GPU's) keeps it.
                    continue
                # GATHER (the batched form's token groups, with ADD_RES=False: zero rows for unrouted tokens) on
                # the smallest bf16 tiles, the stack form (with the residual) elsewhere.
                gather = dtype == "bf16" and r_pad == 16
                common = dict(ACT=2, PRECISION=precision, ACC=acc, R_PAD=r_pad, BLOCK_T=block_t, BLOCK_D=block_d, HAS_S=True, GATHER=gather)
                jobs = [
                    (kernels.fwd_kernel, dict(common, HAS_BD=True, HAS_BU=True, ADD_RES=not gather, SAVE_H=True)),
                    (kernels.bwd_dh_kernel, common),
                    (kernels.bwd_main_kernel, dict(common, HAS_BU=True, RES_IS_X=True, **needs)),
                ]
                for kernel, constexprs in jobs:
                    what = f"sm_{arch} {kernel.fn.__name__} {dtype} precision={precision} R_PAD={r_pad} GATHER={gather}"
                    try:
                        _compile(kernel, dtype, constexprs, arch)
                        print("ok  ", what)
                    except Exception as exc:  # report every failure, not just the first
                        failures += 1
                        print("FAIL", what, f"{type(exc).__name__}: {str(exc)[:2000]}")
    print(f"{failures} failures")
    return failures


# One test per (arch, dtype), each in its own subprocess, so pytest-xdist spreads the compiles over workers.
@pytest.mark.parametrize("dtype", list(CASES))
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
def test_triton_kernels_compile(arch, dtype):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, __file__, str(arch), dtype], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]


if __name__ == "__main__":  # python tests/test_backends_triton_compile.py [ARCH DTYPE]: all of them by default
    if len(sys.argv) == 3:
        sys.exit(1 if compile_all((int(sys.argv[1]),), (sys.argv[2],)) else 0)
    sys.exit(1 if compile_all() else 0)
