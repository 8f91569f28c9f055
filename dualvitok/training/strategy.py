"""How a model is spread over processes: one strategy object per ``run.parallel`` mode, so the trainer has no
``if fsdp`` branches.

* :class:`DDPStrategy` (``ddp``): the model is replicated; under ``torchrun`` wrapped in
  ``DistributedDataParallel``. Checkpoints are single files written by rank 0 (states by parameter index).
* :class:`FSDPStrategy` (``fsdp``): under ``torchrun`` the model is sharded with FSDP2
  (:mod:`dualvitok.training.fsdp`); checkpoints are sharded folders written by every rank with
  ``torch.distributed.checkpoint`` (no rank gathers the full state), and resume with any number of processes. On one
  process the model is not sharded and checkpoints are single files in the same by-name format.

Both give: ``prepare(model)`` (shard, before the optimizer exists), ``wrap(module)`` (the module the forward pass
calls), ``no_sync(modules)`` (gradient accumulation without all-reduce), ``save``/``load`` of the training state,
``full_state(model, ema)`` (complete weights on rank 0, for ``final/``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._utils.distributed import DistInfo
from .ema import ModelEMA
from .run import CheckpointFolder

logger = logging.getLogger(__name__)

__all__ = ["Strategy", "DDPStrategy", "FSDPStrategy", "make_strategy", "SHARDED_STATE_FILE"]

SHARDED_STATE_FILE = "trainer_state.pt"  # the non-tensor part of a sharded checkpoint (rank 0's)


class Strategy:
    """Base: one process, nothing sharded or wrapped."""

    name = "ddp"

    def __init__(self, dist: DistInfo, device: torch.device):
        self.dist = dist
        self.device = device

    @property
    def sharded(self) -> bool:
        """True when parameters are sharded over processes (every process takes part in saving and sampling)."""
        return False

    # -- model
    def prepare(self, model: nn.Module) -> None:
        """Called once on the model, before its optimizer is built."""

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module to call in the forward pass (DDP wrapper or ``module`` itself)."""
        if not self.dist.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(module, device_ids=ids)

    @contextlib.contextmanager
    def no_sync(self, *wrapped: nn.Module) -> Iterator[None]:
        """No gradient all-reduce inside the block (all but the last micro-batch of gradient accumulation)."""
        with contextlib.ExitStack() as stack:
            for module in wrapped:
                if hasattr(module, "no_sync"):
                    stack.enter_context(module.no_sync())
                elif hasattr(module, "set_requires_gradient_sync"):  # FSDP2
                    module.set_requires_gradient_sync(False)
                    stack.callback(module.set_requires_gradient_sync, True)
            yield

    def scalar(self, value: torch.Tensor) -> float:
        """A (possibly sharded) 0-d tensor as a float."""
        return float(value)

    # -- state
    def model_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        return model.state_dict(), optimizer.state_dict()

    def load_model_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                         optimizer_state: dict) -> None:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)

    def full_state(self, model: nn.Module, ema: ModelEMA | None) -> tuple[dict | None, dict | None]:
        """Complete model weights and EMA shadows on rank 0 (``None`` where ``model`` itself can be saved)."""
        if ema is None:
            return None, None
        return model.state_dict(), ema.state_dict()["shadow"]

    def save(self, checkpoints: CheckpointFolder, step: int, state: dict[str, Any], model: nn.Module,
             optimizer: torch.optim.Optimizer, ema: ModelEMA | None) -> Path | None:
        """Write the checkpoint of ``step``: ``state`` (everything but model/optimizer/EMA) plus those three.

        Every process calls this; returns the path on rank 0.
        """
        model_state, optimizer_state = self.model_state(model, optimizer)
        path = None
        if self.dist.is_main:
            full = dict(state, model=model_state, optimizer=optimizer_state,
                        ema=None if ema is None else self._full_ema(ema))
            path = checkpoints.save(step, full)
        self.barrier()
        return path

    def _full_ema(self, ema: ModelEMA) -> dict:
        return ema.state_dict()

    def load(self, checkpoints: CheckpointFolder, model: nn.Module, optimizer: torch.optim.Optimizer,
             ema: ModelEMA | None) -> tuple[Path, dict[str, Any]]:
        """Restore model, optimizer and EMA from the newest readable checkpoint; returns its path and the rest of
        the state (step, schedulers, RNG, data position, ...)."""
        path, state = checkpoints.load_latest(self._reader(model, optimizer, ema))
        self._check_format(path, state)
        if "model" in state:  # a single-file checkpoint (the sharded reader restores in place)
            self.load_model_state(model, optimizer, state["model"], state["optimizer"])
            if ema is not None:
                if state.get("ema") is None:
                    raise ValueError("the checkpoint has no EMA but run.ema_decay is set")
                self._load_ema(ema, state["ema"])
        return path, state

    def _reader(self, model, optimizer, ema):
        return None  # CheckpointFolder's default: load_checkpoint

    def _load_ema(self, ema: ModelEMA, ema_state: dict) -> None:
        ema.load_state_dict(ema_state)

    def _check_format(self, path: Path, state: dict) -> None:
        saved = state.get("parallel", "ddp")
        if saved != self.name:
            raise ValueError(f"{path} was written with run.parallel: {saved}; resume it with run.parallel: {saved} "
                             "(the optimizer state is stored by parameter name under fsdp, by index under ddp)")

    def barrier(self) -> None:
        if self.dist.enabled:
            torch.distributed.barrier()


