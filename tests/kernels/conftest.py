"""Kernel tests run the Triton kernels through the interpreter when no GPU is present.

TRITON_INTERPRET must be set before `@triton.jit` decorates a kernel, so it is set here at import
time; kernel modules that a test module elsewhere imported earlier (compiled mode) are dropped so
that the next import decorates them again. Torch-only tests are unaffected: only Triton reads the
variable.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    _package = sys.modules.get("minivllm.kernels")
    for _name in [n for n in sys.modules if n.startswith("minivllm.kernels.")]:
        if _name != "minivllm.kernels.reference":
            del sys.modules[_name]
            if _package is not None and hasattr(_package, _name.rsplit(".", 1)[1]):
                delattr(_package, _name.rsplit(".", 1)[1])
