"""Compile every Triton kernel ahead of time for sm_90 and sm_80 (Triton's own ptxas), no GPU needed.

The interpreter accepts things the GPU compiler rejects (dot shapes under 16, dtype mixes, constexpr
misuse); this catches them on a CPU-only machine. The compiles run in worker processes without
TRITON_INTERPRET (under the interpreter the kernels are not compilable objects), and need the NVIDIA
backend and ptxas that ship with Triton's Linux wheel.

What is compiled (:func:`jobs`; in the suite, the list's sm_80 items are cut to the first one's flavour
sweep, one config per kernel: ``ADAPTERKERN_TRITON_SM80=all`` keeps them all, as ``make check-triton-compile``
does), for each of the three kernels: the forward with a config its autotuner
can pick (its configs after its prune), the cheapest to compile of those (:func:`pick_config`: a compile's
cost grows with the tile over the warps, and ptxas at R_PAD=512 with 4 warps takes minutes cold on a busy
2-core machine, with 8 warps seconds); the two backward kernels with **every** config their prunes keep
for the case (:func:`backward_configs`: their spaces are tables of where each config is spill-free, see
``language._BWD_MAIN_SPACE``, and this is their check):

* every flavour (bf16, fp16, fp32 IEEE, fp32 TF32, fp64 for gradcheck) on both archs at R_PAD=16,
  the smallest dots (every dim 16 where the configs allow it); the batched form (GATHER, no residual)
  for bf16 and fp32, the stack form with the residual for the others; the ten activations spread
  over these (each one in all three kernels), HAS_S on and off;
* sm_90's wgmma (Hopper tensor-core) path: a forward config with 64-row tiles, bf16 and TF32 (the small
  tiles above lower to mma.sync; the backward kernels keep no 64-row 4-warp tile, it spills, but their
  weight-gradient dots with 64 or more rows, R_PAD or BLOCK_D, take wgmma);
* R_PAD=512, the widest bottleneck (``functional.MAX_FOLDED_RANK``): bf16 on both archs, fp32 IEEE on
  sm_90 only (IEEE fp32 and fp64 dots lower to FMA loops, the same code on both archs); the wide fp32
  backward where shared memory is tightest: IEEE at R_PAD=256 on sm_80, TF32 at R_PAD=512 on sm_90;
* the backward kernels at the widths between, where their spaces change: bf16 (batched form) at R_PAD 64
  (the target shape's r), 128 and 256 on both archs, fp32 IEEE (sm_80) and TF32 (sm_90) at 64.

Each compile also reports its shared memory, checked against the arch's per-block limit: a kernel that
compiles but needs more cannot launch (Triton raises OutOfResources), and the autotuner skips it; the
config checked is one it can pick, so every case has one that launches. And its registers per thread and
register spills (``ptxas -v`` on its PTX): a spill is a failure, but for the few known ones of
:data:`SPILLS_ALLOWED` (and add_norm_kernel's, listed). The compiles take the kernels' arguments unspecialized
(no stride of 1, no divisibility by 16): every element its own address, more registers than a contiguous
launch, whose strides the JIT specializes (the case every tensor layout can reach).

Which compiles there are depends on the product's configs, which the interpreter replaces: the list is
made in a worker (never under TRITON_INTERPRET) and handed to the driver.

No per-test timeout: a busy machine makes compiles slow, not wrong. ``HANG_GUARD_S`` only ends a run
that hangs. ``python tests/test_backends_triton_compile.py [--procs N]`` runs the same outside pytest.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = (80, 90)
# flavour -> (pointer dtype of the tensors, PRECISION): the dtypes torch hands the kernels
FLAVOURS = {"bf16": ("bf16", None), "fp16": ("fp16", None), "fp32": ("fp32", "ieee"), "tf32": ("fp32", "tf32"),
            "fp64": ("fp64", None)}
ELEMENT_SIZE = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}
KERNELS = ("fwd_kernel", "bwd_dh_kernel", "bwd_main_kernel")
BACKWARD = KERNELS[1:]
ADD_NORM = "add_norm_kernel"  # adapterkern.backends.triton.add_norm: the inference op
DECODE = ("decode_down_kernel", "decode_up_kernel")  # the split-d forward for T <= 64 (fixed BLOCK_D, 4 warps)
# Shared memory per block, opt-in maximum (what Triton's launcher checks): A100 163 KiB, H100/H200 227 KiB.
SMEM_LIMIT = {80: 166912, 90: 232448}
HANG_GUARD_S = 3600  # not a budget: only a hung worker gets near it
MAX_PROCS = 2
_INT_ARGS = {"T", "D", "R", "T_BUCKET", "SPLITS", "CHUNK", "D_PER_PROGRAM"}
# Kernels whose every compile must be spill-free (add_norm_kernel at R_PAD 512 on sm_80 is not, listed by
# spill_report), but for SPILLS_ALLOWED.
SPILL_FREE = KERNELS + DECODE
# (kernel, R_PAD, flavour or None for all) -> why its spills are not failures (listed by spill_report).
SPILLS_ALLOWED = {
    ("bwd_main_kernel", 512, None): "every config spills: its two (R_PAD, BLOCK_D) fp32 accumulators and the "
    "w_down / w_up dot operands (each warp its own copy) live across the token loop; the 16-row ones spill least",
    ("bwd_main_kernel", 256, "bf16"): "no config is spill-free on sm_80 (the mma.sync operand copies; 16x32 "
    "tiles with 8 warps: 192 bytes); sm_90 and fp32 are",
}


@dataclass(frozen=True)
class Job:
    arch: int
    flavour: str
    kernel: str
    r_pad: int
    gather: bool = False
    act: int = 2  # GELU_TANH: the most code
    has_s: bool = True
    wgmma: bool = False  # sm_90: a config with 64-row tiles (Hopper's wgmma), else the cheapest
    rms: bool = False  # add_norm_kernel: RMSNorm, else LayerNorm
    t_pad: int = 64  # the decode kernels' token tile (T <= 64 padded to a power of two >= 16)
    config: Tuple[int, ...] = ()  # backward kernels: (BLOCK_T, BLOCK_D, warps, stages), one of backward_configs
    rowtile: bool = False  # fwd_kernel: one program per row tile (ADAPTERKERN_TRITON_FORWARD=rowtile), else L2_RESIDENT
    specialize: bool = False  # compiled as a contiguous launch, with its SASS census (see FORWARD_SASS)

    def __str__(self):
        return (f"sm_{self.arch} {self.kernel} {self.flavour} R_PAD={self.r_pad} GATHER={int(self.gather)} "
                f"ACT={self.act} HAS_S={int(self.has_s)}" + (" RMS" if self.rms else "") + (" wgmma-tile" if self.wgmma else "")
                + (f" T_PAD={self.t_pad}" if self.kernel in DECODE else "")
                + (" config={}x{}/{}w/{}s".format(*self.config) if self.config else "") + (" rowtile" if self.rowtile else "")
                + (" contiguous" if self.specialize else ""))


ALL_CONFIGS_ENV = "ADAPTERKERN_TRITON_ALL_CONFIGS"
# ADAPTERKERN_TRITON_SM80=all: every job on sm_80 as well (`make check-triton-compile`, about 60 CPU-s more);
# by default sm_80 compiles only the flavour sweep at R_PAD=16 (its mma.sync lowering of every flavour and
# activation), and the wide bottlenecks, the backward spaces and the other kernels on sm_90 alone.
SM80_ENV = "ADAPTERKERN_TRITON_SM80"


def every_config(job: Job) -> bool:
    """Whether ``job`` is compiled in every config its autotuner can pick (else in the first of them): where
    the backward kernels' registers run out (bwd_main_kernel always, bwd_dh_kernel from R_PAD 128 on);
    ``ADAPTERKERN_TRITON_ALL_CONFIGS=1``: every backward job (255 compiles, 4-5 min cold on 2 cores, against
    about 2 min for the default 127)."""
    if job.kernel not in BACKWARD:
        return False
    if os.environ.get(ALL_CONFIGS_ENV) == "1":
        return True
    return job.kernel == "bwd_main_kernel" or job.r_pad >= 128


def jobs() -> List[Job]:
    """Every compile, the slowest first (so two workers finish together); in a worker (see _serve)."""
    out = []
    for k, (arch, flavour) in enumerate((a, f) for a in ARCHS for f in FLAVOURS):
        for kernel in KERNELS:  # activation k in all three kernels: the ten (arch, flavour) pairs cover all ten
            out.append(Job(arch, flavour, kernel, 16, gather=flavour in ("bf16", "fp32"), act=k, has_s=k % 2 == 0))
    out += [Job(90, flavour, "fwd_kernel", 16, wgmma=True) for flavour in ("bf16", "tf32")]
    for arch, flavour in ((80, "bf16"), (90, "bf16"), (90, "fp32")):
        out += [Job(arch, flavour, kernel, 512) for kernel in KERNELS]
    out += [Job(80, "fp32", kernel, 256) for kernel in BACKWARD] + [Job(90, "tf32", "bwd_main_kernel", 512)]
    out += [Job(arch, "bf16", kernel, r_pad, gather=True)
            for r_pad in (64, 128, 256) for arch in ARCHS for kernel in BACKWARD]
    out += [Job(arch, flavour, kernel, 64, gather=True)
            for arch, flavour in ((80, "fp32"), (90, "tf32")) for kernel in BACKWARD]
    out = [replace(j, config=c) for j in out
           for c in (backward_configs(j) if every_config(j) else backward_configs(j)[:1] if j.kernel in BACKWARD else [()])]
    # The inference kernel: LayerNorm and RMSNorm, every flavour but fp64 at R_PAD=16, bf16 at 512.
    out += [Job(arch, flavour, ADD_NORM, 16, act=k, has_s=k % 2 == 0, rms=k % 2 == 1)
            for k, (arch, flavour) in enumerate((a, f) for a in ARCHS for f in ("bf16", "fp16", "fp32", "tf32"))]
    out += [Job(arch, "bf16", ADD_NORM, 512) for arch in ARCHS] + [Job(90, "bf16", ADD_NORM, 16, wgmma=True)]
    # The decode kernels: bf16 and TF32 on both archs at the widest token tile, fp64 and the smallest tile,
    # and the widest bottleneck they take (bottleneck.DECODE_MAX_R_PAD).
    out += [Job(arch, flavour, kernel, 16, act=k % 10) for k, (arch, flavour, kernel) in enumerate(
        (a, f, kn) for a in ARCHS for f in ("bf16", "tf32") for kn in DECODE)]
    out += [Job(80, "fp64", kernel, 16, t_pad=16) for kernel in DECODE] + [Job(90, "bf16", kernel, 128) for kernel in DECODE]
    # The L2-resident forward's memory path at the target shape (bf16, R_PAD 64), in configs of 16-, 32- and
    # 64-row tiles (mma.sync and wgmma), compiled as the JIT compiles a contiguous launch: see FORWARD_SASS.
    out += [Job(90, "bf16", "fwd_kernel", 64, act=1, config=c, specialize=True)
            for c in ((16, 64, 4, 2), (32, 128, 8, 3), (64, 64, 4, 3))]
    if os.environ.get(SM80_ENV) != "all":  # sm_80: the flavour sweep of the three kernels, one config each
        out = [j for j in out if j.arch == 90 or (j.kernel in KERNELS and j.r_pad == 16 and (
            j.kernel not in BACKWARD or j.config == backward_configs(replace(j, config=()))[0]))]
    return sorted(out, key=lambda j: (-j.r_pad, j.kernel != "bwd_main_kernel", j.flavour == "bf16"))


# ---------------------------------------------------------------------------- worker side (no interpreter)

class _Operand:
    """What the prune rule reads of a kernel's tensor argument: its element size."""

    def __init__(self, size: int):
        self.size = size

    def element_size(self) -> int:
        return self.size


