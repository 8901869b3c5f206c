"""Host cost of ModelRunner.prepare (fill the staging buffer, upload, build device views) for one
decode step of N sequences, on whatever device is given (the CPU works: no model is run).

    python benchmarks/bench_prepare.py --running 256 --device cpu
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from minivllm import LLM
from minivllm.demo import make_demo_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--running", type=int, default=256)
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--calls", type=int, default=1000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_demo_checkpoint(Path(tmp) / "m", "tiny")
        llm = LLM(str(model_dir), device=args.device, max_model_len=4096,
                  max_num_seqs=max(args.running, 1), num_kv_blocks=20000,
                  max_num_batched_tokens=8192)
    sched, runner = llm.scheduler, llm.model_runner
    prompt = list(range(3, 3 + args.context))
    for i in range(args.running):
        sched.add_request(i, prompt, 1000, ignore_eos=True, temperature=0.6)
    seeds = np.arange(args.running, dtype=np.uint64)
    while True:  # run the prefill so the next Batch is decode-only
        batch = sched.schedule()
        sched.update(runner.execute(batch, seeds[: len(batch.sample_seq_ids)]))
        if batch.num_decodes == len(batch.seq_ids):
            break
    batch = sched.schedule()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(args.calls):
            runner.prepare(batch, seeds)
        times.append((time.perf_counter() - t0) / args.calls)
    print(f"prepare, {args.running} decodes on {args.device}: median {np.median(times) * 1e6:.1f} us"
          f" per call (5 x {args.calls} calls)")


if __name__ == "__main__":
    main()
