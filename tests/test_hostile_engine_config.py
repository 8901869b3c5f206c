"""Hostile engine arguments and config.json files: each is refused with the exception and
message fragment below before anything runs (no model is built for a bad engine argument or
config.json), or, in the rows marked "accepted" at the end, handled as stated. SamplingParams:
test_hostile_sampling_params.py; checkpoint files: test_hostile_checkpoints.py, whose last test
checks that each table lists every case it runs.

| layer | input | expected |
|-------|-------|----------|
| engine arguments | `max_num_seq=4 (typo)` | ValueError: unknown engine argument 'max_num_seq' |
| engine arguments | `dtype='float64'` | ValueError: unsupported dtype 'float64' |
| engine arguments | `dtype=5` | ValueError: unsupported dtype 5 |
| engine arguments | `device='tpu'` | ValueError: device 'tpu' |
| engine arguments | `device=['cpu']` | ValueError: is not a torch device |
| engine arguments | `block_size=0` | ValueError: block_size must be an integer >= 1, got 0 |
| engine arguments | `block_size=-16` | ValueError: block_size must be an integer >= 1 |
| engine arguments | `block_size=2**31` | ValueError: block_size must be at most 2147483647 |
| engine arguments | `block_size=16.0` | ValueError: block_size must be an integer |
| engine arguments | `block_size=True` | ValueError: block_size must be an integer |
| engine arguments | `block_size=3, triton` | ValueError: power of two |
| engine arguments | `block_size=24, triton` | ValueError: block_size=24 |
| engine arguments | `max_num_seqs=0` | ValueError: max_num_seqs must be an integer >= 1 |
| engine arguments | `max_num_seqs=2**31` | ValueError: max_num_seqs must be at most |
| engine arguments | `max_num_batched_tokens=2**40` | ValueError: at most 2147483647 |
| engine arguments | `max_num_batched_tokens < max_num_seqs` | ValueError: must be >= max_num_seqs=64 |
| engine arguments | `max_model_len=1` | ValueError: max_model_len must be an integer >= 2 |
| engine arguments | `max_model_len=100000` | ValueError: max_position_embeddings=2048 |
| engine arguments | `max_model_len='4096'` | ValueError: max_model_len must be an integer |
| engine arguments | `num_kv_blocks=0` | ValueError: num_kv_blocks must be an integer >= 1 |
| engine arguments | `num_kv_blocks=2**40` | ValueError: at most 2147483647 |
| engine arguments | `num_kv_blocks=2**27 (2**31 slots)` | ValueError: int32 slot ids |
| engine arguments | `gpu_memory_utilization=1.5` | ValueError: in (0, 1], got 1.5 |
| engine arguments | `gpu_memory_utilization=0` | ValueError: gpu_memory_utilization |
| engine arguments | `gpu_memory_utilization=nan` | ValueError: got nan |
| engine arguments | `gpu_memory_utilization='0.5'` | ValueError: got 0.5 |
| engine arguments | `gpu_memory_utilization=True` | ValueError: got True |
| engine arguments | `scheduler='rust'` | ValueError: scheduler must be 'cpp' or 'python' |
| engine arguments | `scheduler=None` | ValueError: scheduler must be |
| engine arguments | `attention_backend='flash'` | ValueError: attention_backend must be |
| engine arguments | `load_format='pt'` | ValueError: load_format must be 'auto' or 'dummy' |
| engine arguments | `enable_prefix_caching='yes'` | ValueError: must be a bool |
| engine arguments | `enforce_eager=1` | ValueError: enforce_eager must be a bool, got 1 |
| engine arguments | `async_scheduling='yes'` | ValueError: async_scheduling must be a bool |
| engine arguments | `allow_unused_weights='no'` | ValueError: allow_unused_weights must |
| engine arguments | `tensor_parallel_size=0` | ValueError: tensor_parallel_size must be |
| engine arguments | `tensor_parallel_size=3` | ValueError: must divide the checkpoint's |
| engine arguments | `tp_step_timeout_s=0` | ValueError: tp_step_timeout_s must be a positive number of seconds |
| engine arguments | `tp_step_timeout_s=inf` | ValueError: got inf |
| engine arguments | `tp_step_timeout_s=nan` | ValueError: got nan |
| engine arguments | `tp_step_timeout_s='60'` | ValueError: got '60' |
| engine arguments | `tensor_parallel_size=2**40` | ValueError: at most 2147483647 |
| engine arguments | `seed=-1` | ValueError: seed must be an integer >= 0 |
| engine arguments | `seed=2**64` | ValueError: seed must be at most 18446744073709551615 |
| engine arguments | `seed=1.5` | ValueError: seed must be an integer |
| engine arguments | `tokenizer=5` | ValueError: tokenizer must be a folder path, got 5 |
| engine arguments | `tokenizer='/nonexistent-minivllm'` | ValueError: does not exist |
| config.json | `a JSON list` | ValueError: expected a JSON object, got list |
| config.json | `a JSON number` | ValueError: expected a JSON object, got int |
| config.json | `truncated JSON` | ValueError: is not valid JSON |
| config.json | `not UTF-8` | ValueError: is not valid JSON |
| config.json | `architectures='Qwen3ForCausalLM'` | ValueError: architectures must be a list |
| config.json | `architectures=[]` | ValueError: architecture None is not supported |
| config.json | `architectures=[5]` | ValueError: architecture 5 is not supported |
| config.json | `architectures=['LlamaForCausalLM']` | ValueError: 'LlamaForCausalLM' is not supported |
| config.json | `no hidden_size` | ValueError: missing key 'hidden_size' |
| config.json | `hidden_size='64'` | ValueError: hidden_size must be a positive integer |
| config.json | `hidden_size=64.5` | ValueError: got 64.5 |
| config.json | `hidden_size=0` | ValueError: hidden_size must be a positive integer, got 0 |
| config.json | `hidden_size=-64` | ValueError: got -64 |
| config.json | `hidden_size=true` | ValueError: got True |
| config.json | `num_attention_heads=0` | ValueError: num_attention_heads must be |
| config.json | `num_attention_heads=3` | ValueError: not a multiple |
| config.json | `num_key_value_heads=3` | ValueError: num_key_value_heads=3 |
| config.json | `vocab_size=2**40` | ValueError: vocab_size=1099511627776 is larger |
| config.json | `head_dim=15` | ValueError: head_dim=15 must be even |
| config.json | `no head_dim, hidden 66 over 4 heads` | ValueError: no head_dim |
| config.json | `rope_scaling yarn` | ValueError: rope type 'yarn' |
| config.json | `rope_scaling='linear'` | ValueError: rope_scaling must be an object |
| config.json | `rope_parameters yarn` | ValueError: rope type 'yarn' |
| config.json | `rope_parameters=[]` | ValueError: rope_parameters must be an object |
| config.json | `hidden_act='gelu'` | ValueError: hidden_act 'gelu' is not supported |
| config.json | `use_sliding_window=true` | ValueError: sliding-window |
| config.json | `use_sliding_window='false'` | ValueError: true or false |
| config.json | `tie_word_embeddings='false'` | ValueError: tie_word_embeddings must be true or false |
| config.json | `attention_bias=1` | ValueError: attention_bias must be true or false |
| config.json | `rms_norm_eps=-1` | ValueError: rms_norm_eps must be positive |
| config.json | `rms_norm_eps='tiny'` | ValueError: rms_norm_eps must be a number |
| config.json | `rope_theta=0` | ValueError: rope_theta must be positive and finite |
| config.json | `rope_theta='1e6'` | ValueError: rope_theta must be a number |
| config.json | `torch_dtype='float64'` | ValueError: unsupported dtype 'float64' |
| config.json | `eos_token_id='2'` | ValueError: eos_token_id must hold token ids |
| config.json | `eos_token_id=[-1]` | ValueError: eos_token_id must hold token ids |
| config.json | `max_position_embeddings=0` | ValueError: max_position_embeddings |
| config.json | `num_hidden_layers=0` | ValueError: num_hidden_layers must be |
| engine arguments | `block_size=3`, `24` with the torch backend | accepted: greedy tokens equal transformers', prefix-cache hits included |
| config.json | `hidden_size=64.0` | accepted as the integer 64 |
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import pytest
from engine_fixtures import SCHEDULERS, assert_all_blocks_free, hf_greedy, make_llm
from minivllm import SamplingParams
from minivllm.config import EngineConfig

# ---- engine arguments -------------------------------------------------------------------------

ENGINE_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("max_num_seq=4 (typo)", {"max_num_seq": 4}, "unknown engine argument 'max_num_seq'"),
    ("dtype='float64'", {"dtype": "float64"}, "unsupported dtype 'float64'"),
    ("dtype=5", {"dtype": 5}, "unsupported dtype 5"),
    ("device='tpu'", {"device": "tpu"}, "device 'tpu'"),
    ("device=['cpu']", {"device": ["cpu"]}, "is not a torch device"),
    ("block_size=0", {"block_size": 0}, "block_size must be an integer >= 1, got 0"),
    ("block_size=-16", {"block_size": -16}, "block_size must be an integer >= 1"),
    ("block_size=2**31", {"block_size": 2**31}, "block_size must be at most 2147483647"),
    ("block_size=16.0", {"block_size": 16.0}, "block_size must be an integer"),
    ("block_size=True", {"block_size": True}, "block_size must be an integer"),
    ("block_size=3, triton", {"block_size": 3, "attention_backend": "triton"}, "power of two"),
    ("block_size=24, triton", {"block_size": 24, "attention_backend": "triton"}, "block_size=24"),
    ("max_num_seqs=0", {"max_num_seqs": 0}, "max_num_seqs must be an integer >= 1"),
    ("max_num_seqs=2**31", {"max_num_seqs": 2**31}, "max_num_seqs must be at most"),
    ("max_num_batched_tokens=2**40", {"max_num_batched_tokens": 2**40}, "at most 2147483647"),
    (
        "max_num_batched_tokens < max_num_seqs",
        {"max_num_seqs": 64, "max_num_batched_tokens": 32},
        "must be >= max_num_seqs=64",
    ),
    ("max_model_len=1", {"max_model_len": 1}, "max_model_len must be an integer >= 2"),
    ("max_model_len=100000", {"max_model_len": 100000}, "max_position_embeddings=2048"),
    ("max_model_len='4096'", {"max_model_len": "4096"}, "max_model_len must be an integer"),
    ("num_kv_blocks=0", {"num_kv_blocks": 0}, "num_kv_blocks must be an integer >= 1"),
    ("num_kv_blocks=2**40", {"num_kv_blocks": 2**40}, "at most 2147483647"),
    ("num_kv_blocks=2**27 (2**31 slots)", {"num_kv_blocks": 2**27}, "int32 slot ids"),
    ("gpu_memory_utilization=1.5", {"gpu_memory_utilization": 1.5}, r"in \(0, 1\], got 1.5"),
    ("gpu_memory_utilization=0", {"gpu_memory_utilization": 0}, "gpu_memory_utilization"),
    ("gpu_memory_utilization=nan", {"gpu_memory_utilization": math.nan}, "got nan"),
    ("gpu_memory_utilization='0.5'", {"gpu_memory_utilization": "0.5"}, "got 0.5"),
    ("gpu_memory_utilization=True", {"gpu_memory_utilization": True}, "got True"),
    ("scheduler='rust'", {"scheduler": "rust"}, "scheduler must be 'cpp' or 'python'"),
    ("scheduler=None", {"scheduler": None}, "scheduler must be"),
    ("attention_backend='flash'", {"attention_backend": "flash"}, "attention_backend must be"),
    ("load_format='pt'", {"load_format": "pt"}, "load_format must be 'auto' or 'dummy'"),
    ("enable_prefix_caching='yes'", {"enable_prefix_caching": "yes"}, "must be a bool"),
    ("enforce_eager=1", {"enforce_eager": 1}, "enforce_eager must be a bool, got 1"),
    ("async_scheduling='yes'", {"async_scheduling": "yes"}, "async_scheduling must be a bool"),
    ("allow_unused_weights='no'", {"allow_unused_weights": "no"}, "allow_unused_weights must"),
    ("tensor_parallel_size=0", {"tensor_parallel_size": 0}, "tensor_parallel_size must be"),
    ("tensor_parallel_size=3", {"tensor_parallel_size": 3}, "must divide the checkpoint's"),
    ("tp_step_timeout_s=0", {"tp_step_timeout_s": 0}, "tp_step_timeout_s must be a positive"),
    ("tp_step_timeout_s=inf", {"tp_step_timeout_s": math.inf}, "got inf"),
    ("tp_step_timeout_s=nan", {"tp_step_timeout_s": math.nan}, "got nan"),
    ("tp_step_timeout_s='60'", {"tp_step_timeout_s": "60"}, "got '60'"),
    ("tensor_parallel_size=2**40", {"tensor_parallel_size": 2**40}, "at most 2147483647"),
    ("seed=-1", {"seed": -1}, "seed must be an integer >= 0"),
    ("seed=2**64", {"seed": 2**64}, "seed must be at most 18446744073709551615"),
    ("seed=1.5", {"seed": 1.5}, "seed must be an integer"),
    ("tokenizer=5", {"tokenizer": 5}, "tokenizer must be a folder path, got 5"),
    ("tokenizer='/nonexistent-minivllm'", {"tokenizer": "/nonexistent-minivllm"}, "does not exist"),
]


@pytest.mark.parametrize("kwargs, match", [pytest.param(k, m, id=i) for i, k, m in ENGINE_CASES])
def test_engine_arguments_refuse(tiny_qwen3, kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig.create(tiny_qwen3, **{"device": "cpu", **kwargs})


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("block_size", [3, 24])
def test_block_sizes_the_torch_backend_takes(tiny_qwen3, scheduler, block_size):
    """Not powers of two: the torch backend (the CPU default) handles them, prefix hits
    included (the second prompt shares two blocks' worth of tokens with the first)."""
    llm = make_llm(
        tiny_qwen3, scheduler=scheduler, block_size=block_size, attention_backend="torch"
    )
    shared = list(range(3, 3 + 2 * block_size + 1))
    prompts = [shared + [40, 41], shared + [50]]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    first = llm.generate(prompts[:1], params, use_tqdm=False)
    rest = llm.generate(prompts[1:], params, use_tqdm=False)
    assert llm.stats["prefix_cache_hits"] > 0
    for prompt, out in zip(prompts, first + rest):
        assert out.outputs[0].token_ids == hf_greedy(tiny_qwen3, prompt, 6)
    assert_all_blocks_free(llm)


def test_missing_model_folder_and_config(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        EngineConfig.create(tmp_path / "nope", device="cpu")
    with pytest.raises(ValueError, match="has no config.json"):
        EngineConfig.create(tmp_path, device="cpu")


# ---- config.json --------------------------------------------------------------------------------


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], Any]:
    return lambda c: {**c, key: value}


