"""PatchGAN discriminator (``NLayerDiscriminator``) used by the DualViTok training loss.

Follows pix2pix / taming-transformers' ``NLayerDiscriminator`` as configured in ILLUME+ (``disc_type='patchgan'``,
``disc_dim=64``, ``disc_num_layers=3``; illume-unified-mllm/ILLUME_plus,
``vision_tokenizer/tokenizer/discriminator_patchgan.py``): a 4x4 stride-2 conv with bias and LeakyReLU(0.2),
``n_layers - 1`` further stride-2 convs without bias + BatchNorm + LeakyReLU, one stride-1 conv block, and a final
stride-1 conv to one logit per patch. Weights are initialised N(0, 0.02), BatchNorm weights N(1, 0.02). Written
independently from that description."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["PatchGANDiscriminator", "init_discriminator_weights"]


def init_discriminator_weights(module: nn.Module) -> None:
    """DCGAN init: convs N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class PatchGANDiscriminator(nn.Module):
    """PatchGAN: images ``[B, in_channels, H, W]`` -> patch logits ``[B, 1, H', W']`` (30x30 for 256x256, 3 layers).

    Args:
        in_channels: image channels.
        dim: channels of the first conv (``disc_dim``, ``ndf``).
        num_layers: number of stride-2 convs (``disc_num_layers``).
        use_batchnorm: BatchNorm after the inner convs (the reference); False uses no normalisation.
    """

    def __init__(self, in_channels: int = 3, dim: int = 64, num_layers: int = 3, use_batchnorm: bool = True):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")

        def norm(channels: int) -> nn.Module:
            return nn.BatchNorm2d(channels) if use_batchnorm else nn.Identity()

        layers: list[nn.Module] = [nn.Conv2d(in_channels, dim, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, num_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [nn.Conv2d(dim * prev, dim * mult, 4, 2, 1, bias=not use_batchnorm), norm(dim * mult),
                       nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2**num_layers, 8)
        layers += [nn.Conv2d(dim * prev, dim * mult, 4, 1, 1, bias=not use_batchnorm), norm(dim * mult),
                   nn.LeakyReLU(0.2, True)]
        layers += [nn.Conv2d(dim * mult, 1, 4, 1, 1)]
        self.main = nn.Sequential(*layers)
        self.apply(init_discriminator_weights)

    def forward(self, images: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> logits ``[B, 1, H', W']``."""
        if images.ndim != 4:
            raise ValueError(f"discriminator input must be [B, C, H, W], got {tuple(images.shape)}")
        return self.main(images)
