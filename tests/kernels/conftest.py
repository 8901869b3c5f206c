"""Kernel tests run the Triton kernels through the interpreter when no GPU is present.

TRITON_INTERPRET must be set before `@triton.jit` decorates the kernels, so it is set here at import
time, and kernel modules that another test module imported earlier are reloaded. Torch-only tests
are unaffected: the variable is read by Triton alone.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in ("kv_store", "flash_prefill", "paged_decode"):
        _module = sys.modules.get(f"minivllm.kernels.{_name}")
        if _module is not None:
            importlib.reload(_module)
