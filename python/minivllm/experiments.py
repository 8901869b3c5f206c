"""Opt-in kernel paths: built and tested (the CPU interpreter, tests/gpu), not yet measured faster.

A path that may speed up a step lands here first, off by default, so that one device run can time
it against the default in the same call (`benchmarks/bench_experiments.py`); once measured it
either becomes the default (and its name leaves this table) or is deleted.
MINIVLLM_EXPERIMENTS=name[,name...] turns paths on; "all" turns every one on. It is read when a
layer or runner is built, never per step, so a benchmark can build both variants in one process.
"""

from __future__ import annotations

import os

# name -> what it changes
EXPERIMENTS = {
    "gated_mlp": "gate/up's GEMM ends in SiLU-and-multiply at decode sizes (no activation kernel)",
    "lm_head_gemm": "the LM head on the Triton GEMM for the rows a decode-size step samples",
    "graph_prewarm": "every CUDA graph replayed once at start-up, so no real step is its first",
    "decode_fused_reduce": (
        "split decode attention merges its splits in the last split program (no reduce kernel)"
    ),
    "splitk_norm": (
        "o / down projections add the residual and run the RMSNorm after them in their split-K"
        " GEMM at <= 64 tokens (kernels/linear_norm.py: no norm kernel)"
    ),
    "prefill_tma": "the flash prefill kernel loads its Q and K/V tiles through TMA descriptors",
    "decode_fused_rope": (
        "decode-only steps of <= 16 rows: the decode attention kernel applies the q/k norm and"
        " rotary and stores the new K/V itself (no qk_norm_rope kernel)"
    ),
}

ENV_VAR = "MINIVLLM_EXPERIMENTS"


def enabled_experiments(value: str | None = None) -> frozenset[str]:
    """The names turned on by `value` (default: the environment); ValueError names an unknown
    one, so a typo cannot silently measure the default."""
    if value is None:
        value = os.environ.get(ENV_VAR, "")
    names = {name.strip() for name in value.split(",") if name.strip()}
    if "all" in names:
        return frozenset(EXPERIMENTS)
    unknown = sorted(names - EXPERIMENTS.keys())
    if unknown:
        raise ValueError(
            f"{ENV_VAR}: unknown experiment(s) {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(sorted(EXPERIMENTS))}"
        )
    return frozenset(names)


def experiment_on(name: str) -> bool:
    """Whether the opt-in path `name` (a key of EXPERIMENTS) is on."""
    assert name in EXPERIMENTS, name
    return name in enabled_experiments()
