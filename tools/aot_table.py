"""Every Triton kernel, every tile configuration and dtype, compiled ahead of time for sm_80 and
sm_90 with no GPU: registers, spills and shared memory per configuration (docs/design.md).

    python -m tools.aot_table [--out bench/results/triton-aot] [--arch 80 90] [--jobs N]

writes ``table.md`` and ``table.json`` there; tests/kernels/test_aot.py runs it into a temporary
folder and checks every row against the target's limits.

Each row compiles exactly what a launch on a CUDA device would: the op's CUDA implementation
(``_merge``, ``_forward``, ... with backend "triton") runs on CPU tensors of the model's shapes under
``force_tiles`` with its jitted kernels swapped for recorders, and the recorded arguments go
through Triton's own binder, so constexprs, num_warps / num_stages, argument types and the
16-byte alignment / divisibility specialisation are the launcher's, not a copy of them. Shared
memory is the compiled kernel's metadata; registers and spill bytes come from ``ptxas -v`` (the
driver reports them only after loading the module on a GPU) and describe the cubin a launch
would load: on a fresh compile they are the log of Triton's own ptxas run (it passes ``-v``;
``TRITON_DUMP_PTXAS_LOG`` prints it), on a Triton cache hit the figures recorded for those very
bytes (``usage/`` under the Triton cache, keyed by the hash of PTX, cubin and ptxas version), and
where there are none ``ptxas -v`` runs again with ``make_cubin``'s flags and its cubin must be
Triton's byte for byte.

The (tile configuration, dtype) units run in a process pool (``--jobs``, default: the CPUs this
process may use); each records its launches and compiles them for every arch.

Needs a native triton: with ``TRITON_INTERPRET=1`` triton.jit builds interpreter kernels.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

import torch

from fusedvlm.backend import force_tiles, interpreter_enabled

ARCHS = (80, 90)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "bench" / "results" / "triton-aot"

# Shapes of the model's own launches (docs/design.md: a ViT-L/14-336 tower of width 1024 on a
# 24 x 24 grid, a fusion decoder of 16 heads of 64 with causal packed attention, psi on SmolLM2's
# 576-wide hidden states). Beyond the head dim (BLOCK_D, and with the dtype the attention tiles
# the launcher picks) and the query/key-value head ratio (GROUP), only their divisibility by 16
# reaches the compiled code.
VIEWS, GRID, WIDTH = 2, 24, 1024
HEADS, HEAD_DIM, SEGMENTS = (16, 16), 64, (300, 211)
PSI_WIDTH, PSI_PAIRS = 576, (96, 41)


@dataclass
class Row:
    kernel: str
    config_name: str
    config: tuple
    dtype: str
    arch: str
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    shared_bytes: int
    cubin_bytes: int
    default: bool  # the launcher picks this configuration for this dtype on the model's shapes
    constexprs: dict
    triton: str


def _module(name: str):
    import importlib

    return importlib.import_module(f"fusedvlm.kernels.{name}")


class _Recorder:
    """Stands in for a jitted kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.fn, args, kwargs))


@contextlib.contextmanager
def _recording(module):
    calls = []
    real = module._kernels(False)
    with mock.patch.object(module, "_kernels", lambda interpret: tuple(_Recorder(f, calls) for f in real)):
        yield calls


def _run_local_merge(dtype):
    lm = _module("local_merge")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(VIEWS, GRID * GRID, WIDTH, generator=g).to(dtype)
    weight = torch.randn(WIDTH, WIDTH, 3, 3, generator=g).to(dtype)
    lf = torch.randn(WIDTH, generator=g).to(dtype)
    # The fusion module's call: residual, no bias (fusedvlm/model/fusion_module.py).
    out = lm._merge(x, weight, lf, None, True, GRID, GRID, "triton")
    lm._merge_backward(torch.randn_like(out), x, weight, False, True, GRID, GRID, [True, True, True], "triton")


def _attention_inputs(dtype):
    cu = torch.tensor([0, *torch.tensor(SEGMENTS).cumsum(0).tolist()], dtype=torch.int32)
    t = int(cu[-1])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(t, HEADS[i > 0], HEAD_DIM, generator=g).to(dtype) for i in range(3))
    return q, k, v, cu, max(SEGMENTS), HEAD_DIM**-0.5