class DDPStrategy(Strategy):
    """Replicated model (``run.parallel: ddp``)."""

    name = "ddp"


class FSDPStrategy(Strategy):
    """Sharded model (``run.parallel: fsdp``); on one process an unsharded model with by-name states."""

    name = "fsdp"

    @property
    def sharded(self) -> bool:
        return self.dist.enabled

    def prepare(self, model: nn.Module) -> None:
        if not self.dist.enabled:
            logger.info("run.parallel: fsdp needs several processes (torchrun); training one unsharded model")
            return
        from .fsdp import shard_model

        shard_model(model, self.device.type, self.dist.world_size)
        local = sum(p.to_local().numel() for p in model.parameters())
        total = sum(p.numel() for p in model.parameters())
        logger.info("FSDP: rank %d holds %d of %d parameter elements", self.dist.rank, local, total)

    def wrap(self, module: nn.Module) -> nn.Module:
        from .fsdp import is_sharded

        if any(is_sharded(p) for p in module.parameters()):
            return module  # FSDP2 modules synchronise themselves
        return super().wrap(module)

    def scalar(self, value: torch.Tensor) -> float:
        from .fsdp import full_tensor

        return float(full_tensor(value))

    def model_state(self, model, optimizer):
        from .fsdp import full_model_state, full_optimizer_state

        return full_model_state(model), full_optimizer_state(model, optimizer)

    def load_model_state(self, model, optimizer, model_state, optimizer_state):
        from .fsdp import load_full_state

        load_full_state(model, optimizer, model_state, optimizer_state)

    def full_state(self, model, ema):
        from .fsdp import full_model_state, full_tensor

        weights = full_model_state(model)
        shadow = None
        if ema is not None:
            shadow = {}
            for k, v in ema.shadow.items():  # gathered one tensor at a time, kept on rank 0 only
                full = full_tensor(v)
                if self.dist.is_main:
                    shadow[k] = full.cpu()
        return weights, shadow

    def _full_ema(self, ema: ModelEMA) -> dict:
        return ema.state_dict()  # one process: nothing sharded

    # -- sharded checkpoints (torch.distributed.checkpoint), several processes only
    def save(self, checkpoints, step, state, model, optimizer, ema):
        if not self.sharded:
            return super().save(checkpoints, step, state, model, optimizer, ema)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        from .checkpoint import save_checkpoint

        model_state, optimizer_state = get_state_dict(model, optimizer)  # this rank's shards (DTensors)
        tensors = {"model": model_state, "optimizer": optimizer_state}
        if ema is not None:
            tensors["ema"] = dict(ema.shadow)
        final = checkpoints.path(step, sharded=True)
        tmp = final.with_name(f".{final.name}.tmp")  # a temporary folder: cleaned at start-up if a run dies here
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.barrier()
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(tmp)))
        if self.dist.is_main:
            meta = dict(state, ema_decay=None if ema is None else ema.decay, sharded=True)
            save_checkpoint(tmp / SHARDED_STATE_FILE, meta)
            checkpoints.replace_folder(tmp, final)  # the folder appears complete or not at all
            checkpoints.rotate(final)
            logger.info("saved sharded checkpoint %s", final)
        self.barrier()
        return final if self.dist.is_main else None

    def _reader(self, model, optimizer, ema):
        def read(path: Path) -> dict:
            if path.is_dir():
                return self._load_sharded(path, model, optimizer, ema)
            from .checkpoint import load_checkpoint

            return load_checkpoint(path, map_location="cpu")

        return read

    def _load_sharded(self, path: Path, model, optimizer, ema) -> dict:
        from .checkpoint import load_checkpoint

        if not self.sharded:
            raise ValueError(f"{path} is a sharded FSDP checkpoint; resume it under torchrun with run.parallel: fsdp")
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        meta = load_checkpoint(path / SHARDED_STATE_FILE, map_location="cpu")
        if (ema is None) != (meta.get("ema_decay") is None):
            raise ValueError("run.ema_decay differs from the checkpoint's (EMA on in one, off in the other)")
        model_state, optimizer_state = get_state_dict(model, optimizer)
        tensors = {"model": model_state, "optimizer": optimizer_state}
        if ema is not None:
            tensors["ema"] = dict(ema.shadow)
        dcp.load(tensors, storage_reader=safe_reader(path))  # fills this rank's shards in place
        set_state_dict(model, optimizer, model_state_dict=tensors["model"], optim_state_dict=tensors["optimizer"])
        if ema is not None:
            ema.decay = float(meta["ema_decay"])
            for k, v in tensors["ema"].items():
                ema.shadow[k] = v
        return meta

    def _load_ema(self, ema, ema_state):
        if self.sharded:  # a single-file checkpoint resumed sharded: keep this process's shard of each full tensor
            from .fsdp import shard_like

            ema_state = dict(ema_state, shadow={k: shard_like(v, ema.shadow[k])
                                                for k, v in ema_state["shadow"].items() if k in ema.shadow})
        ema.load_state_dict(ema_state)


