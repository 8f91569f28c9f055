"""Unified MLLM wrapper (ILLUME+): understanding, text-to-image and editing with a causal LM and DualViTok.

Needs the ``unified`` extra (``pip install 'dualvitok[unified]'``, i.e. transformers). Vocabulary, sequence,
template and sampling helpers are plain torch; the model, generation and loading use transformers.
"""

from . import _deps as _deps  # first: a clear ImportError naming the extra when transformers is missing
from .adapters import DualVisionTower as DualVisionTower
from .adapters import MixedProjector as MixedProjector
from .adapters import VisionFeatures as VisionFeatures
from .anchors import ANCHORS as ANCHORS
from .anchors import nearest_anchor as nearest_anchor
from .anchors import pad_to_size as pad_to_size
from .anchors import unpad_and_resize as unpad_and_resize
from .config import UnifiedConfig as UnifiedConfig
from .constraints import ImageBlockConstraint as ImageBlockConstraint
from .generation import GenerationOutput as GenerationOutput
from .generation import generate_tokens as generate_tokens
from .hf_processor import ImageBlockLogitsProcessor as ImageBlockLogitsProcessor
from .model import ImageGenerationOutput as ImageGenerationOutput
from .model import UnifiedMLLM as UnifiedMLLM
from .sampling import TASK_DEFAULTS as TASK_DEFAULTS
from .sampling import GenerationSettings as GenerationSettings
from .sampling import SamplingParams as SamplingParams
from .sampling import combine_guidance as combine_guidance
from .sequence import ImageBlockError as ImageBlockError
from .sequence import ImageGrids as ImageGrids
from .sequence import ParsedImage as ParsedImage
from .sequence import block_skeleton as block_skeleton
from .sequence import build_image_block as build_image_block
from .sequence import image_grids as image_grids
from .sequence import parse_image_block as parse_image_block
from .sequence import parse_image_blocks as parse_image_blocks
from .sequence import resolution_tag as resolution_tag
from .vocabulary import VisionVocabulary as VisionVocabulary
from .vocabulary import extend_tokenizer as extend_tokenizer
from .vocabulary import resize_embeddings as resize_embeddings
from .vocabulary import train_only_vision_rows as train_only_vision_rows
from .vocabulary import vision_token_strings as vision_token_strings

__all__ = [
    "ANCHORS", "TASK_DEFAULTS", "DualVisionTower", "GenerationOutput", "GenerationSettings", "ImageBlockConstraint",
    "ImageBlockError", "ImageBlockLogitsProcessor", "ImageGenerationOutput", "ImageGrids", "MixedProjector",
    "ParsedImage", "SamplingParams",
    "UnifiedConfig", "UnifiedMLLM", "VisionFeatures", "VisionVocabulary", "block_skeleton", "build_image_block",
    "combine_guidance", "extend_tokenizer", "generate_tokens", "image_grids", "nearest_anchor", "pad_to_size",
    "parse_image_block", "parse_image_blocks", "resize_embeddings", "resolution_tag", "train_only_vision_rows",
    "unpad_and_resize", "vision_token_strings",
]
