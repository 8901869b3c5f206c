"""Where a recorded run's time went, by kind of step (prefill / mixed, or decode by how many rows)
against each step's roofline (and its flop-aware bound, roofline.py): the step kinds
bench_throughput.py and profile_workload.py report."""

from __future__ import annotations

from typing import Any

from roofline import Ceilings, ModelCost
from steps import StepRecord

DECODE_KINDS = ((16, "decode 1-16"), (64, "decode 17-64"), (160, "decode 65-160"))


def step_kind(num_tokens: int, num_decodes: int) -> str:
    if num_tokens != num_decodes:
        return "prefill / mixed"
    return next((kind for most, kind in DECODE_KINDS if num_decodes <= most), "decode 161-256")


def step_breakdown(
    records: list[StepRecord], start: float, end: float, cost: ModelCost, ceilings: Ceilings
) -> dict[str, Any]:
    """Where the timed run went, by kind of step against each step's roofline. A step's time
    runs from when the GPU could start it (its launch, or the previous step's ids read back, if
    later) to its own ids read back; steps without sampled rows are folded into the next one's.
    With async scheduling the launches run ahead, so this is GPU-side time plus any wait for the
    host; what is left of the wall time went to steps that never waited for the GPU."""
    groups: dict[str, list[float]] = {}
    prev_end, covered, pending_roof = start, 0.0, 0.0
    timed = []
    for index, r in enumerate(records):
        shape = (r.num_tokens, r.num_decodes, r.num_samples, r.context_tokens, r.pairs)
        roof = cost.step_seconds(*shape, ceilings)
        g = groups.setdefault(step_kind(r.num_tokens, r.num_decodes), [0, 0.0, 0.0, 0.0])
        g[0] += 1
        g[2] += roof
        g[3] += cost.step_seconds(*shape, ceilings, flop_aware=True)
        if r.read is None:  # no sampled rows: its time shows up in the next step's
            pending_roof += roof
            continue
        seconds = r.read - max(prev_end, r.launched)
        g[1] += seconds
        covered += seconds
        timed.append(
            {
                "ms": seconds * 1e3,
                "step": index,
                "offset_s": r.launched - start,
                "tokens": r.num_tokens,
                "decodes": r.num_decodes,
                "roofline_ms": (roof + pending_roof) * 1e3,
                # the host's part: its launch call, and how long after the previous step's ids
                # came back it started (negative: launched ahead, as async scheduling does)
                "host_ms": r.host_s * 1e3,
                "launched_after_prev_ms": (r.launched - prev_end) * 1e3,
            }
        )
        prev_end, pending_roof = r.read, 0.0
    return {
        "slowest_steps": sorted(timed, key=lambda st: -st["ms"])[:6],
        "num_steps": len(records),
        "seconds_in_steps": covered,
        "seconds_outside": (end - start) - covered,
        "by_kind": {
            k: {"steps": g[0], "seconds": g[1], "roofline_s": g[2], "flop_aware_roofline_s": g[3]}
            for k, g in sorted(groups.items())
        },
    }