def make_strategy(parallel: str, dist: DistInfo, device: torch.device) -> Strategy:
    """The strategy of ``run.parallel`` (``"ddp"`` or ``"fsdp"``)."""
    strategies = {"ddp": DDPStrategy, "fsdp": FSDPStrategy}
    if parallel not in strategies:
        raise ValueError(f"run.parallel must be one of {sorted(strategies)}, got {parallel!r}")
    return strategies[parallel](dist, device)


# ---------------------------------------------------------------------------------------------- safe DCP metadata
_SAFE_MODULES = ("torch.distributed.checkpoint.", "collections", "torch.distributed.tensor")


def safe_reader(path: str | os.PathLike):
    """A ``torch.distributed.checkpoint`` reader whose metadata file is unpickled with an allow-list (the
    checkpoint's own metadata classes, torch dtypes/sizes); tensor data is read with ``weights_only=True`` as
    usual. A metadata file naming any other global is refused: loading a checkpoint never runs foreign code."""
    import pickle

    from torch.distributed.checkpoint import FileSystemReader

    class _Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            allowed = module.startswith(_SAFE_MODULES) or (
                module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None),
                                                                   (torch.dtype, torch.layout, torch.memory_format))))
            if (module, name) == ("torch.serialization", "_get_layout") or (
                    module == "builtins" and name in ("set", "frozenset", "slice", "complex")) or (
                    module == "pathlib" and name.endswith("Path")):
                allowed = True
            if not allowed:
                raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the checkpoint metadata of {path}")
            return super().find_class(module, name)

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
                metadata = _Unpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                from torch.distributed.checkpoint.metadata import StorageMeta

                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(str(path))
