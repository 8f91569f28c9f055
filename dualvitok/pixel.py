"""The pixel branch of DualViTok: MoVQ encoder + quant conv + quantizer, and post-quant conv + MoVQ decoder.

Follows the reference ``DualViTok`` (``vision_tokenizer/tokenizer/dualvitok_model.py`` in
``illume-unified-mllm/ILLUME_plus``): ``pixel_encoder -> pixel_quant_conv -> pixel_quantizer`` at stride 16 on the
image at native size, and ``pixel_post_quant_conv -> pixel_decoder`` on the merged codes ``[semantic; pixel]``, which
also condition the decoder's spatial norms.

Inside a :class:`~dualvitok.DualViTok` the parts of both branches are registered on the tokenizer under the
checkpoint's names (``pixel_encoder``, ``pixel_quant_conv``, ``pixel_quantizer``, ``pixel_post_quant_conv``,
``pixel_decoder``), so its state-dict keys are the reference's; the branch objects only hold references to them
(see ``PIXEL_ENCODER_PARTS``, ``PIXEL_DECODER_PARTS``). Used on their own, a branch's keys are ``encoder.*``,
``quant_conv.*``, ``quantizer.*`` (``post_quant_conv.*``, ``decoder.*``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .blocks.layout import to_layout_of
from .blocks.movq import MoVQDecoder, MoVQEncoder
from .configuration import MoVQConfig, QuantizerConfig
from .outputs import PixelEncoderOutput
from .quantizers import Quantizer, build_quantizer

PIXEL_ENCODER_PARTS = {"pixel_encoder": "encoder", "pixel_quant_conv": "quant_conv", "pixel_quantizer": "quantizer"}
"""Tokenizer attribute (checkpoint name) -> :class:`PixelEncoder` attribute."""
PIXEL_DECODER_PARTS = {"pixel_post_quant_conv": "post_quant_conv", "pixel_decoder": "decoder"}
"""Tokenizer attribute (checkpoint name) -> :class:`PixelDecoder` attribute."""


def quantizer_from_config(config: QuantizerConfig) -> Quantizer:
    """The quantizer a :class:`QuantizerConfig` describes (``SimVQ`` or ``VQ``), with the options set for its type."""
    return build_quantizer(config.type, **config.quantizer_kwargs())


def _movq_kwargs(config: MoVQConfig) -> dict[str, Any]:
    return {"ch": config.ch, "ch_mult": tuple(config.ch_mult), "num_res_blocks": config.num_res_blocks,
            "attn_resolutions": tuple(config.attn_resolutions), "z_channels": config.z_channels,
            "dropout": config.dropout, "use_dc_up_down_blocks": config.use_dc_up_down_blocks}


def movq_encoder(config: MoVQConfig) -> MoVQEncoder:
    """The MoVQ encoder of the pixel branch: ``[B, 3, H, W] -> [B, z (x2 if double_z), H/16, W/16]``."""
    return MoVQEncoder(in_channels=config.in_channels, double_z=config.double_z, **_movq_kwargs(config))


def movq_decoder(config: MoVQConfig) -> MoVQDecoder:
    """The MoVQ decoder of the pixel branch, conditioned on the ``embed_dim``-channel merged codes."""
    return MoVQDecoder(out_channels=config.out_channels, zq_channels=config.embed_dim, **_movq_kwargs(config))


class PixelEncoder(nn.Module):
    """Images to pixel tokens: MoVQ encoder, 1x1 ``quant_conv`` to the code dimension, quantizer.

    Args:
        config: the pixel encoder's :class:`MoVQConfig` (``embed_dim`` is the code dimension).
        quantizer: the pixel quantizer's :class:`QuantizerConfig`.

    Shape: images ``[B, 3, H, W]`` in [-1, 1] -> :class:`PixelEncoderOutput` with ``features [B, z_p, H/16, W/16]``
    (before quantization), ``quantized`` (same shape), ``indices [B, H/16, W/16]`` and the quantizer ``loss``.
    """

    def __init__(self, config: MoVQConfig, quantizer: QuantizerConfig):
        super().__init__()
        self.encoder = movq_encoder(config)
        self.quant_conv = nn.Conv2d(self.encoder.out_channels, config.embed_dim, 1)
        self.quantizer = quantizer_from_config(quantizer)

    def forward(self, images: Tensor) -> PixelEncoderOutput:
        features = self.quant_conv(self.encoder(images))  # [B, z_p, H/16, W/16]
        q = self.quantizer(features)
        return PixelEncoderOutput(features=features, quantized=q.quantized, indices=q.indices, loss=q.loss)


class PixelDecoder(nn.Module):
    """Merged codes to images: 1x1 ``post_quant_conv``, then the MoVQ decoder conditioned on the merged codes.

    Args:
        config: the pixel decoder's :class:`MoVQConfig` (``embed_dim`` = semantic + pixel code dimensions).

    Shape: ``[B, embed_dim, h, w]`` -> ``[B, 3, 16h, 16w]`` (unclamped).
    """

    def __init__(self, config: MoVQConfig):
        super().__init__()
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.decoder = movq_decoder(config)

    def forward(self, merged: Tensor) -> Tensor:
        # codes in the decoder weights' layout (plain or, on the fast path, channels_last), whatever the caller's
        merged = to_layout_of(merged, self.decoder.conv_in.weight)
        return self.decoder(self.post_quant_conv(merged), merged)