def _run_attention_fwd(dtype):
    q, k, v, cu, mx, scale = _attention_inputs(dtype)
    _module("packed_attention")._forward(q, k, v, cu, cu, mx, mx, True, scale, "triton")


def _run_attention_bwd(dtype):
    q, k, v, cu, mx, scale = _attention_inputs(dtype)
    lse = torch.zeros(HEADS[0], q.shape[0])
    _module("packed_attention")._backward(q.clone(), q, k, v, q.clone(), lse, cu, cu, mx, mx, True, scale, "triton")


def _run_pairwise(dtype):
    cu = torch.tensor([0, *torch.tensor(PSI_PAIRS).cumsum(0).tolist()], dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(int(cu[-1]), PSI_WIDTH, generator=g).to(dtype) for _ in range(2))
    # psi's default (fusedvlm/analysis/psi.py).
    _module("pairwise_cosine")._stats(a, b, cu, True, "triton")


# TILE_CONFIGS name -> (module, the launch that uses it, the kernels whose tiles it sets).
LAUNCHES = {
    "local_merge": (
        "local_merge",
        _run_local_merge,
        ("_local_merge_fwd_kernel", "_local_merge_dx_kernel", "_local_merge_dw_kernel"),
    ),
    "packed_attention_fwd": ("packed_attention", _run_attention_fwd, ("_fwd_kernel",)),
    "packed_attention_bwd": ("packed_attention", _run_attention_bwd, ("_bwd_dkdv_kernel", "_bwd_dq_kernel")),
    "pairwise_cosine_row": ("pairwise_cosine", _run_pairwise, ("_row_kernel",)),
    "pairwise_cosine_gram": ("pairwise_cosine", _run_pairwise, ("_gram_kernel",)),
}


def launches(config_name: str, config: tuple | None, dtype: torch.dtype) -> list[tuple]:
    """(kernel, args, kwargs) of each distinct launch of the kernels ``config_name`` tiles, with
    ``config`` forced (None: the launcher's own choice), on the model's shapes in ``dtype``."""
    module_name, run, kernels = LAUNCHES[config_name]
    module = _module(module_name)
    forced = {} if config is None else {config_name: config}
    with _recording(module) as calls, force_tiles(**forced):
        run(dtype)
    seen, out = set(), []
    for fn, args, kwargs in calls:
        key = (fn.__name__, repr(args_key(args)), repr(sorted(kwargs.items())))
        if fn.__name__ in kernels and key not in seen:
            seen.add(key)
            out.append((fn, args, kwargs))
    return out


def _launch_key(fn, kwargs) -> tuple:
    return fn.__name__, tuple(sorted(kwargs.items()))


