"""Host time of launching one eager step (prefill / mixed), under cProfile: where the Python time
of a step that does not replay a CUDA graph goes.

Qwen3-0.6B shape, dummy weights, bf16. Fills max_num_batched_tokens with prompts beside a few
running decodes, then profiles `ModelRunner.launch` of such steps (the GPU synchronised before
each, so only the host's own time is measured). The engine runs with enforce_eager (such steps
would otherwise replay the mixed-step CUDA graph); --graphs measures that replay instead.

    python benchmarks/profile_host_step.py --block-size 16 [--graphs]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from minivllm import LLM
from minivllm.demo import make_demo_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--graphs", action="store_true", help="CUDA graphs on (the engine default)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_demo_checkpoint(Path(tmp) / "m", "qwen3-0.6b", write_weights=False)
        llm = LLM(str(model_dir), dtype="bfloat16", load_format="dummy", max_model_len=4096,
                  block_size=args.block_size, enforce_eager=not args.graphs)
    sched, runner = llm.scheduler, llm.model_runner
    rng = np.random.default_rng(0)
    for i in range(64):
        sched.add_request(i, rng.integers(0, 10000, 1000).tolist(), 64, ignore_eos=True,
                          temperature=0.6, seed=i)
    prof = cProfile.Profile()
    launch_ms = []
    for _ in range(args.steps):
        torch.cuda.synchronize()
        batch = runner.schedule(sched)
        t0 = time.perf_counter()
        prof.enable()
        result = runner.launch(batch, staged=True)
        prof.disable()
        launch_ms.append((time.perf_counter() - t0) * 1e3)
        tokens = result.result()
        sched.update(tokens)
        print(f"step: {batch.num_tokens} tokens, {batch.num_decodes} decodes, launch "
              f"{launch_ms[-1]:.2f} ms (profiled)")
    # Unprofiled launch times of the same kind of step.
    plain = []
    for i in range(64, 128):
        sched.add_request(i, rng.integers(0, 10000, 1000).tolist(), 64, ignore_eos=True,
                          temperature=0.6, seed=i)
    for _ in range(args.steps):
        torch.cuda.synchronize()
        batch = runner.schedule(sched)
        t0 = time.perf_counter()
        result = runner.launch(batch, staged=True)
        plain.append((time.perf_counter() - t0) * 1e3)
        sched.update(result.result())
    print("unprofiled launch ms:", [round(x, 2) for x in plain])
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    print(s.getvalue()[-6000:])


if __name__ == "__main__":
    main()