def _autotuner(kernel_name: str):
    from adapterkern.backends.triton import add_norm, kernels, language

    assert not language.INTERPRET, "the product's configs are read without TRITON_INTERPRET"
    return (add_norm if kernel_name == ADD_NORM else kernels).__dict__[kernel_name]


def pick_config(kernel_name: str, r_pad: int, wgmma: bool = False):
    """The cheapest config to compile of those the autotuner of fwd_kernel / add_norm_kernel can pick at
    ``r_pad`` (for some T): its configs after its prune, smallest tile per warp first, then fewest stages.
    With ``wgmma``: the cheapest with 64-row tiles and 4 warps (one warpgroup)."""
    tuner = _autotuner(kernel_name)
    pickable = tuner.early_config_prune(tuner.configs, {"R_PAD": r_pad, "T_BUCKET": 16384})
    if wgmma:
        pickable = [c for c in pickable if c.kwargs["BLOCK_T"] >= 64 and c.num_warps == 4]
    assert pickable, f"no pickable config for {kernel_name} R_PAD={r_pad} wgmma={wgmma}"
    return min(pickable, key=lambda c: (c.kwargs["BLOCK_T"] * c.kwargs["BLOCK_D"] / c.num_warps, c.num_stages,
                                        c.kwargs["BLOCK_T"], c.kwargs["BLOCK_D"]))


