"""The checkpoint's tokenizer (through transformers, local files only) and its eos ids."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from minivllm.config import EngineConfig

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(path: str, *, warn: bool = True) -> Any:
    """The tokenizer in a folder (or a name in the local Hugging Face cache) through
    transformers, local files only; None if there is none, with a warning unless warn=False."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if folder.is_dir() and not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        # transformers would build an empty tokenizer from config.json's model type.
        if warn:
            logger.warning("no tokenizer files in %s; only token-id prompts will work", path)
        return None
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        if warn:
            logger.warning(
                "no usable tokenizer in %s (%s); only token-id prompts will work", path, e
            )
        return None


def find_eos_token_ids(config: EngineConfig, tokenizer: Any) -> tuple[int, ...]:
    """config.json's eos ids, generation_config.json's and the tokenizer's, within the vocab."""
    ids: list[int] = list(config.model_config.eos_token_ids)
    gen_file = Path(config.model) / "generation_config.json"
    if gen_file.is_file():
        try:
            eos = json.loads(gen_file.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, AttributeError):
            eos = None
        ids.extend(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    vocab = config.model_config.vocab_size
    return tuple(sorted({int(i) for i in ids if isinstance(i, int) and 0 <= i < vocab}))
