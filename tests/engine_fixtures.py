"""Shared helpers and session fixtures for the engine tests: tiny random Qwen3 checkpoints made
with transformers (float32) plus the demo tokenizer, and transformers' greedy outputs as oracle.

Fixtures are re-exported by tests/conftest.py.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from minivllm import LLM
from minivllm.demo import save_demo_tokenizer
from minivllm.engine.cuda_graphs import CudaGraphRunner, GraphInputs

# hidden 64, 2 layers, 4 heads / 2 KV heads (GQA), head_dim 16, vocab 512 = the demo tokenizer's.
# initializer_range 0.3 makes greedy outputs varied rather than one repeated token.
TINY_QWEN3 = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=2048,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    initializer_range=0.3,
    eos_token_id=2,
    pad_token_id=0,
    bos_token_id=None,
)


def have_cpp_scheduler() -> bool:
    try:
        return hasattr(importlib.import_module("minivllm._core"), "Scheduler")
    except ImportError:
        return False


SCHEDULERS = [
    "python",
    pytest.param(
        "cpp",
        marks=pytest.mark.skipif(not have_cpp_scheduler(), reason="C++ core not built yet"),
    ),
]


def make_hf_checkpoint(
    path: Path,
    *,
    architecture: str = "qwen3",
    seed: int = 0,
    max_shard_size: str | None = None,
    tokenizer: bool = True,
    **overrides: Any,
) -> Path:
    """Save a random transformers Qwen3 (or Qwen2) model in float32, plus the demo tokenizer."""
    import transformers

    cfg_cls, model_cls = {
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[architecture]
    kwargs = {**TINY_QWEN3, **overrides}
    if architecture == "qwen2":
        kwargs.pop("head_dim")
    config = cfg_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    save_kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(str(path), **save_kwargs)
    if tokenizer:
        save_demo_tokenizer(path, vocab_size=512, model_max_length=config.max_position_embeddings)
    return path


@functools.lru_cache(maxsize=8)
def hf_model(path: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@functools.lru_cache(maxsize=4096)
def _hf_greedy(
    path: str, prompt: tuple[int, ...], max_new_tokens: int, device: str
) -> tuple[int, ...]:
    model = hf_model(path).to(device)
    ids = torch.tensor([prompt], device=device)
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return tuple(out[0, len(prompt) :].tolist())


def hf_greedy(
    path: str | Path, prompt: list[int], max_new_tokens: int, device: str = "cpu"
) -> list[int]:
    """transformers' greedy generate (float32, on `device`), ignoring eos (the engine runs with
    ignore_eos=True)."""
    return list(_hf_greedy(str(path), tuple(prompt), max_new_tokens, device))


def make_llm(path: str | Path, **kwargs: Any) -> LLM:
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("scheduler", "python")
    kwargs.setdefault("max_model_len", 512)
    kwargs.setdefault("max_num_seqs", 16)
    kwargs.setdefault("max_num_batched_tokens", 512)
    return LLM(str(path), **kwargs)


def mixed_prompts(
    n: int = 6, seed: int = 1, min_len: int = 1, max_len: int = 60
) -> list[list[int]]:
    """Random token-id prompts of mixed lengths (ids 3.. so no special tokens)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=gen).tolist()
    lengths[0] = min_len  # always include the shortest
    return [torch.randint(3, 512, (m,), generator=gen).tolist() for m in lengths]


def assert_all_blocks_free(llm: LLM) -> None:
    assert llm.num_free_blocks == llm.runtime.num_kv_blocks
    assert not llm.scheduler.has_unfinished()


def interrupt_launch(llm: LLM, monkeypatch: pytest.MonkeyPatch, at_call: int) -> None:
    """Make the model runner's `at_call`-th launch raise KeyboardInterrupt (a Ctrl-C mid-run)."""
    calls = {"n": 0}
    real_launch = llm.model_runner.launch

    def flaky(batch, *rest):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt
        return real_launch(batch, *rest)

    monkeypatch.setattr(llm.model_runner, "launch", flaky)


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tied embeddings, one model.safetensors file."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("tiny_qwen3"))


