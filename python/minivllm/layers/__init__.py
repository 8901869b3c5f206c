"""Model layers. On CUDA the elementwise layers, the decode-size GEMMs and the sampler run fused
Triton kernels (minivllm.kernels); MINIVLLM_FUSED_KERNELS=0 keeps the plain-torch code everywhere,
which is what the CPU always runs. Each layer makes the choice once, when it is built."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

_FUSED_KERNELS = os.environ.get("MINIVLLM_FUSED_KERNELS", "1") != "0"


def env_switch(name: str, default: bool) -> bool:
    """An on/off switch from the environment: "1" on, "0" off; unset or empty: `default`."""
    value = os.environ.get(name, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{name}={value!r}: expected 1 (on) or 0 (off)")
    return default if value == "" else value == "1"


def env_count(name: str, what: str, default: int) -> int:
    """A count of `what` from the environment (0: off; unset: `default`)."""
    value = os.environ.get(name, str(default))
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise ValueError(f"{name}={value!r}: expected a number of {what} (0 turns it off)")
    return count


def fused_kernels_on(device: torch.device) -> bool:
    """Whether layers on `device` take their fused Triton paths."""
    return _FUSED_KERNELS and device.type == "cuda"


def fused_kernels(module: str, fused: bool | None = None) -> ModuleType | None:
    """`minivllm.kernels.<module>` for a layer that takes its fused path, else None. `fused`
    None decides from the device the layer is being built on (the model runner builds the model
    under `torch.device(...)`); tests pass True to run a fused path on the CPU interpreter."""
    if fused is None:
        fused = fused_kernels_on(torch.empty(0).device)
    return importlib.import_module(f"minivllm.kernels.{module}") if fused else None