def _drop(*keys: str) -> Callable[[dict[str, Any]], Any]:
    return lambda c: {k: v for k, v in c.items() if k not in keys}


class _Raw(bytes):
    """config.json bytes written as they are."""


CONFIG_CASES: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    ("a JSON list", lambda c: [c], "expected a JSON object, got list"),
    ("a JSON number", lambda c: 5, "expected a JSON object, got int"),
    ("truncated JSON", lambda c: _Raw(b'{"architectures": ['), "is not valid JSON"),
    ("not UTF-8", lambda c: _Raw(b"\xff\xfe\x00{"), "is not valid JSON"),
    (
        "architectures='Qwen3ForCausalLM'",
        _set("architectures", "Qwen3ForCausalLM"),
        "architectures must be a list",
    ),
    ("architectures=[]", _set("architectures", []), "architecture None is not supported"),
    ("architectures=[5]", _set("architectures", [5]), "architecture 5 is not supported"),
    (
        "architectures=['LlamaForCausalLM']",
        _set("architectures", ["LlamaForCausalLM"]),
        "'LlamaForCausalLM' is not supported",
    ),
    ("no hidden_size", _drop("hidden_size"), "missing key 'hidden_size'"),
    ("hidden_size='64'", _set("hidden_size", "64"), "hidden_size must be a positive integer"),
    ("hidden_size=64.5", _set("hidden_size", 64.5), "got 64.5"),
    ("hidden_size=0", _set("hidden_size", 0), "hidden_size must be a positive integer, got 0"),
    ("hidden_size=-64", _set("hidden_size", -64), "got -64"),
    ("hidden_size=true", _set("hidden_size", True), "got True"),
    ("num_attention_heads=0", _set("num_attention_heads", 0), "num_attention_heads must be"),
    ("num_attention_heads=3", _set("num_attention_heads", 3), "not a multiple"),
    ("num_key_value_heads=3", _set("num_key_value_heads", 3), "num_key_value_heads=3"),
    ("vocab_size=2**40", _set("vocab_size", 2**40), "vocab_size=1099511627776 is larger"),
    ("head_dim=15", _set("head_dim", 15), "head_dim=15 must be even"),
    (
        "no head_dim, hidden 66 over 4 heads",
        lambda c: {**_drop("head_dim")(c), "hidden_size": 66},
        "no head_dim",
    ),
    ("rope_scaling yarn", _set("rope_scaling", {"rope_type": "yarn"}), "rope type 'yarn'"),
    ("rope_scaling='linear'", _set("rope_scaling", "linear"), "rope_scaling must be an object"),
    (
        "rope_parameters yarn",
        _set("rope_parameters", {"rope_type": "yarn", "factor": 4.0}),
        "rope type 'yarn'",
    ),
    ("rope_parameters=[]", _set("rope_parameters", []), "rope_parameters must be an object"),
    ("hidden_act='gelu'", _set("hidden_act", "gelu"), "hidden_act 'gelu' is not supported"),
    ("use_sliding_window=true", _set("use_sliding_window", True), "sliding-window"),
    ("use_sliding_window='false'", _set("use_sliding_window", "false"), "true or false"),
    (
        "tie_word_embeddings='false'",
        _set("tie_word_embeddings", "false"),
        "tie_word_embeddings must be true or false",
    ),
    ("attention_bias=1", _set("attention_bias", 1), "attention_bias must be true or false"),
    ("rms_norm_eps=-1", _set("rms_norm_eps", -1), "rms_norm_eps must be positive"),
    ("rms_norm_eps='tiny'", _set("rms_norm_eps", "tiny"), "rms_norm_eps must be a number"),
    ("rope_theta=0", _set("rope_theta", 0), "rope_theta must be positive and finite"),
    ("rope_theta='1e6'", _set("rope_theta", "1e6"), "rope_theta must be a number"),
    ("torch_dtype='float64'", _set("torch_dtype", "float64"), "unsupported dtype 'float64'"),
    ("eos_token_id='2'", _set("eos_token_id", "2"), "eos_token_id must hold token ids"),
    ("eos_token_id=[-1]", _set("eos_token_id", [-1]), "eos_token_id must hold token ids"),
    ("max_position_embeddings=0", _set("max_position_embeddings", 0), "max_position_embeddings"),
    ("num_hidden_layers=0", _set("num_hidden_layers", 0), "num_hidden_layers must be"),
]


@pytest.mark.parametrize("mutate, match", [pytest.param(f, m, id=i) for i, f, m in CONFIG_CASES])
def test_config_json_refused(tiny_qwen3, tmp_path, mutate, match):
    config = mutate(json.loads((tiny_qwen3 / "config.json").read_text()))
    data = config if isinstance(config, _Raw) else json.dumps(config).encode()
    (tmp_path / "config.json").write_bytes(data)
    with pytest.raises(ValueError, match=match) as info:
        EngineConfig.create(tmp_path, device="cpu")
    assert "config.json" in str(info.value)


def test_integral_float_sizes_are_read_as_integers(tiny_qwen3, tmp_path):
    config = json.loads((tiny_qwen3 / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": 64.0}))
    mc = EngineConfig.create(tmp_path, device="cpu").model_config
    assert mc.hidden_size == 64 and type(mc.hidden_size) is int
