"""Model cards for saved DualViToks (private): ``huggingface_hub.ModelCard`` with this library's metadata.

The card's YAML front matter carries ``library_name: dualvitok``, the license and tags (``ModelCardData``); its
text states the architecture, where the weights come from (converted from the reference layout, loaded and
re-saved, or built here) and an evaluation table when metrics are known. A model loaded from a folder that has a
card keeps that card's text (its metadata gains ``library_name`` if missing), so re-saving the demo model keeps
its training recipe.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

TAGS = ["dualvitok", "image-tokenizer", "vector-quantization", "illume-plus", "pytorch"]


def _registered_name(config: Any) -> str | None:
    from .registry import get_config, list_models

    for name in list_models():
        if get_config(name) == config:
            return name
    return None


def _architecture_rows(model: Any) -> list[tuple[str, str]]:
    c = model.config
    tower = c.semantic_encoder.semantic_encoder_config
    params = sum(p.numel() for p in model.parameters())
    name = _registered_name(c)
    tower_text = (f"timm `{c.semantic_encoder.timm_model}`" if c.semantic_encoder.timm_model else
                  f"Qwen2-VL-style ViT, {tower.depth} blocks, width {tower.embed_dim}, {tower.num_heads} heads")
    return [
        ("registered architecture", f"`{name}`" if name else "custom (see `config.json`)"),
        ("parameters", f"{params:,}"),
        ("semantic tower (frozen)", tower_text),
        ("semantic head", f"{c.semantic_encoder.num_blocks} blocks, width {c.semantic_encoder.embed_dim}"),
        ("semantic codebook", f"{c.semantic_quantizer.type}, {c.semantic_quantizer.codebook_size} codes of dim "
                              f"{c.semantic_quantizer.dim}"),
        ("pixel codebook", f"{c.pixel_quantizer.type}, {c.pixel_quantizer.codebook_size} codes of dim "
                           f"{c.pixel_quantizer.dim}"),
        ("pixel encoder / decoder", f"MoVQ, ch {c.pixel_encoder.ch}, ch_mult {tuple(c.pixel_encoder.ch_mult)}, "
                                    f"{c.pixel_encoder.num_res_blocks} res blocks per level"),
        ("downsampling", f"{c.pixel_downsample_factor}x (a 256x256 image gives a 16x16 pixel grid)"),
    ]


def _origin(model: Any) -> tuple[str, str | None]:
    """(text, base_model) describing where the weights come from."""
    from .version import __version__

    record = getattr(model, "_load_record", None)
    if not record:
        return (f"Built or trained with dualvitok {__version__}; no training details were recorded with the "
                "weights. Add the data, recipe and compute here."), None
    source = record["source"]
    hub = not record.get("is_local")
    where = f"the Hub repo `{source}`" if hub else f"`{source}`"
    if record.get("layout") == "reference":
        return (f"Converted from the ILLUME+ reference checkpoint in {where} with dualvitok {__version__} "
                "(`DualViTok.from_pretrained`): key layout only, the 1x1-conv `proj_in` stored as a linear weight; "
                "no weight was changed. Architecture and training: ILLUME+ "
                "(`illume-unified-mllm/ILLUME_plus`, `configs/example/dualvitok/`)."), source if hub else None
    return f"Loaded from {where} and saved again with dualvitok {__version__}.", source if hub else None


def build_model_card(model: Any, evaluation: Mapping[str, float] | None = None, license: str = "apache-2.0",
                     repo_id: str | None = None):
    """The ``huggingface_hub.ModelCard`` to save with ``model``."""
    from huggingface_hub import ModelCard, ModelCardData

    evaluation = evaluation if evaluation is not None else getattr(model, "evaluation_results", None)
    origin, base_model = _origin(model)
    data = ModelCardData(library_name="dualvitok", license=license, tags=list(TAGS), base_model=base_model)
    load_as = repo_id or "PATH_OR_REPO_ID"
    lines = [
        "# DualViTok image tokenizer",
        "",
        "A DualViTok (ILLUME+) dual image tokenizer: a semantic branch (frozen vision tower + head, SimVQ codebook) "
        "and a pixel branch (MoVQ encoder/decoder, SimVQ codebook); the decoder reconstructs images from both "
        "token grids. Saved by the `dualvitok` library (`pip install dualvitok`).",
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in _architecture_rows(model)),
        "",
        "## Origin",
        "",
        origin,
        "",
        "## Usage",
        "",
        "```python",
        "from dualvitok import DualViTok, ImageProcessor",
        "",
        f'model = DualViTok.from_pretrained("{load_as}")',
        "processor = ImageProcessor()",
        'images = processor(["photo.jpg"])              # [1, 3, H, W] in [-1, 1]',
        "semantic, pixel = model.encode_indices(images)  # token grids",
        "reconstruction = model.decode_indices(semantic, pixel)",
        "```",
        "",
    ]
    if evaluation:
        lines += ["## Evaluation", "", "| metric | value |", "|---|---|",
                  *(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in evaluation.items()),
                  ""]
    else:
        lines += ["## Evaluation", "", "Not recorded. `dualvitok evaluate --model PATH` measures PSNR, SSIM, LPIPS "
                  "and rFID; pass the results to `save_pretrained(..., evaluation={...})`.", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
