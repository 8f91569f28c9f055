"""Fully sharded data parallel training for the trainer (``run.parallel: fsdp``), with PyTorch's FSDP2.

Under ``torchrun`` with ``run.parallel: fsdp`` the model's parameters, gradients and optimizer states are sharded
across processes (``torch.distributed.fsdp.fully_shard``): each transformer block of the vision tower and of the
semantic encoder/decoder, each MoVQ residual and attention block is a unit gathered just before it runs and freed
after, and the rest of the model is the root unit. Memory per process is then about the model's size divided by the
number of processes plus the largest unit, instead of the whole model, its gradients and two Adam moments. The
frozen tower is sharded too (it has no gradients or optimizer state).

Checkpoints are sharded ``torch.distributed.checkpoint`` folders written by every process (see
:class:`dualvitok.training.strategy.FSDPStrategy`); the full-state helpers here serve the final ``save_pretrained``
(gathered onto rank 0 with ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``), one-process FSDP runs
(single files, optimizer state by parameter name) and resuming such a file sharded. The discriminator (2.8 M
parameters) stays DDP.

Built on ``torch.distributed.fsdp`` and ``torch.distributed.checkpoint.state_dict``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..blocks import AttnBlock2d, ResnetBlock2d, VisionBlock

SHARD_UNITS = (VisionBlock, ResnetBlock2d, AttnBlock2d)


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_model(model: nn.Module, device_type: str, world_size: int) -> None:
    """Shard ``model`` in place over all processes: every :data:`SHARD_UNITS` module, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (world_size,))
    for module in model.modules():
        if isinstance(module, SHARD_UNITS):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def is_sharded(t: Tensor) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "device_mesh")


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor of a sharded parameter (a collective: every process must call it), else ``t``."""
    return t.full_tensor() if is_sharded(t) else t


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """This process's shard of ``full``, laid out as the sharded tensor ``like`` (no communication)."""
    if not is_sharded(like):
        return full.to(like.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """Full state dict on CPU on rank 0 (``{}`` on the others). Collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options())


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Full optimizer state keyed by parameter name, on rank 0. Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options())


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Tensor],
                    optimizer_state: dict[str, Any]) -> None:
    """Load full (unsharded) states, as written by :func:`full_model_state` / :func:`full_optimizer_state`, into a
    sharded model and its optimizer; every process passes the same full states."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
