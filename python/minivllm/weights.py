"""Load a Hugging Face safetensors checkpoint (one file or sharded with an index) into the model.

Checkpoint names map to our parameters through the model's `packed_modules_mapping` (q/k/v into
qkv_proj, gate/up into gate_up_proj); each parameter's `weight_loader` copies this rank's slice.
Missing tensors, tensors of the wrong shape and unreadable files are ValueErrors naming the tensor.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from minivllm.layers.linear import default_weight_loader

logger = logging.getLogger(__name__)

# Tensors some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: from the index json when sharded."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is not a valid safetensors index: {e}") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise ValueError(f"{index} names shard {f.name}, which does not exist")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"{model_dir} has no *.safetensors weights (use load_format='dummy' for random weights)"
        )
    return files


def load_weights(model: nn.Module, model_dir: str | Path) -> None:
    """Copy every checkpoint tensor into `model`; every parameter must be covered exactly."""
    params = dict(model.named_parameters())
    mapping: dict[str, tuple[str, int | str]] = getattr(model, "packed_modules_mapping", {})
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    # Which (parameter, shard) pairs must be loaded; tied lm_head shares the embedding.
    needed: set[tuple[str, int | str | None]] = set()
    for name in params:
        packed = [
            (frag, shard) for frag, (target, shard) in mapping.items() if f".{target}." in name
        ]
        if packed:
            needed.update((name, shard) for _, shard in packed)
        else:
            needed.add((name, None))
    loaded: set[tuple[str, int | str | None]] = set()

    for path in checkpoint_files(model_dir):
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # noqa: BLE001 - safetensors raises several types
            raise ValueError(f"cannot read {path}: {e}") from None
        with handle as f:
            for ckpt_name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                if ckpt_name.endswith(_IGNORED_SUFFIXES):
                    continue
                if tied and ckpt_name == "lm_head.weight":
                    continue  # tied checkpoints may still carry a copy
                name, shard = _param_name(ckpt_name, mapping)
                if name not in params:
                    logger.warning("ignoring checkpoint tensor %s (no such parameter)", ckpt_name)
                    continue
                param = params[name]
                tensor = f.get_tensor(ckpt_name).to(param.dtype)
                loader = getattr(param, "weight_loader", default_weight_loader)
                try:
                    if shard is None:
                        loader(param, tensor)
                    else:
                        loader(param, tensor, shard)
                except ValueError as e:
                    raise ValueError(f"checkpoint tensor {ckpt_name} in {path.name}: {e}") from None
                loaded.add((name, shard))

    missing = sorted(needed - loaded, key=str)
    if missing:
        names = [_ckpt_name(name, shard, mapping) for name, shard in missing]
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        raise ValueError(f"checkpoint {model_dir} is missing tensors: {shown}")


def _param_name(
    ckpt_name: str, mapping: dict[str, tuple[str, int | str]]
) -> tuple[str, int | str | None]:
    for frag, (target, shard) in mapping.items():
        if f".{frag}." in ckpt_name:
            return ckpt_name.replace(f".{frag}.", f".{target}."), shard
    return ckpt_name, None


def _ckpt_name(
    name: str, shard: int | str | None, mapping: dict[str, tuple[str, int | str]]
) -> str:
    if shard is None:
        return name
    for frag, (target, s) in mapping.items():
        if s == shard and f".{target}." in name:
            return name.replace(f".{target}.", f".{frag}.")
    return name


def init_dummy_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Random weights for load_format='dummy': normal(0, std) matrices, ones for norms, zero biases.

    Drawn on the parameters' own device (a generator per device), so no host-sized copy is needed.
    A tensor-parallel shard draws its parameter's full shape and keeps its slice through the
    weight_loader, so every tensor_parallel_size gives the same model for the same seed.
    """
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        gen = generators.get(param.device)
        if gen is None:
            gen = torch.Generator(device=param.device).manual_seed(seed)
            generators[param.device] = gen
        with torch.no_grad():
            if "norm" in name:
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            elif getattr(param, "full_shape", tuple(param.shape)) == tuple(param.shape):
                param.normal_(0.0, std, generator=gen)
            else:
                full = torch.empty(param.full_shape, dtype=param.dtype, device=param.device)
                param.weight_loader(param, full.normal_(0.0, std, generator=gen))
