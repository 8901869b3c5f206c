"""Hostile SamplingParams, field by field: each is refused with the exception and message
fragment below when the object is built, or (SamplingParams.verify) when it is checked against the
model's vocabulary, before anything runs; or, in the rows marked "accepted" at the end, handled as
stated. Engine arguments and config.json: test_hostile_engine_config.py; checkpoint files:
test_hostile_checkpoints.py, whose last test checks that each table lists every case it runs.

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
| SamplingParams | `temperature=1e-40`, `1e-6`, `5e-324`, `-0.0`, `9.99e-6` | accepted: below 1e-5, stored as 0.0 (greedy); the tiny checkpoint gives transformers' greedy tokens, never NaN or an id outside the vocabulary |
| SamplingParams | numpy / Fraction numbers, `top_k=-1`, changed after construction | accepted as Python int / float, -1 as 0; `validate()` checks a changed object again |
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from engine_fixtures import SCHEDULERS, assert_all_blocks_free, hf_greedy, make_llm
from minivllm import SamplingParams

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
