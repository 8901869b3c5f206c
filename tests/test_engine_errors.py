"""Bad input raises a ValueError naming the problem, before anything is scheduled, and the engine
stays usable afterwards."""

from __future__ import annotations

import json
import shutil

import pytest
from engine_fixtures import (
    assert_all_blocks_free,
    hf_greedy,
    interrupt_launch,
    make_hf_checkpoint,
    make_llm,
)
from minivllm import LLM, SamplingParams
from safetensors.torch import load_file, save_file

# ---- model folders -------------------------------------------------------------------------


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_model_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(tmp_path / "nope"), device="cpu", scheduler="python")
    with pytest.raises(ValueError, match="no config.json"):
        LLM(str(tmp_path), device="cpu", scheduler="python")


def test_non_qwen3_folder(tiny_qwen3, tmp_path):
    path = _copy(tiny_qwen3, tmp_path / "llama")
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="LlamaForCausalLM.*not supported"):
        make_llm(path)


def test_missing_tensor(tiny_qwen3, tmp_path):
    path = _copy(tiny_qwen3, tmp_path / "missing")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.1\.self_attn\.k_proj"):
        make_llm(path)


def test_mismatched_tensor(tiny_qwen3, tmp_path):
    path = _copy(tiny_qwen3, tmp_path / "mismatch")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"][:-1]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"mlp\.up_proj\.weight.*shape \(127, 64\)"):
        make_llm(path)


def test_no_weights_needs_dummy(tiny_qwen3, tmp_path):
    path = _copy(tiny_qwen3, tmp_path / "noweights")
    (path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        make_llm(path)
    llm = make_llm(path, load_format="dummy")  # random weights from config.json alone
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


# ---- engine arguments ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_num_seq": 4}, "unknown engine argument 'max_num_seq'"),
        ({"dtype": "float64"}, "dtype"),
        ({"device": "tpu"}, "device"),
        ({"block_size": 0}, "block_size"),
        ({"max_model_len": 100000}, "max_model_len"),
        ({"scheduler": "rust"}, "scheduler"),
        ({"attention_backend": "flash"}, "attention_backend"),
        ({"load_format": "pt"}, "load_format"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
        ({"max_num_seqs": 64, "max_num_batched_tokens": 32}, "max_num_batched_tokens"),
        ({"num_kv_blocks": 2, "block_size": 16, "max_model_len": 64}, "less than one"),
        ({"async_scheduling": "yes"}, "async_scheduling must be a bool, got 'yes'"),
    ],
)
def test_bad_engine_args(tiny_qwen3, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_llm(tiny_qwen3, **kwargs)


# ---- requests --------------------------------------------------------------------------------

GOOD = [5, 6, 7, 8]


@pytest.mark.parametrize(
    "prompts, params, match",
    [
        ("", None, "prompt 0 is empty"),
        ([[]], None, "prompt 0 is empty"),
        ([GOOD, [1, 2, 512]], None, "prompt 1: token id 512 is outside the vocabulary"),
        ([GOOD, [-1, 2]], None, "token id -1 is outside"),
        ([GOOD, [[1, 2]]], None, "flat list of ints"),
        ([GOOD, list(range(3, 300)) * 2], None, "max_model_len=512"),
        ([GOOD, GOOD], [SamplingParams()], "got 1 SamplingParams for 2 prompts"),
        ([GOOD, GOOD], SamplingParams(max_model_length=4), "max_model_length=4"),
        (b"hello", None, "prompts is bytes"),
        ([GOOD, b"hello"], None, "prompt 1 is bytes"),
        ([GOOD], SamplingParams(stop_token_ids=[512]), "stop_token_ids: 512 is outside"),
        ([GOOD], SamplingParams(logprobs=513), "logprobs"),
        ([GOOD] * 1000 + [[1, 600]], None, "prompt 1000: token id 600 is outside"),
        ([GOOD], {"temperature": 0}, "sampling_params is a dict; pass SamplingParams"),
    ],
)
def test_bad_requests_leave_engine_clean(tiny_llm, tiny_qwen3, prompts, params, match):
    before = dict(tiny_llm.stats)
    with pytest.raises(ValueError, match=match):
        tiny_llm.generate(prompts, params, use_tqdm=False)
    # Nothing was scheduled: no prefix lookups, no held blocks, and the engine still works.
    assert tiny_llm.stats == before
    assert_all_blocks_free(tiny_llm)
    out = tiny_llm.generate(
        [GOOD], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False
    )
    assert out[0].outputs[0].token_ids == hf_greedy(tiny_qwen3, GOOD, 6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.1}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"seed": -1}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-3]}, "stop_token_ids"),
    ],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_mutated_sampling_params_checked_by_generate(tiny_llm):
    sp = SamplingParams(temperature=0.5)
    sp.top_p = 2.0
    with pytest.raises(ValueError, match=r"sampling_params\[1\]: top_p"):
        tiny_llm.generate([GOOD, GOOD], [SamplingParams(), sp], use_tqdm=False)
    assert_all_blocks_free(tiny_llm)


def test_interrupted_generate_leaves_engine_clean(tiny_qwen3, monkeypatch):
    llm = make_llm(tiny_qwen3)
    interrupt_launch(llm, monkeypatch, at_call=3)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([GOOD] * 3, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert_all_blocks_free(llm)
    out = llm.generate(
        [GOOD], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False
    )
    assert out[0].outputs[0].token_ids == hf_greedy(tiny_qwen3, GOOD, 6)


def test_text_prompt_without_tokenizer(tmp_path):
    path = make_hf_checkpoint(tmp_path, tokenizer=False)
    llm = make_llm(path)
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("hello", use_tqdm=False)
    out = llm.generate([GOOD], SamplingParams(max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3 and out[0].outputs[0].text == ""


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "user"}], "message 0 \\(user\\) needs a 'content' string, got NoneType"),
        ([{"role": "user", "content": "hi"}, {"content": "x"}], "message 1 needs a 'role'"),
        ([{"role": "user", "content": 5}], "needs a 'content' string, got int"),
        ([{"role": "user", "content": [{"type": "image"}]}], "content parts"),
        ({"role": "user", "content": "hi"}, "got one dict"),
        # The template's own failures: syntax, an undefined name, its raise_exception.
        ([{"role": "user", "content": "hi"}], "chat template failed: TemplateSyntaxError"),
        ([{"role": "user", "content": "hi"}], "chat template failed: UndefinedError"),
        ([{"role": "user", "content": "hi"}], "chat template failed: TemplateError: no users"),
    ],
)
def test_bad_chat_messages(tiny_llm, messages, match):
    templates = {
        "TemplateSyntaxError": "{% for m in messages %}",
        "UndefinedError": "{{ messages[0].content.nope() }}",
        "no users": "{{ raise_exception('no users') }}",
    }
    template = next((t for key, t in templates.items() if key in match), None)
    with pytest.raises(ValueError, match=match):
        tiny_llm.chat(
            messages, SamplingParams(max_tokens=2), use_tqdm=False, chat_template=template
        )
    assert_all_blocks_free(tiny_llm)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hel"}, {"text": "lo"}]}]
    joined = [{"role": "user", "content": "Hello"}]
    sp = SamplingParams(temperature=0, max_tokens=3)
    assert tiny_llm.chat(parts, sp, use_tqdm=False)[0].prompt_token_ids == (
        tiny_llm.chat(joined, sp, use_tqdm=False)[0].prompt_token_ids
    )
