"""The rotation trick (Fifty et al., "Restructuring Vector Quantization with the Rotation Trick", arXiv 2410.06424).

The forward value is the code ``q``; the gradient reaches the input ``x`` through a rotation and rescaling that maps
``x`` onto ``q`` and is treated as a constant.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def rotate_to(x: Tensor, q: Tensor, eps: float = 1e-6) -> Tensor:
    """Return ``q`` with gradients flowing to ``x`` through the fixed rotation that takes ``x`` to ``q``.

    Shape: ``x [..., D]``, ``q [..., D]`` -> ``[..., D]``.
    """
    x_norm = x.norm(dim=-1, keepdim=True).clamp_min(eps)
    q_norm = q.norm(dim=-1, keepdim=True).clamp_min(eps)
    u = (x / x_norm).detach()
    v = (q / q_norm).detach()
    w = F.normalize(u + v, dim=-1, eps=eps).detach()
    # Householder-like rotation R = I - 2 w w^T + 2 v u^T applied to x (R u = v)
    rotated = x - 2 * (x * w).sum(-1, keepdim=True) * w + 2 * (x * u).sum(-1, keepdim=True) * v
    return rotated * (q_norm / x_norm).detach()


__all__ = ["rotate_to"]
