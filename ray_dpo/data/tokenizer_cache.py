"""Hugging Face tokenizers for the data stages: loading (with a replacement chat
template) and a per-process cache, so a Ray worker loads each tokenizer once.

Pure: imports neither ray, deepspeed nor vllm (transformers only when a tokenizer loads).
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any, Optional

from ray_dpo.data.chat_template import ChatTemplateSourceError, resolve_chat_template
from ray_dpo.data.errors import DataError
from ray_dpo.data.tokenize import PairTokenizer


def load_tokenizer(tokenizer_path: str, chat_template: Optional[str] = None) -> Any:
    """Hugging Face tokenizer from ``tokenizer_path``, with ``chat_template`` (the template
    text) replacing its own when given."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def read_chat_template(chat_template: Optional[str]) -> Optional[str]:
    """Template text of a model.chat_template value (a file path or inline Jinja)."""
    try:
        return resolve_chat_template(chat_template)
    except ChatTemplateSourceError as err:
        raise DataError(str(err)) from None


_TOKENIZERS: dict[tuple, Any] = {}
"""Per-process cache: Ray reuses worker processes, so a tokenizer loads once per worker
(and across datasets built by the same cluster), not once per block."""


def cached_pair_tokenizer(tokenizer_path: str, chat_template: Optional[str],
                          settings: SimpleNamespace) -> PairTokenizer:
    """A PairTokenizer for ``settings`` over the process's cached tokenizer (loaded on a miss)."""
    key = (tokenizer_path, chat_template, _local_mtime(tokenizer_path))
    if key not in _TOKENIZERS:
        if len(_TOKENIZERS) >= 4:
            _TOKENIZERS.clear()
        _TOKENIZERS[key] = load_tokenizer(tokenizer_path, chat_template)
    return PairTokenizer(_TOKENIZERS[key], settings)


def _local_mtime(path: str) -> Optional[float]:
    """Newest mtime in a local tokenizer directory (a rewritten tokenizer misses the cache)."""
    try:
        return max((e.stat().st_mtime for e in os.scandir(path)), default=None)
    except OSError:  # a hub id or a file: no directory to look at
        return None
