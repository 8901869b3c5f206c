"""Hostile inputs, layer by layer: each is refused with the exception and message fragment below
before anything runs (no model is built for a bad SamplingParams, engine argument or config.json),
or, in the rows marked "accepted" at the end, handled as stated.

| layer | input | expected |
|-------|-------|----------|
| SamplingParams | `temperature=-0.1` | ValueError: temperature must be >= 0 |
| SamplingParams | `temperature=nan` | ValueError: temperature must be >= 0 |
| SamplingParams | `temperature=inf` | ValueError: finite as a float32 |
| SamplingParams | `temperature=-inf` | ValueError: temperature must be >= 0 |
| SamplingParams | `temperature=1e300` | ValueError: finite as a float32 |
| SamplingParams | `temperature=FLT_MAX+half_ulp` | ValueError: float32 |
| SamplingParams | `temperature=10**400` | ValueError: finite as a float32 |
| SamplingParams | `temperature=Fraction(10**400)` | ValueError: float32 |
| SamplingParams | `temperature='0.7'` | ValueError: temperature must be a number |
| SamplingParams | `temperature=None` | ValueError: temperature must be a number |
| SamplingParams | `temperature=True` | ValueError: temperature must be a number |
| SamplingParams | `temperature=1j` | ValueError: temperature must be a number |
| SamplingParams | `top_p=0.0` | ValueError: top_p must be in (0, 1] |
| SamplingParams | `top_p=-0.5` | ValueError: top_p must be in |
| SamplingParams | `top_p=1.5` | ValueError: top_p must be in |
| SamplingParams | `top_p=nan` | ValueError: top_p must be in |
| SamplingParams | `top_p=inf` | ValueError: top_p must be in |
| SamplingParams | `top_p=1e-50` | ValueError: nonzero as a float32, got 1e-50 |
| SamplingParams | `top_p='1'` | ValueError: top_p must be a number |
| SamplingParams | `top_k=-2` | ValueError: top_k must be in [0, 2**31 - 1] |
| SamplingParams | `top_k=2**31` | ValueError: top_k must be in [0, 2**31 - 1] ..., got 2147483648 |
| SamplingParams | `top_k=2**70` | ValueError: got 1180591620717411303424 |
| SamplingParams | `top_k=1.5` | ValueError: top_k must be an integer |
| SamplingParams | `top_k=True` | ValueError: top_k must be an integer |
| SamplingParams | `top_k='5'` | ValueError: top_k must be an integer |
| SamplingParams | `min_p=-0.1` | ValueError: min_p must be in [0, 1] |
| SamplingParams | `min_p=1.1` | ValueError: min_p must be in |
| SamplingParams | `min_p=nan` | ValueError: min_p must be in |
| SamplingParams | `min_p=None` | ValueError: min_p must be a number |
| SamplingParams | `max_tokens=0` | ValueError: max_tokens must be in [1, 2**63 - 1], got 0 |
| SamplingParams | `max_tokens=-1` | ValueError: max_tokens must be in |
| SamplingParams | `max_tokens=2**63` | ValueError: got 9223372036854775808 |
| SamplingParams | `max_tokens=10.0` | ValueError: max_tokens must be an integer |
| SamplingParams | `max_tokens=None` | ValueError: max_tokens must be an integer |
| SamplingParams | `max_tokens=True` | ValueError: max_tokens must be an integer |
| SamplingParams | `seed=-1` | ValueError: seed must be in [0, 2**64) |
| SamplingParams | `seed=2**64` | ValueError: got 18446744073709551616 |
| SamplingParams | `seed=1.5` | ValueError: seed must be an integer |
| SamplingParams | `seed='42'` | ValueError: seed must be an integer |
| SamplingParams | `max_model_length=1` | ValueError: max_model_length must be in [2, 2**31 - 1] |
| SamplingParams | `max_model_length=2**31` | ValueError: got 2147483648 |
| SamplingParams | `max_model_length=3.0` | ValueError: max_model_length must be an integer |
| SamplingParams | `stop=''` | ValueError: stop strings must be non-empty strings |
| SamplingParams | `stop=['']` | ValueError: stop strings must be non-empty strings |
| SamplingParams | `stop=[None]` | ValueError: stop strings must be non-empty strings, got None |
| SamplingParams | `stop=['ok', 5]` | ValueError: got 5 |
| SamplingParams | `stop=0` | ValueError: stop must be a list, got int |
| SamplingParams | `stop=b'END'` | ValueError: stop must be a list, got bytes |
| SamplingParams | `stop={'a'}` | ValueError: stop must be a list, got set |
| SamplingParams | `stop_token_ids=[-3]` | ValueError: stop_token_ids must be in [0, 2**31 - 1] |
| SamplingParams | `stop_token_ids=[2**31]` | ValueError: got 2147483648 |
| SamplingParams | `stop_token_ids=b'\\x05'` | ValueError: must be a list, got bytes |
| SamplingParams | `stop_token_ids=5` | ValueError: stop_token_ids must be a list, got int |
| SamplingParams | `stop_token_ids=[1.0]` | ValueError: stop_token_ids must be an integer |
| SamplingParams | `stop_token_ids=[True]` | ValueError: stop_token_ids must be an integer |
| SamplingParams | `stop_token_ids=['1']` | ValueError: stop_token_ids must be an integer |
| SamplingParams | `n=0` | ValueError: n must be in [1, 2**31 - 1], got 0 |
| SamplingParams | `n=2**31` | ValueError: got 2147483648 |
| SamplingParams | `n=2.0` | ValueError: n must be an integer |
| SamplingParams | `logprobs=-1` | ValueError: logprobs must be None or in [0, 2**31 - 1] |
| SamplingParams | `logprobs=2**40` | ValueError: got 1099511627776 |
| SamplingParams | `logprobs=True` | ValueError: logprobs must be an integer |
| SamplingParams | `prompt_logprobs=-5` | ValueError: prompt_logprobs must be None or in [0, 2**31 - 1] |
| SamplingParams | `prompt_logprobs='5'` | ValueError: prompt_logprobs must be an integer |
| SamplingParams | `ignore_eos='no'` | ValueError: ignore_eos must be a bool, got 'no' |
| SamplingParams | `skip_special_tokens=None` | ValueError: skip_special_tokens must be |
| SamplingParams.verify | `stop_token_ids=[vocab_size]` | ValueError: 512 is outside the vocabulary |
| SamplingParams.verify | `stop_token_ids=[0, 10**6]` | ValueError: 1000000 is outside |
| SamplingParams.verify | `logprobs=vocab_size + 1` | ValueError: logprobs=513 is more than the vocabulary's 512 tokens |
| SamplingParams.verify | `prompt_logprobs=10**6` | ValueError: prompt_logprobs=1000000 is more than the vocabulary's 512 tokens |
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
| engine arguments | `tokenizer='/nonexistent'` | ValueError: does not exist |
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
| checkpoint files | `down_proj transposed` | ValueError: model.layers.0.mlp.down_proj.weight in model.safetensors: shape (128, 64), expected (64, 128) |
| checkpoint files | `up_proj transposed` | ValueError: up_proj.weight in model.safetensors: shape (64, 128) |
| checkpoint files | `k_proj transposed` | ValueError: k_proj.weight in model.safetensors: shape (64, 32), expected (32, 64) |
| checkpoint files | `embed_tokens transposed` | ValueError: embed_tokens.weight in model.safetensors: shape (64, 512) |
| checkpoint files | `lm_head transposed (untied)` | ValueError: lm_head.weight in model-0000d-of-0000d.safetensors: shape (64, 512) |
| checkpoint files | `norm weight 2-D` | ValueError: model.layers.0.input_layernorm.weight in model.safetensors: shape (1, 64), expected (64,) |
| checkpoint files | `down_proj with a leading dim` | ValueError: shape (1, 64, 128), expected (64, 128) |
| checkpoint files | `down_proj a scalar` | ValueError: down_proj.weight in model.safetensors: shape (), expected |
| checkpoint files | `norm weight int64` | ValueError: model.layers.0.input_layernorm.weight in model.safetensors has dtype torch.int64, not a float type |
| checkpoint files | `norm weight bool` | ValueError: has dtype torch.bool |
| checkpoint files | `a tensor the model lacks` | ValueError: does not use: model.layers.0.mlp.extra.weight |
| checkpoint files | `config with fewer layers` | ValueError: does not use: model.layers.1. |
| checkpoint files | `packed qkv_proj next to q/k/v` | ValueError: already loaded from |
| checkpoint files | `a tensor in two shards` | ValueError: model.norm.weight in model-0000d-of-0000d.safetensors: already loaded |
| checkpoint files | `index a JSON list` | ValueError: is not a safetensors index |
| checkpoint files | `index weight_map a list` | ValueError: needs a 'weight_map' object |
| checkpoint files | `index without weight_map` | ValueError: needs a 'weight_map' |
| checkpoint files | `index weight_map empty` | ValueError: weight_map is empty |
| checkpoint files | `index maps to 5` | ValueError: tensor x maps to 5 |
| checkpoint files | `index maps to ''` | ValueError: maps to '', not a file |
| checkpoint files | `index invalid JSON` | ValueError: not valid JSON |
| checkpoint files | `index names ../outside.safetensors` | ValueError: not a file directly in the checkpoint folder |
| checkpoint files | `index names an absolute path` | ValueError: not a file directly in the checkpoint folder |
| checkpoint files | `index names sub/model.safetensors` | ValueError: maps to 'sub/model.safetensors', which is not a file directly in the checkpoint folder |
| checkpoint files | `index names '..'` | ValueError: not a file directly in the checkpoint folder |
| checkpoint files | `index names a missing shard` | ValueError: model-00009-of-00009.safetensors does not exist |
| checkpoint files | `model.safetensors truncated` | ValueError: cannot read |
| checkpoint files | `model.safetensors garbage` | ValueError: cannot read |
| checkpoint files | `model.safetensors empty` | ValueError: cannot read |
| checkpoint files | `safetensors header length 2**60` | ValueError: cannot read |
| checkpoint files | `safetensors offsets past the end` | ValueError: cannot read |
| checkpoint files | `a directory named b.safetensors` | ValueError: b.safetensors does not exist or is not a file |
| SamplingParams | `temperature=1e-40`, `1e-6`, `5e-324`, `-0.0`, `9.99e-6` | accepted: below 1e-5, stored as 0.0 (greedy); the tiny checkpoint gives transformers' greedy tokens, never NaN or an id outside the vocabulary |
| SamplingParams | numpy / Fraction numbers, `top_k=-1`, changed after construction | accepted as Python int / float, -1 as 0; `validate()` checks a changed object again |
| engine arguments | `block_size=3`, `24` with the torch backend | accepted: greedy tokens equal transformers', prefix-cache hits included |
| config.json | `hidden_size=64.0` | accepted as the integer 64 |
| checkpoint files | extra tensors with `allow_unused_weights=True` | loaded, the skipped tensors named in a warning |
| checkpoint files | `rotary_emb.inv_freq`, a tied checkpoint's `lm_head.weight` copy | skipped silently |
| checkpoint files | files that are symlinks, as in the Hugging Face cache (`snapshots/<rev>/*` -> `../../blobs/`) | loaded (the folder's owner made the links; only the index's names are confined to the folder) |
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import struct
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from engine_fixtures import SCHEDULERS, assert_all_blocks_free, hf_greedy, make_llm
from minivllm import SamplingParams
from minivllm.config import EngineConfig
from safetensors.torch import load_file, save_file

VOCAB = 512  # the tiny checkpoints' vocabulary

# ---- SamplingParams ---------------------------------------------------------------------------

SAMPLING_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("temperature=-0.1", {"temperature": -0.1}, "temperature must be >= 0"),
    ("temperature=nan", {"temperature": math.nan}, "temperature must be >= 0"),
    ("temperature=inf", {"temperature": math.inf}, "finite as a float32"),
    ("temperature=-inf", {"temperature": -math.inf}, "temperature must be >= 0"),
    ("temperature=1e300", {"temperature": 1e300}, "finite as a float32"),
    ("temperature=FLT_MAX+half_ulp", {"temperature": 3.4028235677973366e38}, "float32"),
    ("temperature=10**400", {"temperature": 10**400}, "finite as a float32"),
    ("temperature=Fraction(10**400)", {"temperature": Fraction(10**400)}, "float32"),
    ("temperature='0.7'", {"temperature": "0.7"}, "temperature must be a number"),
    ("temperature=None", {"temperature": None}, "temperature must be a number"),
    ("temperature=True", {"temperature": True}, "temperature must be a number"),
    ("temperature=1j", {"temperature": 1j}, "temperature must be a number"),
    ("top_p=0.0", {"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ("top_p=-0.5", {"top_p": -0.5}, "top_p must be in"),
    ("top_p=1.5", {"top_p": 1.5}, "top_p must be in"),
    ("top_p=nan", {"top_p": math.nan}, "top_p must be in"),
    ("top_p=inf", {"top_p": math.inf}, "top_p must be in"),
    ("top_p=1e-50", {"top_p": 1e-50}, "nonzero as a float32, got 1e-50"),
    ("top_p='1'", {"top_p": "1"}, "top_p must be a number"),
    ("top_k=-2", {"top_k": -2}, r"top_k must be in \[0, 2\*\*31 - 1\]"),
    ("top_k=2**31", {"top_k": 2**31}, "top_k must be in .* got 2147483648"),
    ("top_k=2**70", {"top_k": 2**70}, "got 1180591620717411303424"),
    ("top_k=1.5", {"top_k": 1.5}, "top_k must be an integer"),
    ("top_k=True", {"top_k": True}, "top_k must be an integer"),
    ("top_k='5'", {"top_k": "5"}, "top_k must be an integer"),
    ("min_p=-0.1", {"min_p": -0.1}, r"min_p must be in \[0, 1\]"),
    ("min_p=1.1", {"min_p": 1.1}, "min_p must be in"),
    ("min_p=nan", {"min_p": math.nan}, "min_p must be in"),
    ("min_p=None", {"min_p": None}, "min_p must be a number"),
    ("max_tokens=0", {"max_tokens": 0}, r"max_tokens must be in \[1, 2\*\*63 - 1\], got 0"),
    ("max_tokens=-1", {"max_tokens": -1}, "max_tokens must be in"),
    ("max_tokens=2**63", {"max_tokens": 2**63}, "got 9223372036854775808"),
    ("max_tokens=10.0", {"max_tokens": 10.0}, "max_tokens must be an integer"),
    ("max_tokens=None", {"max_tokens": None}, "max_tokens must be an integer"),
    ("max_tokens=True", {"max_tokens": True}, "max_tokens must be an integer"),
    ("seed=-1", {"seed": -1}, r"seed must be in \[0, 2\*\*64\)"),
    ("seed=2**64", {"seed": 2**64}, "got 18446744073709551616"),
    ("seed=1.5", {"seed": 1.5}, "seed must be an integer"),
    ("seed='42'", {"seed": "42"}, "seed must be an integer"),
    ("max_model_length=1", {"max_model_length": 1}, r"max_model_length must be in \[2, "),
    ("max_model_length=2**31", {"max_model_length": 2**31}, "got 2147483648"),
    ("max_model_length=3.0", {"max_model_length": 3.0}, "max_model_length must be an integer"),
    ("stop=''", {"stop": ""}, "stop strings must be non-empty strings"),
    ("stop=['']", {"stop": [""]}, "stop strings must be non-empty strings"),
    ("stop=[None]", {"stop": [None]}, "stop strings must be non-empty strings, got None"),
    ("stop=['ok', 5]", {"stop": ["ok", 5]}, "got 5"),
    ("stop=0", {"stop": 0}, "stop must be a list, got int"),
    ("stop=b'END'", {"stop": b"END"}, "stop must be a list, got bytes"),
    ("stop={'a'}", {"stop": {"a"}}, "stop must be a list, got set"),
    ("stop_token_ids=[-3]", {"stop_token_ids": [-3]}, r"stop_token_ids must be in \[0, "),
    ("stop_token_ids=[2**31]", {"stop_token_ids": [2**31]}, "got 2147483648"),
    ("stop_token_ids=b'\\x05'", {"stop_token_ids": b"\x05"}, "must be a list, got bytes"),
    ("stop_token_ids=5", {"stop_token_ids": 5}, "stop_token_ids must be a list, got int"),
    ("stop_token_ids=[1.0]", {"stop_token_ids": [1.0]}, "stop_token_ids must be an integer"),
    ("stop_token_ids=[True]", {"stop_token_ids": [True]}, "stop_token_ids must be an integer"),
    ("stop_token_ids=['1']", {"stop_token_ids": ["1"]}, "stop_token_ids must be an integer"),
    ("n=0", {"n": 0}, r"n must be in \[1, 2\*\*31 - 1\], got 0"),
    ("n=2**31", {"n": 2**31}, "got 2147483648"),
    ("n=2.0", {"n": 2.0}, "n must be an integer"),
    ("logprobs=-1", {"logprobs": -1}, r"logprobs must be None or in \[0, 2\*\*31 - 1\]"),
    ("logprobs=2**40", {"logprobs": 2**40}, "got 1099511627776"),
    ("logprobs=True", {"logprobs": True}, "logprobs must be an integer"),
    ("prompt_logprobs=-5", {"prompt_logprobs": -5}, "prompt_logprobs must be None or in"),
    ("prompt_logprobs='5'", {"prompt_logprobs": "5"}, "prompt_logprobs must be an integer"),
    ("ignore_eos='no'", {"ignore_eos": "no"}, "ignore_eos must be a bool, got 'no'"),
    ("skip_special_tokens=None", {"skip_special_tokens": None}, "skip_special_tokens must be"),
]


@pytest.mark.parametrize("kwargs, match", [pytest.param(k, m, id=i) for i, k, m in SAMPLING_CASES])
def test_sampling_params_refuse(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


VERIFY_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("stop_token_ids=[vocab_size]", {"stop_token_ids": [VOCAB]}, "512 is outside the vocabulary"),
    ("stop_token_ids=[0, 10**6]", {"stop_token_ids": [0, 10**6]}, "1000000 is outside"),
    ("logprobs=vocab_size + 1", {"logprobs": VOCAB + 1}, "logprobs=513 is more than the"),
    ("prompt_logprobs=10**6", {"prompt_logprobs": 10**6}, "prompt_logprobs=1000000 is more"),
]


@pytest.mark.parametrize("kwargs, match", [pytest.param(k, m, id=i) for i, k, m in VERIFY_CASES])
def test_sampling_params_verify_against_the_vocabulary(kwargs, match):
    sp = SamplingParams(**kwargs)  # valid on its own: only the model knows its vocabulary
    with pytest.raises(ValueError, match=match):
        sp.verify(VOCAB)
    sp.verify(10**7)


def test_sampling_params_changed_after_construction_are_checked_again():
    sp = SamplingParams(temperature=0.5, top_k=-1, stop_token_ids=[np.int64(7)])
    assert (sp.top_k, sp.stop_token_ids) == (0, [7])
    assert type(sp.stop_token_ids[0]) is int
    sp.temperature = math.inf
    with pytest.raises(ValueError, match="finite as a float32"):
        sp.validate()
    sp.temperature = 1e-30  # below GREEDY_TEMPERATURE: stored as greedy
    sp.verify(VOCAB)
    assert sp.temperature == 0.0 and sp.is_greedy


# Hostile but valid: what the engine is given instead.
GREEDY_TEMPERATURES = [1e-40, 1e-6, 5e-324, -0.0, 9.99e-6]


@pytest.mark.parametrize("temperature", GREEDY_TEMPERATURES)
def test_temperatures_below_the_threshold_are_stored_as_greedy(temperature):
    sp = SamplingParams(temperature=temperature)
    assert sp.temperature == 0.0 and math.copysign(1.0, sp.temperature) == 1.0
    assert SamplingParams(temperature=1e-5).temperature == 1e-5  # the threshold samples


def test_numpy_and_fraction_numbers_become_python_numbers():
    sp = SamplingParams(
        temperature=np.float32(0.5),
        top_p=Fraction(1, 2),
        top_k=np.int32(3),
        max_tokens=np.int64(4),
        seed=np.uint64(2**64 - 1),
    )
    assert (sp.temperature, sp.top_p, sp.top_k, sp.max_tokens, sp.seed) == (
        0.5,
        0.5,
        3,
        4,
        2**64 - 1,
    )
    assert [type(v) for v in (sp.temperature, sp.top_p, sp.top_k, sp.max_tokens, sp.seed)] == [
        float,
        float,
        int,
        int,
        int,
    ]


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_tiny_temperatures_sample_greedily_on_the_tiny_checkpoint(tiny_qwen3, scheduler):
    """Rows at temperature 1e-40 / 1e-6 next to a sampling row (so the batch is not all greedy
    and the sampler divides by every row's temperature): greedy tokens, nothing out of vocab."""
    llm = make_llm(tiny_qwen3, scheduler=scheduler)
    prompt = [5, 6, 7, 8, 9]
    params = [
        SamplingParams(temperature=1e-40, max_tokens=8, ignore_eos=True, seed=1),
        SamplingParams(temperature=1e-6, max_tokens=8, ignore_eos=True, seed=2),
        SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=3),
    ]
    outs = llm.generate([prompt] * 3, params, use_tqdm=False)
    ids = [o.outputs[0].token_ids for o in outs]
    assert ids[0] == ids[1] == hf_greedy(tiny_qwen3, prompt, 8)
    assert all(0 <= t < VOCAB for row in ids for t in row)
    assert len(ids[2]) == 8
    assert_all_blocks_free(llm)


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
    ("tokenizer='/nonexistent'", {"tokenizer": "/nonexistent"}, "does not exist"),
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