def args_key(args):
    """What of an argument reaches the compile: a tensor's dtype and alignment, a value otherwise."""
    return tuple((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a for a in args)


def compile_launch(fn, args, kwargs, arch: int):
    """``triton.compile`` of one recorded launch for ``sm_<arch>``, with the ASTSource and options
    Triton's ``JITFunction.run`` would build on such a device -> (compiled kernel, options, the
    ``ptxas -v`` log of Triton's own ptxas run: empty on a Triton cache hit)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, specialization, options = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    log = io.StringIO()
    # make_cubin runs ptxas with -v and prints its log under this knob (not part of Triton's cache
    # key); each pool worker compiles one kernel at a time, so the captured output is this one's.
    with mock.patch.dict(os.environ, {"TRITON_DUMP_PTXAS_LOG": "1"}), contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    return compiled, options, log.getvalue()


_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def ptxas_usage(ptx: str, arch: int, fp_fusion: bool) -> tuple[dict, bytes]:
    """Registers, spill and stack bytes of ``ptx`` from Triton's bundled ptxas, run with the flags
    of Triton's ``make_cubin`` (the register allocator options change the count) -> (usage, cubin)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        src.write_text(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", *([] if fp_fusion else ["--fmad=false"]), "-v"]
        cmd += ["--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", str(out)]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
        cubin = out.read_bytes()
    return parse_ptxas_log(log), cubin


def parse_ptxas_log(log: str) -> dict:
    regs, spills = _PTXAS_REGS.findall(log), _PTXAS_SPILLS.findall(log)
    if len(regs) != 1 or len(spills) != 1:
        raise RuntimeError(f"unexpected ptxas -v output (one kernel per PTX expected):\n{log}")
    stack, stores, loads = map(int, spills[0])
    return dict(registers=int(regs[0]), spill_stores=stores, spill_loads=loads, stack_bytes=stack)


def cubin_usage(compiled, options, arch: int, log: str) -> dict:
    """Registers, spills and stack of the cubin Triton returned (see the module docstring: its
    own ptxas log, the figures recorded for the same PTX, cubin and ptxas, or a checked rerun)."""
    from triton import knobs
    from triton.backends.nvidia.compiler import get_ptxas_version

    ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
    key = hashlib.sha256(ptx.encode() + b"\0" + cubin + b"\0" + get_ptxas_version(arch).encode()).hexdigest()
    path = Path(knobs.cache.dir) / "usage" / f"{key}.json"
    if log:
        usage = parse_ptxas_log(log)
    elif path.exists():
        return json.loads(path.read_text())
    else:
        usage, ptxas_cubin = ptxas_usage(ptx, arch, options.enable_fp_fusion)
        if ptxas_cubin != cubin:  # another ptxas, or the kernel's .py touched since (mtime in the line table)
            raise RuntimeError("ptxas -v built another cubin than Triton")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(usage))
    tmp.replace(path)  # atomic: a worker or suite killed midway leaves no half-written record
    return usage


def compile_row(config_name, config, dtype_name, fn, args, kwargs, arch, default) -> Row:
    import triton

    compiled, options, log = compile_launch(fn, args, kwargs, arch)
    cubin = compiled.asm.get("cubin")
    if not cubin:
        raise RuntimeError("no cubin")
    usage = cubin_usage(compiled, options, arch, log)
    constexprs = {p.name: kwargs[p.name] for p in fn.params if p.is_constexpr}
    return Row(
        kernel=fn.__name__,
        config_name=config_name,
        config=tuple(config),
        dtype=dtype_name,
        arch=f"sm_{arch}",
        num_warps=options.num_warps,
        num_stages=options.num_stages,
        shared_bytes=int(compiled.metadata.shared),
        cubin_bytes=len(cubin),
        default=default,
        constexprs=constexprs,
        triton=triton.__version__,
        **usage,
    )


def dtypes_of(module_name: str) -> tuple[str, ...]:
    """The dtypes the op takes (its module's ``_DTYPES``; packed attention checks fp32/fp16/bf16 inline)."""
    supported = getattr(_module(module_name), "_DTYPES", tuple(DTYPES.values()))
    return tuple(name for name, d in DTYPES.items() if d in supported)


def _unit(config_name: str, config, dtype_name: str, archs, chosen: set) -> tuple[list[Row], list[str], list[str]]:
    """One tile configuration in one dtype: its launches recorded, each compiled for every arch
    -> (rows, failures, progress lines). Runs in a pool worker."""
    _, _, kernels = LAUNCHES[config_name]
    rows, failures, lines = [], [], []
    recorded = launches(config_name, config, DTYPES[dtype_name])
    missing = set(kernels) - {fn.__name__ for fn, _, _ in recorded}
    if missing:
        failures.append(f"{config_name} {config} {dtype_name}: no launch of {sorted(missing)}")
    for fn, args, kwargs in recorded:
        for arch in archs:
            t0 = time.perf_counter()
            what = f"{fn.__name__} {config} {dtype_name} sm_{arch}"
            try:
                default = _launch_key(fn, kwargs) in chosen
                rows.append(compile_row(config_name, config, dtype_name, fn, args, kwargs, arch, default))
            except Exception as e:  # each failure is reported; the other configurations still compile
                failures.append(f"{what}: {type(e).__name__}: {e}")
            lines.append(f"{what} {time.perf_counter() - t0:.1f} s")
    return rows, failures, lines


def _worker_init():
    # One compile per worker at a time: torch's own threads would only contend with the others.
    torch.set_num_threads(1)


