from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

# Hypothesis: CI runs one fixed set of examples (derandomized, no example database), so its result
# depends only on the commit; local runs draw new examples each time and keep failing ones in
# .hypothesis/. The example counts are set here, per profile, not on the tests. No deadline:
# tests never assert timings. HYPOTHESIS_PROFILE=ci|dev picks a profile explicitly.
settings.register_profile(
    "ci", max_examples=200, derandomize=True, database=None, deadline=None, print_blob=True
)
settings.register_profile("dev", max_examples=100, deadline=None)


def _in_ci() -> bool:
    """CI services set CI (to "true", or "1"); unset, empty or a false word means a local run."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if _in_ci() else "dev"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# The scheduler tests' shared helpers assert too: rewrite them for pytest's detailed messages.
pytest.register_assert_rewrite("scheduler_testing")
pytest.register_assert_rewrite("core_traces")

# Engine test fixtures (tiny random Qwen3 checkpoints, a shared engine); see engine_fixtures.py.
# run-batch's (a 200-line batch file, its answers through one engine); see batch_testing.py.
from batch_testing import batch_file, one_engine_output  # noqa: E402, F401
from engine_fixtures import gpu_qwen3, tiny_llm, tiny_qwen3, tiny_qwen3_sharded  # noqa: E402, F401
