"""Memory layouts of 4D tensors: keeping activations in the layout of the convolution weights that read them.

PyTorch runs a convolution in channels_last when its input *or* its weight is channels_last, and then copies the
other one to that layout on every call. A plain (contiguous) model fed a channels_last-strided view -- a ``movedim``
or ``transpose`` of ``[B, ..., C]`` data -- therefore copies every weight of every convolution after it, since each
output keeps its input's layout.
"""

from __future__ import annotations

import torch
from torch import Tensor


def memory_format_of(t: Tensor) -> torch.memory_format:
    """``torch.channels_last`` for a 4D tensor stored channels_last and not plain contiguous as well (size-1 dims can
    make it both), else ``torch.contiguous_format``."""
    channels_last = t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def to_layout_of(x: Tensor, like: Tensor) -> Tensor:
    """``x`` in the memory format of ``like`` (``x`` itself when it already is)."""
    return x.contiguous(memory_format=memory_format_of(like))