@pytest.fixture(scope="session")
def gpu_qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """For tests/gpu: the Triton kernels' head_dim 64, 4 heads over 2 KV heads (GQA 2; one KV
    head per rank at tensor_parallel_size=2), float32 weights."""
    return make_hf_checkpoint(
        tmp_path_factory.mktemp("gpu_qwen3"),
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
    )


@pytest.fixture(scope="session")
def tiny_qwen3_sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Untied LM head, head_dim 32, sharded into several files with an index json."""
    return make_hf_checkpoint(
        tmp_path_factory.mktemp("tiny_qwen3_sharded"),
        seed=1,
        head_dim=32,
        tie_word_embeddings=False,
        max_shard_size="100KB",
    )


@pytest.fixture(scope="session")
def tiny_llm(tiny_qwen3: Path) -> LLM:
    """One shared engine for tests that only generate (they must leave it clean)."""
    return make_llm(tiny_qwen3)


class EagerGraphRunner(CudaGraphRunner):
    """A stand-in graph runner for the CPU: `replay` and `replay_mixed` run the runner's forward
    (placeholder resolution included) eagerly on the fixed views a captured graph would read,
    after checking the padding the runner staged; they record what they ran."""

    def __init__(self, runner, mixed_tokens: int = 0):
        # What the Triton launch of `mixed_tokens` query tokens tiles by (flash_prefill).
        from minivllm.kernels.flash_prefill import tile_config

        mc = runner.config.model_config
        group = mc.num_attention_heads // mc.num_key_value_heads
        block_m = tile_config(
            runner.config.block_size, group, mc.num_key_value_heads, mixed_tokens, runner.device
        )[0]
        super().__init__(
            runner._forward,
            GraphInputs.from_staging(runner.staging),
            runner.config.max_num_seqs,
            mixed_tokens,
            block_m // group,
        )
        self.replayed: list[tuple[int, int]] = []
        self.replayed_mixed: list[int] = []
        self.replayed_buckets: list[int] = []

    def replay(self, num_decodes: int) -> torch.Tensor:
        bs = self.bucket(num_decodes)
        x = self.inputs
        assert x.seq_lens[num_decodes:bs].eq(0).all()
        assert x.slot_mapping[num_decodes:bs].eq(-1).all()
        # The decode kernel's row order: a permutation of the bucket, longest context first.
        order, lens = x.decode_order[:bs].numpy(), x.seq_lens[:bs].numpy()
        assert np.array_equal(np.sort(order), np.arange(bs))
        assert (np.diff(lens[order]) <= 0).all(), (order, lens)
        self.replayed.append((num_decodes, bs))
        return self.forward(x.input_ids[:bs], x.positions[:bs], self._metadata(bs))[:num_decodes]

    def replay_mixed(self, num_tokens: int) -> torch.Tensor:
        from minivllm.kernels.flash_prefill import build_tile_table

        x, total = self.inputs, self.mixed_bucket(num_tokens)
        assert x.slot_mapping[num_tokens:total].eq(-1).all()
        cu = x.cu_seqlens.numpy()
        rows = int((cu[1:] > cu[:-1]).sum())
        assert cu[rows] == num_tokens and (cu[rows:] == num_tokens).all()
        assert x.seq_lens[rows:].eq(0).all()
        expect = np.zeros(x.tiles.shape[0], dtype=np.int32)
        build_tile_table(
            cu[: rows + 1], x.seq_lens.numpy()[:rows], self.tokens_per_tile(total), expect
        )
        assert np.array_equal(x.tiles.numpy(), expect)
        self.replayed_mixed.append(num_tokens)
        self.replayed_buckets.append(total)
        meta = self._mixed_metadata(total)
        return self.forward(x.input_ids[:total], x.positions[:total], meta)[:num_tokens]
