"""The compute dtypes a model may run in, by name (torch is imported only when needed)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

from sottovoce.common.errors import ConfigError

if TYPE_CHECKING:
    import torch

DtypeName = Literal["float32", "bfloat16"]
DTYPE_NAMES: tuple[str, ...] = get_args(DtypeName)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called ``name``; ConfigError naming the choices for anything else."""
    import torch

    if name not in DTYPE_NAMES:
        raise ConfigError(f"dtype {name!r} is not one of {list(DTYPE_NAMES)}")
    dtype: torch.dtype = getattr(torch, name)
    return dtype