def forward_configs(r_pad: int) -> List[Tuple[int, ...]]:
    """Every (BLOCK_T, BLOCK_D, warps, stages) fwd_kernel's autotuner can pick at ``r_pad`` for a long T."""
    tuner = _autotuner("fwd_kernel")
    return [(c.kwargs["BLOCK_T"], c.kwargs["BLOCK_D"], c.num_warps, c.num_stages)
            for c in tuner.early_config_prune(tuner.configs, {"R_PAD": r_pad, "T_BUCKET": 16384})]


def backward_configs(job: Job) -> List[Tuple[int, ...]]:
    """Every (BLOCK_T, BLOCK_D, warps, stages) the autotuner of a backward kernel can pick for ``job``'s
    R_PAD and element size (for some T: 16-row tiles for short T are among those for long T)."""
    tuner = _autotuner(job.kernel)
    named = {"R_PAD": job.r_pad, "T_BUCKET": 16384, "DY": _Operand(ELEMENT_SIZE[FLAVOURS[job.flavour][0]])}
    pickable = tuner.early_config_prune(tuner.configs, named)
    assert pickable, f"no pickable config for {job}"
    return [(c.kwargs["BLOCK_T"], c.kwargs["BLOCK_D"], c.num_warps, c.num_stages) for c in pickable]


