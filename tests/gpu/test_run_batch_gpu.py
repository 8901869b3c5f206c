"""run-batch on the GPU: one engine answers as LLM.generate does, and engine processes on two
GPUs (data parallel without Ray, one GPU each) answer as one engine does. Run on the device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from batch_testing import ENGINE_ARGS, expected_choices, keyed, make_batch, read_output
from minivllm import LLM
from minivllm.entrypoints.run_batch import run_batch

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600)]

GPU_ARGS = {**ENGINE_ARGS, "device": "cuda", "dtype": "float32", "num_kv_blocks": 256}


@pytest.fixture(scope="module")
def gpu_batch(gpu_qwen3: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The mixed 200-line file on the GPU checkpoint, and its answers through one engine."""
    folder = tmp_path_factory.mktemp("gpu_batch")
    lines = make_batch(str(gpu_qwen3))
    batch = folder / "in.jsonl"
    batch.write_text("".join(x + "\n" for x in lines))
    out = folder / "one_engine.jsonl"
    summary = run_batch(str(batch), str(out), str(gpu_qwen3), use_tqdm=False, **GPU_ARGS)
    assert (summary.num_ok, summary.num_failed) == (190, 10)
    return batch, out


def test_one_engine_equals_generate(gpu_qwen3, gpu_batch):
    batch, out = gpu_batch
    llm = LLM(str(gpu_qwen3), **GPU_ARGS)
    expected = expected_choices(llm, batch.read_text().splitlines())
    for line in read_output(out):
        if line["error"] is None:
            body = line["response"]["body"]
            texts = [c.get("text", c.get("message", {}).get("content")) for c in body["choices"]]
            got = list(zip(texts, [c["finish_reason"] for c in body["choices"]]))
            assert got == expected[line["custom_id"]], line["custom_id"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_replica_processes_equal_one_engine(gpu_qwen3, gpu_batch, tmp_path):
    batch, one = gpu_batch
    out = tmp_path / "out.jsonl"
    args = {k: v for k, v in GPU_ARGS.items() if k != "device"}  # each replica gets its GPU
    summary = run_batch(
        str(batch),
        str(out),
        str(gpu_qwen3),
        data_parallel_size=2,
        use_ray=False,
        use_tqdm=False,
        **args,
    )
    assert (summary.num_ok, summary.num_failed) == (190, 10)
    assert keyed(read_output(out)) == keyed(read_output(one))
