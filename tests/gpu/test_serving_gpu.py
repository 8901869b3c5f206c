"""`minivllm serve` on the GPU (the engine process with CUDA graphs and async scheduling): 16
concurrent greedy streams return what LLM.generate returns, and a stream the client drops is
aborted with every KV block back in the pool. Run on the device."""

from __future__ import annotations

import asyncio
import gc

import httpx
import openai
import pytest
import torch
from engine_fixtures import mixed_prompts
from minivllm import LLM, SamplingParams
from serving_utils import MODEL_NAME, RemoteServer, engine_cli_args

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600)]

ARGS = {
    "device": "cuda", "dtype": "float32", "max_model_len": 512, "max_num_seqs": 32,
    "max_num_batched_tokens": 1024, "num_kv_blocks": 256,
}  # fmt: skip


def test_server_on_the_gpu_equals_offline(gpu_qwen3):
    prompts = mixed_prompts(16, seed=21, min_len=1, max_len=100)
    lengths = [8 + (5 * i) % 17 for i in range(16)]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    llm = LLM(str(gpu_qwen3), **ARGS)
    want = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
    llm.close()
    del llm
    gc.collect()
    torch.cuda.empty_cache()

    server = RemoteServer(gpu_qwen3, *engine_cli_args(**ARGS), startup_timeout_s=300)
    try:

        async def one(ac, prompt, n):
            stream = await ac.completions.create(
                model=MODEL_NAME, prompt=prompt, max_tokens=n, temperature=0, stream=True,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            return "".join([c.choices[0].text async for c in stream if c.choices])

        async def main():
            async with openai.AsyncOpenAI(**server.openai_kwargs()) as ac:
                return await asyncio.gather(*(one(ac, p, n) for p, n in zip(prompts, lengths)))

        assert asyncio.run(main()) == want

        body = {"model": MODEL_NAME, "prompt": prompts[0], "max_tokens": 400, "stream": True,
                "ignore_eos": True}  # fmt: skip
        with (
            httpx.Client(timeout=60.0) as http,
            http.stream("POST", server.url("/v1/completions"), json=body) as r,
        ):
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        # The connection closed mid-stream: the request is aborted, its blocks freed.
        server.wait_all_blocks_free()
    finally:
        server.stop()
