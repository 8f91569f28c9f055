"""Named outputs of the models (no positional tuples)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .quantizers.base import QuantizerOutput

__all__ = ["DualViTokEncoding", "DualViTokOutput", "PixelEncoderOutput", "QuantizerOutput", "SemanticEncoderOutput"]


@dataclass
class SemanticEncoderOutput:
    """Output of :class:`dualvitok.semantic.SemanticEncoder`.

    Attributes:
        features: semantic features before quantization ``[B, z, hs, ws]``.
        target: the regression target (LayerNorm'd merger output) ``[B, C_vit, hs, ws]``, no gradient.
        tower_features: raw merger output before the target norm ``[B, C_vit, hs, ws]`` (the MLLM's continuous input).
    """

    features: Tensor
    target: Tensor
    tower_features: Tensor


@dataclass
class PixelEncoderOutput:
    """Output of :class:`dualvitok.pixel.PixelEncoder`.

    Attributes:
        features: pixel features before quantization (after the quant conv) ``[B, z_p, H/16, W/16]``.
        quantized: quantized features (straight-through) ``[B, z_p, H/16, W/16]``.
        indices: ``[B, H/16, W/16]`` int64.
        loss: quantizer loss (scalar).
    """

    features: Tensor
    quantized: Tensor
    indices: Tensor
    loss: Tensor


@dataclass
class DualViTokEncoding:
    """Output of :meth:`DualViTok.encode`. Shapes for an input ``[B, 3, H, W]``:

    Attributes:
        semantic_indices: ``[B, hs, ws]`` int64 (hs = Hs/28 of the semantic resize).
        pixel_indices: ``[B, H/16, W/16]`` int64.
        semantic_codes: quantized semantic features, channel-first ``[B, z_s, hs, ws]`` (straight-through).
        pixel_codes: quantized pixel features ``[B, z_p, H/16, W/16]`` (straight-through).
        semantic_features: semantic features before quantization ``[B, z_s, hs, ws]``.
        pixel_features: pixel features before quantization (after ``pixel_quant_conv``) ``[B, z_p, H/16, W/16]``.
        semantic_target: LayerNorm'd vision-tower output, the semantic decoder's target ``[B, C_vit, hs, ws]``.
        semantic_loss: semantic quantizer loss (scalar).
        pixel_loss: pixel quantizer loss (scalar).
        semantic_pixel_values: the vision tower's patch input ``[N, C*2*14*14]``.
        semantic_grid_thw: ``[B, 3]`` patch grid per image.
    """

    semantic_indices: Tensor
    pixel_indices: Tensor
    semantic_codes: Tensor
    pixel_codes: Tensor
    semantic_features: Tensor
    pixel_features: Tensor
    semantic_target: Tensor
    semantic_loss: Tensor
    pixel_loss: Tensor
    semantic_pixel_values: Tensor | None = None
    semantic_grid_thw: Tensor | None = None


@dataclass
class DualViTokOutput:
    """Output of :meth:`DualViTok.forward`.

    Attributes:
        reconstruction: decoded image ``[B, 3, H, W]``, unclamped (nominally in [-1, 1]).
        semantic_reconstruction: semantic decoder output ``[B, C_vit, hs, ws]``.
        encoding: the :class:`DualViTokEncoding` (indices, codes, target, quantizer losses).
    """

    reconstruction: Tensor
    semantic_reconstruction: Tensor
    encoding: DualViTokEncoding

    @property
    def semantic_loss(self) -> Tensor:
        return self.encoding.semantic_loss

    @property
    def pixel_loss(self) -> Tensor:
        return self.encoding.pixel_loss

    @property
    def semantic_target(self) -> Tensor:
        return self.encoding.semantic_target
