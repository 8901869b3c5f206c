from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# Engine test fixtures (tiny random Qwen3 checkpoints, a shared engine); see engine_fixtures.py.
# run-batch's (a 200-line batch file, its answers through one engine); see batch_testing.py.
from batch_testing import batch_file, one_engine_output  # noqa: E402, F401
from engine_fixtures import gpu_qwen3, tiny_llm, tiny_qwen3, tiny_qwen3_sharded  # noqa: E402, F401
