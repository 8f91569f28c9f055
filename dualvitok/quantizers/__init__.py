"""Vector quantizers, each usable on its own: :class:`SimVQ` and :class:`VectorQuantizer`."""

from .base import DEFAULT_MEMORY_BUDGET as DEFAULT_MEMORY_BUDGET
from .base import NearestCode as NearestCode
from .base import Quantizer as Quantizer
from .base import QuantizerOutput as QuantizerOutput
from .base import nearest_code as nearest_code
from .base import prepare_codebook as prepare_codebook
from .noise import inject_token_noise as inject_token_noise
from .noise import token_noise_mask as token_noise_mask
from .rotation import rotate_to as rotate_to
from .simvq import SimVQ as SimVQ
from .usage import CodebookUsage as CodebookUsage
from .vq import VectorQuantizer as VectorQuantizer


def build_quantizer(type: str, **kwargs) -> Quantizer:  # noqa: A002 - mirrors the reference config key
    """Build a quantizer from a reference-style config (``{'type': 'SimVQ', 'dim': 32, ...}``)."""
    registry = {"SimVQ": SimVQ, "VectorQuantizer": VectorQuantizer, "VectorQuantize": VectorQuantizer}
    if type not in registry:
        raise ValueError(f"unknown quantizer type {type!r}; available: {sorted(registry)}")
    return registry[type](**kwargs)


__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "CodebookUsage",
    "NearestCode",
    "Quantizer",
    "QuantizerOutput",
    "SimVQ",
    "VectorQuantizer",
    "build_quantizer",
    "inject_token_noise",
    "nearest_code",
    "prepare_codebook",
    "rotate_to",
    "token_noise_mask",
]
