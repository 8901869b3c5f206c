"""Hostile checkpoint files (the safetensors files and their index json): each is refused
with the exception and message fragment below when the engine loads the weights, or, in the rows
marked "accepted" at the end, handled as stated. The last test checks that this table and those of
test_hostile_sampling_params.py (SamplingParams) and test_hostile_engine_config.py (engine
arguments, config.json) list every case their tests run.

| layer | input | expected |
|-------|-------|----------|
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
| checkpoint files | extra tensors with `allow_unused_weights=True` | loaded, the skipped tensors named in a warning |
| checkpoint files | `rotary_emb.inv_freq`, a tied checkpoint's `lm_head.weight` copy | skipped silently |
| checkpoint files | files that are symlinks, as in the Hugging Face cache (`snapshots/<rev>/*` -> `../../blobs/`) | loaded (the folder's owner made the links; only the index's names are confined to the folder) |
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import test_hostile_engine_config
import test_hostile_sampling_params
import torch
from engine_fixtures import hf_greedy, make_llm
from minivllm import SamplingParams
from safetensors.torch import load_file, save_file
from test_hostile_engine_config import CONFIG_CASES, ENGINE_CASES
from test_hostile_sampling_params import SAMPLING_CASES, VERIFY_CASES, VOCAB

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


# ---- the tables in the module docstrings --------------------------------------------------------

_LAYERS = {
    "SamplingParams": [i for i, _, _ in SAMPLING_CASES],
    "SamplingParams.verify": [i for i, _, _ in VERIFY_CASES],
    "engine arguments": [i for i, _, _ in ENGINE_CASES],
    "config.json": [i for i, _, _ in CONFIG_CASES],
    "checkpoint files": [i for i, _, _, _ in CHECKPOINT_CASES],
}


# The three hostile-input files' docstrings, each the table of the layers its tests cover.
_TABLES = (test_hostile_sampling_params.__doc__, test_hostile_engine_config.__doc__, __doc__)


def _table_rows() -> list[tuple[str, str, str]]:
    rows = []
    for line in "\n".join(doc or "" for doc in _TABLES).splitlines():
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
