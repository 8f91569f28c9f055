"""A timm vision transformer (e.g. SigLIP) as DualViTok's frozen semantic tower, in place of the Qwen2-VL tower.

The ILLUME+ reference only supports its Qwen2-VL tower. Selected with
``DualViTokConfig.semantic_encoder.timm_model = "<timm model name>"``; the head, quantizer and decoders stay the same.
The tower takes the Qwen2-VL patch input that :class:`dualvitok.semantic.SemanticPreprocessor` produces (so the
semantic resize to multiples of 28 and the token grid ``(Hs/28, Ws/28)`` are unchanged), reassembles the image,
re-normalises it from the CLIP statistics to the timm model's, runs ``forward_features`` (dynamic image size and
padding), drops prefix tokens and average-pools the patch grid to the semantic token grid. Its feature width must
equal ``semantic_encoder_config.hidden_size`` (and the semantic decoder's ``output_channels``). Weights: random
(nothing is fetched while building); :func:`load_timm_pretrained` loads timm's pretrained weights when they are
available (cache or network).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._utils.deps import require
from .blocks.qwen2_vit import Qwen2VisionConfig

__all__ = ["TimmVisionTower", "load_timm_pretrained"]

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _import_timm():
    return require("timm", "timm", "a timm semantic tower")


class TimmVisionTower(nn.Module):
    """Frozen timm ViT with the Qwen2-VL tower's interface.

    Args:
        model_name: a timm model name, e.g. ``"vit_base_patch16_siglip_224"``.
        config: the tower config (patch_size, temporal_patch_size, spatial_merge_size of the input layout; hidden_size
            must equal the timm model's ``num_features``).
        pretrained: load timm's pretrained weights while building (needs them cached or a network).

    Shape: ``pixel_values [B*gh*gw, 3*T*P*P]``, ``grid_thw [B, 3]`` -> ``[B*(gh/m)*(gw/m), hidden_size]``.
    """

    def __init__(self, model_name: str, config: Qwen2VisionConfig, pretrained: bool = False):
        super().__init__()
        timm = _import_timm()
        self.model_name = model_name
        self.patch_size, self.temporal_patch_size = config.patch_size, config.temporal_patch_size
        self.merge_size = config.spatial_merge_size
        self.model = timm.create_model(model_name, pretrained=pretrained, num_classes=0, dynamic_img_size=True,
                                       dynamic_img_pad=True)
        width = self.model.num_features
        if width != config.hidden_size:
            raise ValueError(f"timm model {model_name!r} has {width} features but semantic_encoder_config.hidden_size "
                             f"is {config.hidden_size}; set hidden_size (and semantic_decoder.output_channels) "
                             f"to {width}")
        data_config = timm.data.resolve_model_data_config(self.model)
        # x_timm = (x01 - m) / s with x01 = x_clip * std_c + mean_c  ->  x_clip * scale + shift
        scale = torch.tensor(_CLIP_STD) / torch.tensor(data_config["std"])
        shift = (torch.tensor(_CLIP_MEAN) - torch.tensor(data_config["mean"])) / torch.tensor(data_config["std"])
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)

    def images_from_patches(self, pixel_values: Tensor, grid_thw: Tensor | tuple[int, int, int]) -> Tensor:
        """Undo the Qwen2-VL patch layout: ``[B*gh*gw, 3*T*P*P]`` -> CLIP-normalised images ``[B, 3, gh*P, gw*P]``.

        ``grid_thw``: the ``[B, 3]`` tensor, or one ``(t, h, w)`` tuple shared by all images (no host read).
        """
        if torch.is_tensor(grid_thw):
            grids = grid_thw.tolist()
            if any(g != grids[0] for g in grids):
                raise ValueError(f"all images of a batch must share one grid, got {grids}")
            _, gh, gw = grids[0]
        else:
            _, gh, gw = (int(v) for v in grid_thw)
        p, t, m = self.patch_size, self.temporal_patch_size, self.merge_size
        x = pixel_values.reshape(-1, gh // m, gw // m, m, m, 3, t, p, p)[:, :, :, :, :, :, 0]  # first frame
        x = x.permute(0, 5, 1, 3, 6, 2, 4, 7)  # [B, 3, gh/m, m, P, gw/m, m, P]
        return x.reshape(-1, 3, gh * p, gw * p)

    def forward(self, pixel_values: Tensor, grid_thw: Tensor | tuple[int, int, int]) -> Tensor:
        images = self.images_from_patches(pixel_values, grid_thw)
        b, _, height, width = images.shape
        x = images * self.scale.to(images.dtype) + self.shift.to(images.dtype)
        tokens = self.model.forward_features(x)  # [B, prefix + gh'*gw', D]
        tokens = tokens[:, getattr(self.model, "num_prefix_tokens", 0):]
        ps = self.model.patch_embed.patch_size
        gh, gw = -(-height // ps[0]), -(-width // ps[1])  # with dynamic padding
        fmap = tokens.transpose(1, 2).reshape(b, -1, gh, gw)  # [B, D, gh', gw']
        unit = self.patch_size * self.merge_size
        pooled = F.adaptive_avg_pool2d(fmap, (height // unit, width // unit))  # [B, D, hs, ws]
        return pooled.flatten(2).transpose(1, 2).reshape(-1, fmap.shape[1])  # [B*hs*ws, D], raster order


def load_timm_pretrained(model: nn.Module) -> None:
    """Load timm's pretrained weights into a DualViTok whose semantic tower is a :class:`TimmVisionTower`."""
    tower = model.semantic_encoder.model
    if not isinstance(tower, TimmVisionTower):
        raise ValueError("this model's semantic tower is not a timm model (config.semantic_encoder.timm_model is None)")
    timm = _import_timm()
    source = timm.create_model(tower.model_name, pretrained=True, num_classes=0, dynamic_img_size=True,
                               dynamic_img_pad=True)
    tower.model.load_state_dict(source.state_dict())
