"""Reusable blocks: DC-AE down/up blocks, MoVQ blocks, 2D-RoPE vision transformer blocks, a Qwen2-VL vision tower."""

from .attention import AttnBlock2d as AttnBlock2d
from .dc import DCDownBlock2d as DCDownBlock2d
from .dc import DCUpBlock2d as DCUpBlock2d
from .dc import Downsample2d as Downsample2d
from .dc import Upsample2d as Upsample2d
from .dc import channel_average as channel_average
from .dc import channel_to_space as channel_to_space
from .dc import space_to_channel as space_to_channel
from .dc import space_to_channel_average as space_to_channel_average
from .movq import MoVQDecoder as MoVQDecoder
from .movq import MoVQEncoder as MoVQEncoder
from .norm import SpatialNorm as SpatialNorm
from .norm import group_norm as group_norm
from .qwen2_vit import PatchEmbed as PatchEmbed
from .qwen2_vit import PatchMerger as PatchMerger
from .qwen2_vit import Qwen2VisionConfig as Qwen2VisionConfig
from .qwen2_vit import Qwen2VisionTower as Qwen2VisionTower
from .resnet import ResnetBlock2d as ResnetBlock2d
from .rope import VisionRotaryEmbedding as VisionRotaryEmbedding
from .rope import apply_rotary as apply_rotary
from .rope import grid_positions as grid_positions
from .rope import rotary_cos_sin as rotary_cos_sin
from .rope import rotate_half as rotate_half
from .vit import VisionAttention as VisionAttention
from .vit import VisionBlock as VisionBlock
from .vit import VisionMlp as VisionMlp
from .vit import quick_gelu as quick_gelu

__all__ = [
    "AttnBlock2d", "DCDownBlock2d", "DCUpBlock2d", "Downsample2d", "MoVQDecoder", "MoVQEncoder", "PatchEmbed",
    "PatchMerger", "Qwen2VisionConfig", "Qwen2VisionTower", "ResnetBlock2d", "SpatialNorm", "Upsample2d",
    "VisionAttention", "VisionBlock", "VisionMlp", "VisionRotaryEmbedding", "apply_rotary", "channel_average",
    "channel_to_space", "grid_positions", "group_norm", "quick_gelu", "rotary_cos_sin", "rotate_half",
    "space_to_channel", "space_to_channel_average",
]
