"""Load a Hugging Face safetensors checkpoint (one file or sharded with an index) into the model.

Checkpoint names map to our parameters through the model's `packed_modules_mapping` (q/k/v into
qkv_proj, gate/up into gate_up_proj); each parameter's `weight_loader` copies this rank's slice.
Every problem with the files is a ValueError naming the file and, where there is one, the tensor:
an unreadable file or index, a shard outside the checkpoint folder, a missing tensor, a tensor of
the wrong shape or dtype, one stored twice, and (unless allowed) a tensor the model does not use.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from minivllm.layers.linear import default_weight_loader

logger = logging.getLogger(__name__)

# Tensors some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: from the index json when sharded.

    An index may only name files directly in the folder (no path separators, no `..`), so its
    data cannot point the loader elsewhere. Files in the folder may be symlinks, followed as
    transformers follows them: the Hugging Face hub cache links its snapshot files into the
    repository's `blobs/`, and a folder can share another's weights that way.
    """
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        files = [model_dir / name for name in _index_file_names(index)]
    elif (model_dir / "model.safetensors").is_file():
        files = [model_dir / "model.safetensors"]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise ValueError(
                f"{model_dir} has no *.safetensors weights (use load_format='dummy' for random "
                "weights)"
            )
    for f in files:
        if not f.is_file():
            raise ValueError(f"checkpoint file {f} does not exist or is not a file")
    return files


def _index_file_names(index: Path) -> list[str]:
    """The shard names an index json maps tensors to, sorted and deduplicated."""
    try:
        raw: Any = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{index} is not valid JSON: {e}") from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError(
            f"{index} is not a safetensors index: it needs a 'weight_map' object of tensor name "
            "-> file name"
        )
    if not weight_map:
        raise ValueError(f"{index}: weight_map is empty")
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{index}: tensor {tensor} maps to {name!r}, not a file name")
        if name in (".", "..") or Path(name).name != name or "\\" in name:
            raise ValueError(
                f"{index}: tensor {tensor} maps to {name!r}, which is not a file directly in "
                "the checkpoint folder"
            )
    return sorted(set(weight_map.values()))


def load_weights(model: nn.Module, model_dir: str | Path, allow_unused: bool = False) -> None:
    """Copy every checkpoint tensor into `model`; every parameter must be covered exactly once.

    Checkpoint tensors the model has no parameter for are an error unless `allow_unused` (then
    they are skipped with a warning); recomputed rotary tables and the LM head copy of a
    tied-embedding checkpoint are always skipped.
    """
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
    loaded: dict[tuple[str, int | str | None], str] = {}  # -> where it came from
    unused: list[str] = []

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
                where = f"checkpoint tensor {ckpt_name} in {path.name}"
                name, shard = _param_name(ckpt_name, mapping)
                if name not in params:
                    unused.append(ckpt_name)
                    continue
                # A packed tensor (shard None) covers every shard of its parameter.
                covers = (
                    [(name, shard)]
                    if shard is not None
                    else [key for key in needed if key[0] == name]
                )
                done = [key for key in covers if key in loaded]
                if done:
                    raise ValueError(f"{where}: already loaded from {loaded[done[0]]}")
                param = params[name]
                try:
                    tensor = f.get_tensor(ckpt_name)
                except Exception as e:  # noqa: BLE001 - safetensors raises several types
                    raise ValueError(f"{where} cannot be read: {e}") from None
                if not tensor.is_floating_point():
                    raise ValueError(f"{where} has dtype {tensor.dtype}, not a float type")
                loader = getattr(param, "weight_loader", default_weight_loader)
                try:
                    if shard is None:
                        loader(param, tensor.to(param.dtype))
                    else:
                        loader(param, tensor.to(param.dtype), shard)
                except ValueError as e:
                    raise ValueError(f"{where}: {e}") from None
                loaded.update(dict.fromkeys(covers, f"{ckpt_name} in {path.name}"))

    if unused:
        shown = _first(unused)
        if not allow_unused:
            raise ValueError(
                f"checkpoint {model_dir} has tensors the model does not use: {shown} (does "
                "config.json match the checkpoint? allow_unused_weights=True loads it anyway)"
            )
        logger.warning(
            "ignoring %d checkpoint tensors the model does not use: %s", len(unused), shown
        )
    missing = sorted(needed - loaded.keys(), key=str)
    if missing:
        names = [_ckpt_name(name, shard, mapping) for name, shard in missing]
        raise ValueError(f"checkpoint {model_dir} is missing tensors: {_first(names)}")


def _first(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


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