# ---- checkpoint files ---------------------------------------------------------------------------

LAYER0 = "model.layers.0."
SINGLE = "model.safetensors"


def _file_of(path: Path, name: str) -> str:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"][name]
    return SINGLE


def _edit(name: str, make: Callable[[dict[str, torch.Tensor]], torch.Tensor], file=None):
    """Set tensor `name` (in the file that holds it, or `file`) to make(all tensors there)."""

    def edit(path: Path) -> None:
        target = path / (file or _file_of(path, name))
        tensors = load_file(target)
        tensors[name] = make(tensors).contiguous().clone()  # no shared storage
        save_file(tensors, target)

    return edit


def _transpose(name: str) -> Callable[[Path], None]:
    return _edit(name, lambda t: t[name].T)


def _replace(name: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    return _edit(name, lambda t: make(t[name]))


def _config(**changes: Any) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, **changes}))

    return edit


# transformers (which reads the tokenizer's config) wants one layer type per layer.
ONE_LAYER = {"num_hidden_layers": 1, "layer_types": ["full_attention"]}


def _write(name: str, data: bytes | Callable[[Path], bytes]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        (path / name).write_bytes(data(path) if callable(data) else data)

    return edit


def _index(value: Any) -> Callable[[Path], None]:
    """Write an index json (with model.safetensors still there; the index takes precedence)."""
    return _write("model.safetensors.index.json", json.dumps(value).encode())


def _index_names(*names: str) -> Callable[[Path], None]:
    return _index({"weight_map": {f"t{i}": n for i, n in enumerate(names)}})


def _outside_file(path: Path) -> Path:
    outside = path.parent / "outside.safetensors"
    shutil.copy(path / SINGLE, outside)
    return outside


def _index_absolute(path: Path) -> None:
    _index_names(str(_outside_file(path)))(path)


def _index_dotdot(path: Path) -> None:
    _outside_file(path)
    _index_names("../outside.safetensors")(path)


def _huge_header(path: Path) -> bytes:
    return struct.pack("<Q", 2**60) + b"{}"


def _truncated(path: Path) -> bytes:
    data = (path / SINGLE).read_bytes()
    return data[: len(data) // 2]


def _bad_header_offsets(path: Path) -> bytes:
    header = json.dumps(
        {"model.norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [0, 10**9]}}
    ).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * 256


def _directory_shard(path: Path) -> None:
    (path / SINGLE).rename(path / "a.safetensors")
    (path / "b.safetensors").mkdir()


def _packed_qkv(t: dict[str, torch.Tensor]) -> torch.Tensor:
    attn = LAYER0 + "self_attn."
    return torch.cat(
        [t[attn + "q_proj.weight"], t[attn + "k_proj.weight"], t[attn + "v_proj.weight"]]
    )


def _duplicate_across_shards(path: Path) -> None:
    """The sharded checkpoint with one tensor copied into a second shard."""
    name = "model.norm.weight"
    home = _file_of(path, name)
    tensor = load_file(path / home)[name]
    other = next(f.name for f in sorted(path.glob("*.safetensors")) if f.name != home)
    _edit(name, lambda t: tensor, file=other)(path)


NORM = LAYER0 + "input_layernorm.weight"
DOWN = LAYER0 + "mlp.down_proj.weight"

# (id, edit of a copy of the checkpoint, message fragment, use the sharded checkpoint)
CHECKPOINT_CASES: list[tuple[str, Callable[[Path], None], str, bool]] = [
    (
        "down_proj transposed",
        _transpose(DOWN),
        rf"{DOWN} in model.safetensors: shape \(128, 64\), expected \(64, 128\)",
        False,
    ),
    (
        "up_proj transposed",
        _transpose(LAYER0 + "mlp.up_proj.weight"),
        r"up_proj.weight in model.safetensors: shape \(64, 128\)",
        False,
    ),
    (
        "k_proj transposed",
        _transpose(LAYER0 + "self_attn.k_proj.weight"),
        r"k_proj.weight in model.safetensors: shape \(64, 32\), expected \(32, 64\)",
        False,
    ),
    (
        "embed_tokens transposed",
        _transpose("model.embed_tokens.weight"),
        r"embed_tokens.weight in model.safetensors: shape \(64, 512\)",
        False,
    ),
    (
        "lm_head transposed (untied)",
        _transpose("lm_head.weight"),
        r"lm_head.weight in model-0000\d-of-0000\d.safetensors: shape \(64, 512\)",
        True,
    ),
    (
        "norm weight 2-D",
        _replace(NORM, lambda w: w.unsqueeze(0)),
        rf"{NORM} in model.safetensors: shape \(1, 64\), expected \(64,\)",
        False,
    ),
    (
        "down_proj with a leading dim",
        _replace(DOWN, lambda w: w.unsqueeze(0)),
        r"shape \(1, 64, 128\), expected \(64, 128\)",
        False,
    ),
    (
        "down_proj a scalar",
        _replace(DOWN, lambda w: w[0, 0]),
        r"down_proj.weight in model.safetensors: shape \(\), expected",
        False,
    ),
    (
        "norm weight int64",
        _replace(NORM, lambda w: w.long()),
        rf"{NORM} in model.safetensors has dtype torch.int64, not a float type",
        False,
    ),
    ("norm weight bool", _replace(NORM, lambda w: w > 0), "has dtype torch.bool", False),
    (
        "a tensor the model lacks",
        _edit("model.layers.0.mlp.extra.weight", lambda t: t[NORM]),
        "does not use: model.layers.0.mlp.extra.weight",
        False,
    ),
    (
        "config with fewer layers",
        _config(**ONE_LAYER),
        r"does not use: model\.layers\.1\.",
        False,
    ),
    (
        "packed qkv_proj next to q/k/v",
        _edit(LAYER0 + "self_attn.qkv_proj.weight", _packed_qkv, file=SINGLE),
        "already loaded from",
        False,
    ),
    (
        "a tensor in two shards",
        _duplicate_across_shards,
        r"model\.norm\.weight in model-0000\d-of-0000\d\.safetensors: already loaded",
        True,
    ),
    ("index a JSON list", _index([]), "is not a safetensors index", False),
    (
        "index weight_map a list",
        _index({"weight_map": ["model.safetensors"]}),
        "needs a 'weight_map' object",
        False,
    ),
    ("index without weight_map", _index({"metadata": {}}), "needs a 'weight_map'", False),
    ("index weight_map empty", _index({"weight_map": {}}), "weight_map is empty", False),
    ("index maps to 5", _index({"weight_map": {"x": 5}}), "tensor x maps to 5", False),
    ("index maps to ''", _index({"weight_map": {"x": ""}}), "maps to '', not a file", False),
    ("index invalid JSON", _write("model.safetensors.index.json", b"{"), "not valid JSON", False),
    ("index names ../outside.safetensors", _index_dotdot, "not a file directly in", False),
    ("index names an absolute path", _index_absolute, "not a file directly in", False),
    (
        "index names sub/model.safetensors",
        _index_names("sub/model.safetensors"),
        "maps to 'sub/model.safetensors', which is not a file directly in",
        False,
    ),
    ("index names '..'", _index_names(".."), "not a file directly in", False),
    (
        "index names a missing shard",
        _index_names("model-00009-of-00009.safetensors"),
        "model-00009-of-00009.safetensors does not exist",
        False,
    ),
    ("model.safetensors truncated", _write(SINGLE, _truncated), "cannot read", False),
    ("model.safetensors garbage", _write(SINGLE, b"\x00" * 100), "cannot read", False),
    ("model.safetensors empty", _write(SINGLE, b""), "cannot read", False),
    ("safetensors header length 2**60", _write(SINGLE, _huge_header), "cannot read", False),
    ("safetensors offsets past the end", _write(SINGLE, _bad_header_offsets), "cannot read", False),
    ("a directory named b.safetensors", _directory_shard, "b.safetensors does not exist", False),
]


def _copy(src: Path, tmp_path: Path) -> Path:
    """A copy of a checkpoint folder, one level down so files can be put beside it."""
    return Path(shutil.copytree(src, tmp_path / "ckpt"))


@pytest.mark.parametrize(
    "edit, match, sharded",
    [pytest.param(e, m, sh, id=i) for i, e, m, sh in CHECKPOINT_CASES],
)
def test_checkpoint_files_refused(tiny_qwen3, tiny_qwen3_sharded, tmp_path, edit, match, sharded):
    path = _copy(tiny_qwen3_sharded if sharded else tiny_qwen3, tmp_path)
    edit(path)
    with pytest.raises(ValueError, match=match):
        make_llm(path)


def test_unused_tensors_load_when_allowed(tiny_qwen3, tmp_path, caplog):
    """A 2-layer checkpoint under a 1-layer config loads with allow_unused_weights=True: the
    second layer is skipped with a warning naming it, and the engine generates."""
    path = _copy(tiny_qwen3, tmp_path)
    _config(**ONE_LAYER)(path)
    with caplog.at_level(logging.WARNING, logger="minivllm.weights"):
        llm = make_llm(path, allow_unused_weights=True)
    assert "model.layers.1." in caplog.text
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert all(0 <= t < VOCAB for t in out[0].outputs[0].token_ids)


def test_known_extra_tensors_are_ignored_silently(tiny_qwen3, tmp_path, caplog):
    """Rotary tables (recomputed) and a tied checkpoint's lm_head copy: no error, no warning,
    and the same greedy tokens as transformers."""
    path = _copy(tiny_qwen3, tmp_path)
    _edit(LAYER0 + "self_attn.rotary_emb.inv_freq", lambda t: torch.ones(8))(path)
    _edit("lm_head.weight", lambda t: t["model.embed_tokens.weight"])(path)
    with caplog.at_level(logging.WARNING, logger="minivllm"):
        llm = make_llm(path)
    assert not [r for r in caplog.records if r.name.startswith("minivllm.weights")]
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy(tiny_qwen3, [5, 6, 7], 5)


def test_hugging_face_cache_layout_loads(tiny_qwen3, tmp_path):
    """huggingface_hub's cache: snapshots/<revision>/<file> are symlinks into ../../blobs/."""
    repo = tmp_path / "models--tiny"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in sorted(tiny_qwen3.iterdir()):
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    llm = make_llm(snapshot)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy(tiny_qwen3, [5, 6, 7], 5)


# ---- the table in the module docstring ----------------------------------------------------------

_LAYERS = {
    "SamplingParams": [i for i, _, _ in SAMPLING_CASES],
    "SamplingParams.verify": [i for i, _, _ in VERIFY_CASES],
    "engine arguments": [i for i, _, _ in ENGINE_CASES],
    "config.json": [i for i, _, _ in CONFIG_CASES],
    "checkpoint files": [i for i, _, _, _ in CHECKPOINT_CASES],
}


def _table_rows() -> list[tuple[str, str, str]]:
    rows = []
    for line in (__doc__ or "").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if "|" in line else []
        if len(cells) == 3 and cells[0] not in ("layer", "") and not set(cells[0]) <= set("-"):
            rows.append((cells[0], cells[1].strip("`"), cells[2]))
    return rows


def test_the_docstring_table_lists_every_case():
    documented = {(layer, case) for layer, case, _ in _table_rows()}
    tested = {(layer, case) for layer, cases in _LAYERS.items() for case in cases}
    assert len(tested) == sum(len(c) for c in _LAYERS.values())  # ids are unique per layer
    assert documented >= tested, sorted(tested - documented)
    assert len(tested) >= 80
