"""dualvitok: the ILLUME+ dual semantic + pixel image tokenizer (DualViTok) and its parts as PyTorch modules."""

import logging as _logging

from .configuration import DualViTokConfig as DualViTokConfig
from .loading import load_demo as load_demo
from .model import DualViTok as DualViTok
from .outputs import DualViTokEncoding as DualViTokEncoding
from .outputs import DualViTokOutput as DualViTokOutput
from .processor import ImageProcessor as ImageProcessor
from .quantizers import QuantizerOutput as QuantizerOutput
from .quantizers import SimVQ as SimVQ
from .quantizers import VectorQuantizer as VectorQuantizer
from .registry import create_model as create_model
from .registry import get_config as get_config
from .registry import list_models as list_models
from .version import __version__ as __version__

_logging.getLogger(__name__).addHandler(_logging.NullHandler())

__all__ = [
    "DualViTok",
    "DualViTokConfig",
    "DualViTokEncoding",
    "DualViTokOutput",
    "ImageProcessor",
    "QuantizerOutput",
    "SimVQ",
    "VectorQuantizer",
    "__version__",
    "create_model",
    "get_config",
    "list_models",
    "load_demo",
]