def _signature(jit, dtype: str) -> Dict[str, str]:
    signature = {}
    for p in jit.params:
        name = p.name
        if p.is_constexpr:
            signature[name] = "constexpr"
        elif name in ("scale_value", "eps"):
            signature[name] = "fp32"
        elif name.startswith("stride") or name in _INT_ARGS:
            signature[name] = "i32"
        elif name == "PERM":
            signature[name] = "*i64"  # token groups of the batched form
        elif name in ("COUNTS", "STARTS"):
            signature[name] = "*i32"
        elif name in ("S", "PARTIAL") or name.endswith("_P"):
            signature[name] = "*fp64" if dtype == "fp64" else "*fp32"  # scaling / partial sums
        else:
            signature[name] = "*" + dtype
    return signature


# The unit strides of a contiguous launch (rows of x, res, dy, both weights and a per-channel scale), which
# the JIT specializes to the constant 1 (sass_report); every other integer argument is then a multiple of 16.
UNIT_STRIDES = {"stride_xd", "stride_rd", "stride_dyd", "stride_wd_d", "stride_wu_r", "stride_s"}


def compile_job(job: Job, specialize: bool = False) -> dict:
    """Compile ``job`` to a cubin; what happened, as a JSON-able dict. ``specialize``: as the JIT compiles a
    contiguous launch at the target shape (UNIT_STRIDES constant 1, every pointer 16-byte aligned and every
    other integer argument a multiple of 16), and with the kernel's SASS instruction census (.ci/sass_report.py)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from adapterkern.backends.triton import add_norm, kernels, language

    assert not language.INTERPRET, "the compile worker must run without TRITON_INTERPRET"
    dtype, precision = FLAVOURS[job.flavour]
    if job.kernel in DECODE:  # launched with fixed meta-parameters, as bottleneck._decode_forward does
        from adapterkern.backends.triton.bottleneck import DECODE_BLOCK_D, decode_warps

        config = triton.Config({"BLOCK_D": DECODE_BLOCK_D, "T_PAD": job.t_pad, "BLOCK_T": job.t_pad},
                               num_warps=decode_warps(job.t_pad, job.r_pad))
    elif job.config:
        block_t, block_d, warps, stages = job.config
        config = triton.Config({"BLOCK_T": block_t, "BLOCK_D": block_d}, num_warps=warps, num_stages=stages)
    else:
        config = pick_config(job.kernel, job.r_pad, job.wgmma)
    constexprs = dict(ACT=job.act, PRECISION=precision, ACC=tl.float64 if dtype == "fp64" else tl.float32,
                      R_PAD=job.r_pad, HAS_S=job.has_s, **config.kwargs)
    if job.kernel in DECODE:
        constexprs.pop("BLOCK_T")
        if job.kernel == "decode_down_kernel":
            constexprs = {k: v for k, v in constexprs.items() if k in ("PRECISION", "ACC", "R_PAD", "T_PAD", "BLOCK_D")}
        else:
            constexprs.update(HAS_BD=True, HAS_BU=True, ADD_RES=True, SAVE_H=True)
    elif job.kernel == ADD_NORM:
        constexprs.update(HAS_BD=True, HAS_BU=True, HAS_NW=True, HAS_NB=not job.rms, RMS=job.rms)
    else:
        constexprs["GATHER"] = job.gather
    if job.kernel == "fwd_kernel":  # the batched form without the residual: zero rows for unrouted tokens
        constexprs.update(HAS_BD=True, HAS_BU=True, ADD_RES=not job.gather, SAVE_H=True, STAGES=config.num_stages,
                          L2_RESIDENT=not (job.gather or job.rowtile))  # as the launcher decides
    elif job.kernel == "bwd_main_kernel":
        constexprs.update(HAS_BU=True, RES_IS_X=not job.gather, NEED_DX=True, NEED_DWD=True, NEED_DBD=True,
                          NEED_DWU=True, NEED_DBU=True, NEED_DS=True)
    kernel = (add_norm if job.kernel == ADD_NORM else kernels).__dict__[job.kernel]
    jit = kernel if hasattr(kernel, "params") else kernel.fn  # a JITFunction, or the Autotuner around one
    result = dict(job=asdict(job), what=str(job), ok=False, error="", shared=None, wgmma=False,
                  config=f"BLOCK_T={config.kwargs['BLOCK_T']} BLOCK_D={config.kwargs['BLOCK_D']} "
                         f"warps={config.num_warps} stages={config.num_stages}")
    started = time.perf_counter()
    try:
        signature, attrs = _signature(jit, dtype), {}
        if specialize:
            for name, kind in signature.items():
                if name in UNIT_STRIDES:
                    signature[name] = "constexpr"
                    constexprs[name] = 1
                elif kind.startswith("*") or (kind == "i32" and name not in ("T",)):
                    attrs[(jit.arg_names.index(name),)] = [["tt.divisibility", 16]]
        src = ASTSource(fn=jit, signature=signature, constexprs={(jit.arg_names.index(k),): v for k, v in constexprs.items()},
                        attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", job.arch, 32),
                                  options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
        assert compiled.asm.get("cubin"), "no cubin produced"
        result.update(ok=True, shared=int(compiled.metadata.shared), wgmma="wgmma" in compiled.asm.get("ptx", ""),
                      **ptxas_usage(compiled.asm["ptx"], job.arch))
        if specialize:
            result["sass"] = sass_census(compiled.asm["cubin"])
    except Exception as exc:  # noqa: BLE001 - report every failure, not just the first
        causes, e = [], exc  # a CompilationError's text is the source context; the reason is in its causes
        while e is not None and len(causes) < 5:
            causes.append(f"{type(e).__name__}: {str(e)[-1500:]}")
            e = e.__cause__ or e.__context__
        result["error"] = "\n     caused by ".join(causes)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def sass_census(cubin: bytes) -> dict:
    """Instruction-class counts of a cubin's one kernel (.ci/sass_report.py's census; cuobjdump from the wheel)."""
    import importlib.util
    import tempfile

    spec = importlib.util.spec_from_file_location("adapterkern_sass_report", os.path.join(ROOT, ".ci", "sass_report.py"))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    tools = report.find_tools(shutil.which("nvcc") or "")
    if tools is None:
        raise RuntimeError("no cuobjdump/nvdisasm (they come with Triton's Linux wheel)")
    os.environ.setdefault("NVDISASM_PATH", os.path.dirname(tools[1]))  # where cuobjdump -sass finds nvdisasm
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        kernels = report.disassemble(tools[0], path)
    return dict(kernels[0][2]) if kernels else {}


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers per thread and spill bytes of a kernel's PTX, from ``ptxas -v`` (Triton's own ptxas for
    the arch, the one that built the cubin): {"registers": n, "spill_bytes": stores + loads}."""
    import re
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        suffix = "a" if arch == 90 else ""
        done = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{suffix}", src, "-o",
                               os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True)
    text = done.stdout + done.stderr
    registers = re.search(r"Used (\d+) registers", text)
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    if done.returncode or registers is None:
        raise RuntimeError(f"ptxas -v failed: {text[-1000:]}")
    return {"registers": int(registers.group(1)), "spill_bytes": sum(spills)}


