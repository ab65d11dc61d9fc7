"""Model dtypes: the names a config uses ("fp32", "bf16", "fp16") and what each means to
torch and vLLM. Pure: torch is imported only when a torch dtype is asked for."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""Config dtype name -> the dtype's name in torch (``torch.<name>``) and vLLM (``dtype=<name>``)."""


def dtype_name(name: str) -> str:
    """torch's and vLLM's name of a config dtype ("bf16" -> "bfloat16"); ValueError naming
    the valid ones for any other name."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def torch_dtype(name: str) -> "torch.dtype":
    """The torch dtype of a config dtype ("bf16" -> torch.bfloat16); ValueError as `dtype_name`."""
    import torch

    return getattr(torch, dtype_name(name))
