"""Helpers shared by the benchmarks: timing, the card's ceilings (copy and read-only bandwidth,
matmul rate), peak memory, run information, output."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
import triton.language as tl

logger = logging.getLogger(__name__)

# The benchmarks target a CUDA GPU; on a machine without one they still run end to end (Triton
# under TRITON_INTERPRET=1, tiny sizes, wall-clock timing) so the scripts can be checked locally.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


_FLUSH_BYTES = 256 << 20
_flush_buffer: torch.Tensor | None = None


def time_ms(
    fn: Callable[[], Any], warmup_ms: float = 10, rep_ms: float = 60, flush: str = "read"
) -> float:
    """Median milliseconds of fn() on the GPU, each call timed with CUDA events after the L2 was
    flushed so that it holds none of fn's inputs.

    flush="read" (default) sums a 256 MB buffer before each call: the 50 MB L2 then holds only
    clean lines of that buffer. flush="write" is triton's do_bench, which zeroes the buffer
    instead: the L2 is then full of dirty lines whose write-back the timed call pays for (up to
    ~17 us at 3 TB/s), a handicap that weighs on short kernels.
    """
    if DEVICE != "cuda":
        import time

        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    if flush == "write":
        import triton.testing

        return float(
            triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        )
    global _flush_buffer
    if _flush_buffer is None:
        _flush_buffer = torch.ones(_FLUSH_BYTES // 4, dtype=torch.float32, device=DEVICE)
    sink = torch.empty((), dtype=torch.float32, device=DEVICE)
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    n = max(5, min(1000, int(rep_ms / estimate)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        torch.sum(_flush_buffer, dim=0, out=sink)
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return float(times[len(times) // 2])


def graph_calls_us(fns: Sequence[Callable[[], Any]], samples: int = 20) -> float:
    """Median microseconds of one replay of a CUDA graph that calls each of `fns` once, in order
    (each warmed up on a side stream first)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(samples):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def graph_replay_us(fn: Callable[[], Any], reps: int = 10, samples: int = 20) -> float:
    """Median microseconds per fn() with `reps` calls captured in one CUDA graph, so launch cost
    is the GPU's own; inputs stay warm in L2 if they fit."""
    return graph_calls_us([fn] * reps, samples) / reps


def best_seconds(fn: Callable[[], Any], runs: int = 5, calls: int = 10) -> float:
    """Seconds per fn() in the fastest of `runs` runs of `calls` back-to-back calls (after a
    warm-up run): a single run of a bandwidth-bound kernel swings by a few percent."""
    cuda = DEVICE == "cuda"
    best = float("inf")
    for run in range(runs + 1):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if cuda:
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) * 1e-3
        else:
            seconds = time.perf_counter() - t0
        if run > 0:  # run 0 warms up
            best = min(best, seconds / calls)
    return best


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy of `nbytes`, counting bytes read plus bytes written (GB/s)."""
    if DEVICE != "cuda":
        nbytes = 1 << 24
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    seconds = best_seconds(lambda: dst.copy_(src))
    return 2 * nbytes / seconds / 1e9


@triton.jit
def _read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # Each program streams BLOCK * 8 elements and keeps one partial sum: nothing but reads.
    base = tl.program_id(0).to(tl.int64) * BLOCK * 8
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(8):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, 0))


def read_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """A kernel that only reads `nbytes` (a sum of bf16 values): bytes read per second (GB/s).
    On the CPU, torch's own float32 sum stands in for the Triton kernel."""
    if DEVICE != "cuda":
        x = torch.ones((1 << 24) // 4, dtype=torch.float32)
        return x.numel() * 4 / best_seconds(lambda: x.sum()) / 1e9
    block = 4096
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=DEVICE).normal_()
    sums = torch.empty(triton.cdiv(x.numel(), block * 8), dtype=torch.float32, device=DEVICE)
    seconds = best_seconds(lambda: _read_kernel[(sums.numel(),)](x, sums, x.numel(), BLOCK=block))
    return nbytes / seconds / 1e9


def matmul_tflops(n: int = 8192) -> float:
    """A bf16 n x n x n matmul of random data (float32 and n = 512 on the CPU): TFLOP/s."""
    dtype = torch.bfloat16
    if DEVICE != "cuda":
        n, dtype = 512, torch.float32
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    seconds = best_seconds(lambda: a @ b, runs=3)
    return 2 * n**3 / seconds / 1e12


def peak_memory_bytes(fn: Callable[[], Any]) -> int:
    """Bytes allocated by one call of fn above what was allocated before it (0 on the CPU)."""
    if DEVICE != "cuda":
        fn()
        return 0
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def allocator_counters() -> dict[str, int]:
    """The CUDA caching allocator's running totals: its cudaMalloc calls, the failed ones it
    retried after freeing its cache (each a device-wide sync), and the bytes it holds; {} on the
    CPU. One call costs tens of microseconds: read it around a run, or per step only where the
    steps are profiled anyway."""
    if DEVICE != "cuda":
        return {}
    stats = torch.cuda.memory_stats()
    return {
        "cuda_mallocs": int(stats.get("num_device_alloc", 0)),
        "alloc_retries": int(stats.get("num_alloc_retries", 0)),
        "reserved_bytes": int(stats.get("reserved_bytes.all.current", 0)),
    }


def git_commit() -> str | None:
    """The checkout's commit (with "+changes" for a dirty tree), or None outside a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+changes" if dirty else "")


def device_info() -> dict[str, Any]:
    if DEVICE == "cuda":
        props = torch.cuda.get_device_properties(0)
        name, num_sms = props.name, props.multi_processor_count
    else:
        name, num_sms = "cpu (TRITON_INTERPRET dry run)", 0
    return {
        "date": time.strftime("%Y-%m-%d"),
        "commit": git_commit(),
        "device": name,
        "num_sms": num_sms,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "host": platform.node(),
    }


def write_json(path: str, payload: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def maybe_pyplot():
    """matplotlib.pyplot with a headless backend, or None (and a message) when it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot")
        return None
    return plt


def check_close(name: str, got: torch.Tensor, expect: torch.Tensor, tol: float = 2e-2) -> float:
    """Relative L2 error against the first implementation; loudly flags a mismatch (the timing of
    an implementation that computes something else means nothing)."""
    err = ((got.float() - expect.float()).norm() / expect.float().norm()).item()
    if not err < tol:  # also catches NaN
        print(f"MISMATCH {name}: relative error {err:.3g} >= {tol}")
    return err


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def empty_cache() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