def build(archs=ARCHS, progress=None, jobs: int = 1) -> tuple[list[Row], list[str]]:
    """Every TILE_CONFIGS entry x dtype x arch -> (rows, failures), in ``jobs`` processes. A
    configuration that does not compile is a failure line, never a missing row."""
    if interpreter_enabled():
        raise RuntimeError("TRITON_INTERPRET is set: the kernels would be interpreter kernels; unset it")
    rows, failures = [], []
    # spawn, not fork: the workers start clean rather than inheriting this process's OpenMP pool.
    with (
        concurrent.futures.ProcessPoolExecutor(
            jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init
        )
        if jobs > 1
        else contextlib.nullcontext()
    ) as pool:
        units = []  # submitted as they are found, so the workers start while the defaults are recorded
        for config_name, (module_name, _, _) in LAUNCHES.items():
            for dtype_name in dtypes_of(module_name):
                launched = launches(config_name, None, DTYPES[dtype_name])
                chosen = {_launch_key(fn, kwargs) for fn, _, kwargs in launched}
                for config in _module(module_name).TILE_CONFIGS[config_name]:
                    unit = (config_name, config, dtype_name, tuple(archs), chosen)
                    units.append(pool.submit(_unit, *unit) if pool else unit)
        for unit in units:  # in unit order, so the table's order does not depend on timing
            unit_rows, unit_failures, lines = unit.result() if pool else _unit(*unit)
            rows += unit_rows
            failures += unit_failures
            for line in lines if progress else ():
                progress(line)
    return rows, failures


def markdown(rows: list[Row], failures: list[str], command: str) -> str:
    import triton

    lines = [
        "# Triton kernels compiled ahead of time (no GPU)",
        "",
        f"Command: `{command}` (triton {triton.__version__}, torch {torch.__version__}).",
        "Registers and spill bytes per thread from `ptxas -v` (Triton's bundled ptxas, its own flags), shared",
        "memory per block from the compiled metadata; limits: 255 registers, 163 KiB (sm_80) / 227 KiB (sm_90)",
        "of shared memory per block. Tiles: the kernel's BLOCK_* constexprs under each `TILE_CONFIGS` entry of its",
        "module (the JSON has the entry and every constexpr); sm_90 compiles for sm_90a, as Triton does. The launch",
        "arguments are recorded from the op's CUDA launcher on the model's shapes (see tools/aot_table.py); default:",
        "the configuration that launcher picks for the dtype there, the others run only when forced (`force_tiles`).",
        "",
        "| kernel | tiles | dtype | arch | warps | stages | default | registers | spill stores | spill loads | shared bytes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    order = list(LAUNCHES)
    for r in sorted(rows, key=lambda r: (order.index(r.config_name), r.kernel, r.config, list(DTYPES).index(r.dtype))):
        tiles = " ".join(f"{k[6:]}={v}" for k, v in r.constexprs.items() if k.startswith("BLOCK_"))
        lines.append(
            f"| {r.kernel} | {tiles} | {r.dtype} | {r.arch} | {r.num_warps} | {r.num_stages} | {'yes' if r.default else ''} | "
            f"{r.registers} | {r.spill_stores} | {r.spill_loads} | {r.shared_bytes} |"
        )
    lines += ["", "Failures: " + ("none" if not failures else ""), *(f"* {f}" for f in failures), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)), help="worker processes")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    progress = None if a.quiet else lambda s: print(s, file=sys.stderr, flush=True)
    rows, failures = build(tuple(a.arch), progress, jobs=max(1, a.jobs))
    a.out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m tools.aot_table", *(sys.argv[1:] if argv is None else argv)])
    (a.out / "table.json").write_text(
        json.dumps(
            {
                "command": command,
                "wall_s": round(time.perf_counter() - t0, 1),
                "rows": [asdict(r) for r in rows],
                "failures": failures,
            },
            indent=1,
        )
        + "\n"
    )
    (a.out / "table.md").write_text(markdown(rows, failures, command))
    if not a.quiet:
        print(f"{len(rows)} compiles, {len(failures)} failures, {time.perf_counter() - t0:.0f} s -> {a.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
