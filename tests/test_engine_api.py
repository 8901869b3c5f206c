"""The user-facing surface: outputs and metrics, chat, the progress bar, the demo checkpoint, the
CLI and MinivLLM's LLMEngine(config=dict)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from engine_fixtures import (
    EagerGraphRunner,
    assert_all_blocks_free,
    hf_greedy,
    make_llm,
    mixed_prompts,
)
from minivllm import LLMEngine, RequestOutput, SamplingParams
from minivllm.cli import main
from minivllm.demo import make_demo_checkpoint
from minivllm.engine import warmup
from transformers import AutoTokenizer


def test_outputs_in_prompt_order_with_metrics(tiny_llm, tiny_qwen3):
    tok = tiny_llm.get_tokenizer()
    prompts = ["The quick brown fox", [7, 8, 9], "Hello! How are you today?"]
    sp = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 9, 5)]
    outs = tiny_llm.generate(prompts, sp, use_tqdm=False)
    assert all(isinstance(o, RequestOutput) and o.finished for o in outs)
    assert [o.prompt for o in outs] == [prompts[0], None, prompts[2]]
    assert outs[1].prompt_token_ids == [7, 8, 9]
    assert outs[0].prompt_token_ids == tok.encode(prompts[0])
    assert len({o.request_id for o in outs}) == 3
    for o, params in zip(outs, sp):
        c = o.outputs[0]
        assert c.index == 0 and len(c.token_ids) == params.max_tokens
        assert c.token_ids == hf_greedy(tiny_qwen3, o.prompt_token_ids, params.max_tokens)
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
        m = o.metrics
        assert 0 <= m.time_to_first_token <= m.latency
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
    # a single string prompt and a single token-id prompt both give one output
    assert len(tiny_llm.generate("Hello", use_tqdm=False)) == 1
    assert len(tiny_llm.generate([5, 6, 7], use_tqdm=False)) == 1
    assert tiny_llm.generate([], use_tqdm=False) == []


def test_chat_applies_template(tiny_llm):
    conv = [{"role": "user", "content": "What is the capital of France?"}]
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    out = tiny_llm.chat(conv, sp, use_tqdm=False)
    expected = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert out[0].prompt == expected
    tok = tiny_llm.get_tokenizer()
    assert out[0].prompt_token_ids == tok.encode(expected, add_special_tokens=False)
    assert out[0].prompt_token_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    two = tiny_llm.chat(
        [conv, conv + [{"role": "assistant", "content": "Paris"}]], sp, use_tqdm=False
    )
    assert two[0].outputs[0].token_ids == out[0].outputs[0].token_ids
    assert len(two[1].prompt_token_ids) > len(two[0].prompt_token_ids)
    assert_all_blocks_free(tiny_llm)


def test_progress_bar_shows_throughput(tiny_llm, capsys):
    tiny_llm.generate(mixed_prompts(3), SamplingParams(max_tokens=4), use_tqdm=True)
    err = capsys.readouterr().err
    assert "Processed prompts" in err and "prefill" in err and "decode" in err and "tok/s" in err
    tiny_llm.generate(mixed_prompts(3), SamplingParams(max_tokens=4), use_tqdm=False)
    assert capsys.readouterr().err == ""


def test_progress_bar_rates_are_current(monkeypatch, capsys):
    """The bar's rates cover the last seconds (as vLLM's do), not the whole run: a prefill burst
    at the start stops counting once decoding has gone on for a while."""
    from minivllm import progress

    clock = {"t": 0.0}
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock["t"])
    bar = progress.Progress(4, enabled=True)
    clock["t"] = 1.0
    bar.step(10_000, 0, 0)  # a prefill of 10,000 tokens in the first second
    assert "prefill 10,000 tok/s" in bar.bar.postfix
    for t in range(2, 13):  # then 100 output tokens a second
        clock["t"] = float(t)
        bar.step(0, 100, 0)
    assert "prefill 0 tok/s" in bar.bar.postfix
    assert "decode 100 tok/s" in bar.bar.postfix
    bar.step(0, 100, 1)
    bar.close()
    assert "1/4" in capsys.readouterr().err


def test_demo_checkpoint_is_a_real_hf_checkpoint(tmp_path):
    path = make_demo_checkpoint(tmp_path / "tiny", size="tiny")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert len(tok) <= 512 and tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode("Any text at all: ünïcødé ✓")
    assert tok.decode(ids) == "Any text at all: ünïcødé ✓"  # byte-level: nothing is unknown
    # transformers reads it too, and both engines agree greedily.
    llm = make_llm(path)
    prompt = tok.encode("Hello! How are you today?")
    out = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False
    )
    assert out[0].outputs[0].token_ids == hf_greedy(path, prompt, 8)


def test_demo_qwen3_06b_shape(tmp_path):
    path = make_demo_checkpoint(tmp_path, size="qwen3-0.6b", write_weights=False)
    config = json.loads((path / "config.json").read_text())
    expected = dict(
        hidden_size=1024,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=3072,
        vocab_size=151936,
        tie_word_embeddings=True,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        max_position_embeddings=40960,
    )
    assert {k: config[k] for k in expected} == expected
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert not (path / "model.safetensors").exists()
    assert AutoTokenizer.from_pretrained(path, local_files_only=True).chat_template


def test_ids_beyond_tokenizer_vocab_decode(tmp_path):
    # Model vocab 4096, tokenizer 512: random weights sample ids the tokenizer does not know.
    path = make_demo_checkpoint(tmp_path, size="tiny", write_weights=False, vocab_size=4096)
    llm = make_llm(path, load_format="dummy")
    outs = llm.generate(
        ["Hello"] * 4,
        SamplingParams(temperature=1.0, max_tokens=32, seed=3, ignore_eos=True),
        use_tqdm=False,
    )
    ids = [t for o in outs for t in o.outputs[0].token_ids]
    assert max(ids) >= 512
    assert all(isinstance(o.outputs[0].text, str) for o in outs)


# ---- CLI ------------------------------------------------------------------------------------


def test_cli_demo(capsys):
    assert main(["demo", "--num-prompts", "3", "--max-tokens", "8", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Random weights produce noise" in out
    assert out.count("Prompt:") == 3 and out.count("Completion:") == 3
    assert "output tok/s" in out


def test_cli_generate(tiny_qwen3, capsys):
    args = [
        "generate",
        "--model",
        str(tiny_qwen3),
        "--prompt",
        "Hello",
        "--prompt",
        "Paris is",
        "--temperature",
        "0",
        "--max-tokens",
        "6",
        "--ignore-eos",
        "--device",
        "cpu",
        "--scheduler",
        "python",
        "--no-progress",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "'Hello'" in out and "'Paris is'" in out and "length" in out
    assert main(["generate", "--model", "/no/such/dir", "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---- MinivLLM compatibility -----------------------------------------------------------------

# MinivLLM's published Qwen3-0.6B dictionary (main.py after its fixes: head_dim 128 with hidden
# 1024 and 16 heads), and main.py as first published (head_dim 64, rope base 10000, vocab 151643,
# ffn bias). num_layers is cut to 2 so the CPU test stays fast; every other key is as published.
QWEN3_06B = {
    "max_num_sequences": 16, "max_num_batched_tokens": 1024, "max_cached_blocks": 1024,
    "block_size": 256, "world_size": 1, "model_name_or_path": "Qwen/Qwen3-0.6B",
    "enforce_eager": False, "vocab_size": 151936, "hidden_size": 1024, "num_heads": 16,
    "head_dim": 128, "num_kv_heads": 8, "intermediate_size": 3072, "num_layers": 28,
    "tie_word_embeddings": True, "base": 1000000, "rms_norm_epsilon": 1e-6, "qkv_bias": False,
    "scale": 1, "max_position": 32768, "ffn_bias": False, "max_num_batch_tokens": 4096,
    "max_model_length": 128, "gpu_memory_utilization": 0.9, "eos": 151645,
}  # fmt: skip
MAIN_PY = {**QWEN3_06B, "head_dim": 64, "vocab_size": 151643, "base": 10000, "ffn_bias": True,
           "eos": 151643}  # fmt: skip


@pytest.mark.parametrize("config", [QWEN3_06B, MAIN_PY], ids=["qwen3-0.6b", "main.py"])
def test_minivllm_llm_engine(config, caplog):
    config = {**config, "num_layers": 2}
    with caplog.at_level(logging.WARNING):
        engine = LLMEngine(config=config)
    assert "demo tokenizer" in caplog.text  # the hub name is not available offline
    mc = engine.llm.config.model_config
    assert (mc.hidden_size, mc.num_attention_heads, mc.head_dim) == (1024, 16, config["head_dim"])
    assert engine.llm.config.max_model_len == 128
    tok = engine.tokenizer
    chat = [
        tok.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in ["introduce yourself", "list all prime numbers within 100 " * 10]
    ]
    # MinivLLM's sampling params; the second prompt (~120 tokens) runs into max_model_length.
    capped = SamplingParams(temperature=0.6, max_tokens=256, max_model_length=128)
    params = [SamplingParams(temperature=0.6, max_tokens=8), capped]
    out = engine.generate(chat, params, use_tqdm=False)
    assert set(out) == {"text", "token_ids"} and len(out["text"]) == 2
    lengths = [len(tok.encode(p)) for p in chat]
    assert 100 < lengths[1] < 128
    assert 1 <= len(out["token_ids"][0]) <= 8
    assert 1 <= len(out["token_ids"][1]) <= 128 - lengths[1]
    assert all(isinstance(t, str) for t in out["text"])
    assert_all_blocks_free(engine.llm)


def test_minivllm_llm_engine_local_tokenizer_and_errors(tiny_qwen3):
    config = {**QWEN3_06B, "num_layers": 1, "vocab_size": 600, "hidden_size": 64,
              "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "intermediate_size": 64,
              "model_name_or_path": str(tiny_qwen3)}  # fmt: skip
    engine = LLMEngine(config=config)
    assert len(engine.tokenizer) == len(AutoTokenizer.from_pretrained(tiny_qwen3))
    out = engine.generate(
        ["hello there"],
        SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
        use_tqdm=False,
    )
    assert len(out["token_ids"][0]) == 4
    with pytest.raises(ValueError, match="unknown MinivLLM config key 'max_num_seqs'"):
        LLMEngine(config={**config, "max_num_seqs": 4})
    with pytest.raises(ValueError, match="missing 'hidden_size'"):
        LLMEngine(config={k: v for k, v in config.items() if k != "hidden_size"})


def test_graph_padding_path_on_cpu(tiny_qwen3):
    """The decode-graph path without CUDA: a stand-in graph runner replays eagerly on the fixed
    views, so bucketing, padded rows (seq_len 0, slot -1) and the metadata the graphs read are
    checked against transformers on every decode step."""
    llm = make_llm(tiny_qwen3, block_size=4, max_num_seqs=8)
    runner = llm.model_runner
    runner.graph_runner = replay = EagerGraphRunner(runner)
    prompts = mixed_prompts(5, seed=71, min_len=3, max_len=30)
    params = [
        SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (3, 6, 9, 12, 15)
    ]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for p, sp, o in zip(prompts, params, outs):
        assert o.outputs[0].token_ids == hf_greedy(tiny_qwen3, p, sp.max_tokens)
    assert {bs for _, bs in replay.replayed} >= {8, 4}  # shrinking batch, padded buckets
    assert any(nd < bs for nd, bs in replay.replayed)
    assert not replay.replayed_mixed
    assert_all_blocks_free(llm)


def test_mixed_graph_path_on_cpu(tiny_qwen3):
    """The mixed-graph path without CUDA: steps with prefill of up to 48 tokens are padded to 48
    and run on the fixed views with every row a prefill row (decodes are one-token queries),
    padding tokens writing nowhere, and a tile table naming every query tile once; greedy
    outputs match transformers, with a shared prefix (cache hits) and chunked prompts."""
    llm = make_llm(tiny_qwen3, block_size=4, max_num_seqs=8, max_num_batched_tokens=48)
    runner = llm.model_runner
    runner.graph_runner = replay = EagerGraphRunner(runner, mixed_tokens=48)
    shared = mixed_prompts(1, seed=72, min_len=9, max_len=9)[0]
    prompts = [shared + p for p in mixed_prompts(3, seed=73, min_len=2, max_len=60)]
    prompts += mixed_prompts(3, seed=74, min_len=1, max_len=20)
    params = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(tiny_qwen3, p, params.max_tokens)
    assert len(replay.replayed_mixed) >= 2, replay.replayed_mixed
    assert all(1 <= n <= 48 for n in replay.replayed_mixed)
    assert any(n < 48 for n in replay.replayed_mixed)  # padded
    assert_all_blocks_free(llm)


def test_mixed_graph_buckets_on_cpu(tiny_qwen3):
    """Steps with prefill replay the smallest mixed graph that holds them (token counts 128, 256,
    512 here: padded at most twofold), so a lone short prompt is not padded to a full step; fewer
    than 128 tokens replay the 128-token graph (eagerly, a short step's launches cost the host
    more than the padded GPU work). Greedy outputs match transformers through every bucket."""
    llm = make_llm(tiny_qwen3, block_size=16, max_num_seqs=8, max_num_batched_tokens=512)
    runner = llm.model_runner
    runner.graph_runner = replay = EagerGraphRunner(runner, mixed_tokens=512)
    assert replay.mixed_sizes == [128, 256, 512]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    for n in (70, 200, 300, 500, 20, 1):  # one prompt at a time: a lone prefill
        prompt = mixed_prompts(1, seed=n, min_len=n, max_len=n)[0]
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == hf_greedy(tiny_qwen3, prompt, params.max_tokens)
    assert replay.replayed_buckets == [128, 256, 512, 512, 128, 128]
    assert replay.replayed_mixed == [70, 200, 300, 500, 20, 1]
    assert_all_blocks_free(llm)


def test_cli_bench(capsys):
    args = ["bench", "--num-prompts", "4", "--min-input", "5", "--max-input", "12",
            "--min-output", "3", "--max-output", "6", "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert "4 requests" in capsys.readouterr().out


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_num_seqs": 1, "max_num_batched_tokens": 64, "max_model_len": 64},
        {"max_num_seqs": 3, "max_num_batched_tokens": 64, "max_model_len": 64},
        {"max_num_seqs": 16, "max_num_batched_tokens": 512, "max_model_len": 512},
        # A pool of one max_model_len sequence: the warm-up admits what fits.
        {
            "max_num_seqs": 16,
            "max_num_batched_tokens": 2048,
            "max_model_len": 1024,
            "block_size": 16,
            "num_kv_blocks": 64,
        },
    ],
)
def test_start_up_warm_up_steps(tiny_qwen3, monkeypatch, kwargs):
    """The CUDA start-up warm-up (a short prefill, then decodes beside prefill rows filling the
    token budget; the LM head at every sampled-row count), run here on the CPU: it plans valid
    steps for any limits and leaves the real scheduler untouched."""

    llm = make_llm(tiny_qwen3, **kwargs)
    runner = llm.model_runner
    steps = []
    real_step = runner._step
    monkeypatch.setattr(runner, "_step", lambda h, *rest: (steps.append(h), real_step(h, *rest))[1])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    warmup.warm_up_step_kinds(runner)
    assert steps and steps[0].num_decodes == 0
    if kwargs["max_num_seqs"] > 5:
        mixed = steps[-1]
        assert mixed.num_decodes == 5 and mixed.num_rows > mixed.num_decodes
        if "num_kv_blocks" not in kwargs:
            assert mixed.num_tokens == kwargs["max_num_batched_tokens"]
    assert_all_blocks_free(llm)
    # The LM head once at every sampled-row count a step can have.
    rows = []
    real_logits = runner.model.compute_logits
    monkeypatch.setattr(
        runner.model, "compute_logits", lambda h: (rows.append(h.shape[0]), real_logits(h))[1]
    )
    warmup.warm_up_lm_head(runner)
    assert rows == list(range(1, kwargs["max_num_seqs"] + 1))
    monkeypatch.undo()
    # Two lone prompts through launch: the smallest mixed graph, then the one-row decode graph.
    graphs = EagerGraphRunner(runner, mixed_tokens=kwargs["max_num_batched_tokens"])
    runner.graph_runner = graphs
    warmup.warm_up_graph_steps(runner)
    assert graphs.replayed_mixed == [3, 3]
    assert graphs.replayed_buckets == [graphs.mixed_sizes[0]] * 2
    assert graphs.replayed == [(1, 1), (1, 1)]
    assert_all_blocks_free(llm)
    out = llm.generate(
        [[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False
    )
    assert out[0].outputs[0].token_ids == hf_greedy(tiny_qwen3, [5, 6, 7], 4)


def test_close_gives_back_the_kv_pool(tiny_qwen3):
    """close() (and leaving a `with LLM(...)` block) drops the KV pool and any CUDA graphs at
    once, not at garbage collection; the engine refuses to generate afterwards."""
    with make_llm(tiny_qwen3) as llm:
        runner = llm.model_runner
        assert runner.kv_cache is not None and runner.kv_cache.numel() > 0
        llm.generate(mixed_prompts(2, seed=75), SamplingParams(max_tokens=2), use_tqdm=False)
    assert runner.kv_cache is None and runner.graph_runner is None
    assert all(
        a.k_cache.numel() == 0 and a.v_cache.numel() == 0 for a in runner.model.attention_layers()
    )
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate(mixed_prompts(1, seed=76), SamplingParams(max_tokens=2), use_tqdm=False)
    llm.close()  # idempotent