def _serve() -> int:
    """Worker: the list of jobs (their names, one JSON line), then compile the job of each index read from
    stdin, one JSON line per job on stdout."""
    sys.path.insert(0, ROOT)  # the tree under test
    results = os.fdopen(os.dup(1), "w")  # the protocol's channel; anything else printed goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    every = jobs()
    results.write(json.dumps([str(j) for j in every]) + "\n")
    results.flush()
    for line in sys.stdin:
        job = every[int(line)]
        results.write(json.dumps(compile_job(job, specialize=job.specialize)) + "\n")
        results.flush()
    return 0


# --------------------------------------------------------------------------------------------- driver

def _worker_env() -> Dict[str, str]:
    # the product's full config sweep (not the interpreter's one config, nor the GPU test stage's "few")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ADAPTERKERN_TRITON_CONFIGS")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def run_all(procs: Optional[int] = None, log=None) -> List[dict]:
    """Compile every job in ``procs`` worker processes (default: up to MAX_PROCS, one per core), the
    jobs handed out one at a time as workers finish; one result per job, in job order. The jobs are
    the workers' list (:func:`jobs` reads the product's configs, which this process may see through
    the interpreter)."""
    procs = max(1, procs or min(MAX_PROCS, os.cpu_count() or 1))
    workers = []
    for _ in range(procs):
        errfile = open(_tmpfile(), "w+")
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve"], cwd=ROOT, env=_worker_env(),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errfile, text=True, bufsize=1)
        workers.append((proc, errfile))
    listed = [proc.stdout.readline() for proc, _ in workers]
    if not all(listed) or len(set(listed)) != 1:
        errfile = workers[listed.index("")][1] if "" in listed else workers[0][1]
        errfile.seek(0)
        why = errfile.read()[-3000:]
        for proc, errfile in workers:
            proc.kill()
            proc.wait()
            errfile.close()
            os.unlink(errfile.name)
        raise RuntimeError("compile workers gave no job list, or different ones: " + why)
    every = json.loads(listed[0])
    todo: "queue.Queue[int]" = queue.Queue()
    for i in range(len(every)):
        todo.put(i)
    results: Dict[int, dict] = {}
    lock = threading.Lock()

    def drive(proc, errfile):
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                break
            try:
                proc.stdin.write(f"{i}\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
            except (BrokenPipeError, OSError):
                line = ""
            if not line:  # the worker died on this job: say so, leave the rest to the others
                errfile.seek(0)
                with lock:
                    results[i] = dict(what=every[i], ok=False, shared=None, wgmma=False, config="",
                                      error="worker died: " + errfile.read()[-3000:], seconds=0)
                break
            result = json.loads(line)
            with lock:
                results[i] = result
            if log:
                log(_line(result))
        try:
            proc.stdin.close()
        except OSError:
            pass

    workers = [(proc, threading.Thread(target=drive, args=(proc, errfile), daemon=True), errfile)
               for proc, errfile in workers]
    for _, thread, _ in workers:
        thread.start()
    deadline = time.monotonic() + HANG_GUARD_S
    for proc, thread, _ in workers:
        thread.join(max(0.0, deadline - time.monotonic()))
    hung = any(thread.is_alive() for _, thread, _ in workers)
    for proc, _, errfile in workers:
        if hung:
            proc.kill()
        proc.wait()
        errfile.close()
        os.unlink(errfile.name)
    if hung:
        raise RuntimeError(f"compile workers still running after {HANG_GUARD_S} s (hang guard); done: "
                           f"{len(results)} of {len(every)}")
    for i in range(len(every)):  # jobs never handed out (every worker died)
        results.setdefault(i, dict(what=every[i], ok=False, shared=None, wgmma=False, config="",
                                   error="not run: no worker left", seconds=0))
    return [results[i] for i in range(len(every))]


def _tmpfile() -> str:
    import tempfile

    fd, path = tempfile.mkstemp(prefix="triton-compile-worker-", suffix=".log")
    os.close(fd)
    return path


def _line(r: dict) -> str:
    shared = "" if r.get("shared") is None else f" shared={r['shared'] / 1024:.0f}KiB"
    if r.get("registers") is not None:
        shared += f" regs={r['registers']}" + (f" SPILLS={r['spill_bytes']}B" if r["spill_bytes"] else "")
    status = "ok  " if r["ok"] else "FAIL"
    return f"{status} {r['what']} [{r['config']}]{shared}{' wgmma' if r.get('wgmma') else ''} {r['seconds']}s" + (
        "" if r["ok"] else f"\n     {r['error']}")


def _must_not_spill(job: dict) -> bool:
    return job["kernel"] in SPILL_FREE and not any(
        (kernel, r_pad) == (job["kernel"], job["r_pad"]) and flavour in (None, job["flavour"])
        for kernel, r_pad, flavour in SPILLS_ALLOWED)


# What the L2-resident forward (fwd_kernel, L2_RESIDENT) promises of its SASS in a contiguous launch: every
# tile of x, the weights and the residual arrives by cp.async (LDGSTS), none by a register load of 8 or 16
# bytes (the row-tile kernel re-loads the residual by LDG.128 outside the pipeline); the few 4-byte loads
# left are the bias and scale vectors.
FORWARD_SASS = {"LDGSTS": (">", 0), "LDG.128": ("==", 0), "LDG.64": ("==", 0)}


def _sass_broken(census: dict) -> List[str]:
    ops = {">": lambda a, b: a > b, "==": lambda a, b: a == b}
    return [f"{cls} = {census.get(cls, 0)}, promised {op} {n}" for cls, (op, n) in FORWARD_SASS.items()
            if not ops[op](census.get(cls, 0), n)]


def problems(results: List[dict]) -> List[str]:
    """What is wrong with a run: compile failures, register spills (but SPILLS_ALLOWED's), shared memory
    over the arch's limit, a broken FORWARD_SASS promise, a job twice, and no wgmma anywhere on sm_90."""
    out = [f"twice: {what}" for what in {r["what"] for r in results} if [r["what"] for r in results].count(what) > 1]
    for r in results:
        if not r["ok"]:
            out.append(_line(r))
            continue
        job = r["job"]
        if r.get("spill_bytes") and _must_not_spill(job):
            out.append(f"SPILL {r['what']}: {r['spill_bytes']} bytes of register spills ({r['registers']} registers)")
        if job.get("specialize") and job["kernel"] == "fwd_kernel" and not job["rowtile"]:
            out += [f"SASS {r['what']}: {broken}" for broken in _sass_broken(r.get("sass", {}))]
        if r["shared"] > SMEM_LIMIT[job["arch"]]:
            out.append(f"SMEM {r['what']}: {r['shared']} bytes of shared memory, sm_{job['arch']} has "
                       f"{SMEM_LIMIT[job['arch']]}: cannot launch")
    wgmma_jobs = [r for r in results if r["ok"] and r["job"]["wgmma"]]
    if wgmma_jobs and not any(r["wgmma"] for r in wgmma_jobs):
        out.append("no sm_90 compile with 64-row tiles used wgmma: the Hopper path is not exercised")
    return out


def spill_report(results: List[dict]) -> List[str]:
    """The compiles that spill registers where it is not a failure (kernels outside SPILL_FREE, SPILLS_ALLOWED)."""
    return [f"spills: {r['what']}: {r['spill_bytes']} bytes ({r['registers']} registers)" for r in results
            if r.get("spill_bytes") and not _must_not_spill(r["job"])]


def test_triton_kernels_compile():
    pytest.importorskip("triton")
    lines: List[str] = []
    started = time.perf_counter()
    results = run_all(log=lines.append)
    print(f"{len(results)} compiles in {time.perf_counter() - started:.0f} s", *lines, *spill_report(results), sep="\n")
    wrong = problems(results)
    assert not wrong, "\n".join(wrong)


def test_problems_are_caught():
    """The verdict on results (no compiling): a failure, a spill, a shared-memory overflow, a job twice, and no
    wgmma are each caught; the allowed spills are reported instead."""
    def result(job, ok=True, shared=1024, wgmma=False):
        return dict(job=asdict(job), what=str(job), ok=ok, error="" if ok else "CompilationError: x", shared=shared,
                    wgmma=wgmma, config="", seconds=0)

    small, wide = Job(90, "bf16", "fwd_kernel", 16), Job(90, "bf16", "fwd_kernel", 16, wgmma=True)
    assert problems([result(small), result(wide, wgmma=True)]) == []
    assert len(problems([result(small, ok=False), result(wide, wgmma=True)])) == 1
    assert problems([result(Job(80, "bf16", "bwd_main_kernel", 512), shared=SMEM_LIMIT[80] + 1)])[0].startswith("SMEM")
    assert "wgmma" in problems([result(wide)])[0]
    spilling = dict(result(small, wgmma=False), registers=255, spill_bytes=64)
    assert problems([spilling, result(wide, wgmma=True)])[0].startswith("SPILL")
    for kernel in ("bwd_dh_kernel", "bwd_main_kernel"):
        backward = dict(result(Job(90, "bf16", kernel, 16, config=(32, 32, 8, 2))), registers=255, spill_bytes=64)
        assert problems([backward])[0].startswith("SPILL") and spill_report([backward]) == []
    for job in (Job(80, "bf16", "bwd_main_kernel", 256, config=(16, 32, 8, 1)),
                Job(90, "tf32", "bwd_main_kernel", 512, config=(16, 16, 8, 1))):
        allowed = dict(result(job), registers=255, spill_bytes=192)
        assert problems([allowed]) == [] and len(spill_report([allowed])) == 1
    fp32_256 = dict(result(Job(80, "fp32", "bwd_main_kernel", 256, config=(16, 16, 8, 1))), registers=255,
                    spill_bytes=8)
    assert problems([fp32_256])[0].startswith("SPILL")  # the allowance at 256 is bf16's only
    assert problems([result(small), result(small), result(wide, wgmma=True)])[0].startswith("twice")
    contiguous = Job(90, "bf16", "fwd_kernel", 64, config=(32, 128, 8, 3), specialize=True)
    kept = {"LDGSTS": 45, "LDG.32": 2}
    assert problems([dict(result(contiguous), sass=kept), result(wide, wgmma=True)]) == []
    for broken in ({"LDGSTS": 30, "LDG.128": 2}, {"LDG.64": 4}):  # the residual by register loads; no cp.async
        assert problems([dict(result(contiguous), sass=broken), result(wide, wgmma=True)])[0].startswith("SASS")
    rowtile = replace(contiguous, rowtile=True)  # the old kernel: no promise
    assert problems([dict(result(rowtile), sass={"LDGSTS": 30, "LDG.128": 2}), result(wide, wgmma=True)]) == []


# ---------------------------------------------------------------------------------- SASS report (no assertions)
SASS_COLUMNS = ("LDG.128", "LDG.64", "LDG.32", "LDG.U16", "LDGSTS", "LDS.128", "LDSM", "HMMA", "STG.128", "STG.U16",
                "LDL", "STL")


def sass_report_lines() -> List[str]:
    """Every config the autotuners can pick for the three kernels at the target shape (bf16, sm_90, R_PAD 64,
    T_BUCKET 16384), compiled as the JIT compiles a contiguous launch (compile_job's ``specialize``), with its SASS
    census. A report, not a gate: which of these runs is the autotuner's choice on the GPU, and Triton's lowering
    of a load's width changes between versions (here the local Triton; the GPU image has 3.6)."""
    import triton

    out = [f"# Triton {triton.__version__} AOT, sm_90, bf16, R_PAD=64 (the target shape: T=16384, d=4096, r=64); contiguous",
           "# launch: unit strides constant, pointers and other integers divisible by 16. Static instruction counts.",
           f"{'kernel':<19} {'config':<34} {'regs':>4} {'spill':>5} {'smem':>6} " + " ".join(f"{c:>7}" for c in SASS_COLUMNS)]
    for kernel, rowtile in (("fwd_kernel", False), ("fwd_kernel", True), *((k, False) for k in BACKWARD)):
        base = Job(90, "bf16", kernel, 64, act=1, rowtile=rowtile)
        name = kernel + (" rowtile" if rowtile else "")
        for config in forward_configs(64) if kernel == "fwd_kernel" else backward_configs(base):
            r = compile_job(replace(base, config=config), specialize=True)
            if not r["ok"]:
                out.append(f"{name:<19} {r['config']:<34} FAILED: {r['error'][:200]}")
                continue
            counts = r["sass"]
            out.append(f"{name:<19} {r['config']:<34} {r['registers']:>4} {r['spill_bytes']:>5} {r['shared']:>6} "
                       + " ".join(f"{counts.get(c, 0):>7}" for c in SASS_COLUMNS))
    return out


if __name__ == "__main__":  # python tests/test_backends_triton_compile.py [--procs N | --sass-report PATH]
    if sys.argv[1:] == ["--serve"]:
        sys.exit(_serve())
    if sys.argv[1:2] == ["--sass-report"]:  # compiles in a process without the interpreter, like the workers
        if os.environ.get("TRITON_INTERPRET"):
            sys.exit(subprocess.run([sys.executable, *sys.argv], env=_worker_env()).returncode)
        sys.path.insert(0, ROOT)
        lines = sass_report_lines()
        target = sys.argv[2]
        tmp = target + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, target)
        print("\n".join(lines))
        sys.exit(0)
    n = int(sys.argv[sys.argv.index("--procs") + 1]) if "--procs" in sys.argv else None
    t0 = time.perf_counter()
    res = run_all(n, log=lambda s: print(s, flush=True))
    bad = problems(res)
    print(f"{len(res)} compiles in {time.perf_counter() - t0:.0f} s; {len(bad)} problems", *bad, *spill_report(res), sep="\n")
    sys.exit(1 if bad else 0)
