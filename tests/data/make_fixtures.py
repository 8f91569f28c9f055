"""Make the compact conformance fixtures in ``tests/data/conformance`` by running the ILLUME+ reference tokenizer.

The full conformance set (``shared/conformance``: an 18 MB reference-layout model and three 8-11 MB cases) is not
part of a clone, so the default test run checks conformance against this compact set instead. It has the same layout
(``reference_config.json``, ``reference_state_dict.safetensors``, ``cases.json``, ``caseN_HxW_bB.safetensors``
with the same tensor names) and is made the same way: the reference implementation
(``illume-unified-mllm/ILLUME_plus``, ``vision_tokenizer/tokenizer/dualvitok_model.py``) run on CPU in float32 with
seeded random weights on real photographs.

Inputs (nothing else is read):
- the reference tokenizer's source, ``vision_tokenizer/`` of ``illume-unified-mllm/ILLUME_plus`` at 51de69d
  (``--reference``), importable in the running interpreter: torch, einops, einx, timm, ``transformers==4.46.3``;
- the full conformance set (``--conformance``): its ``reference_config.json`` is the starting point of the small
  config, and its ``case0`` input image is the source of the small cases' pixels;
- the released checkpoint's key listing (``shared/reference/dualvitok_state_dict.txt``, ``--listing``), copied
  unchanged to ``tests/data/reference`` (62 kB) for ``tests/test_model.py``.

How the small case is derived:
1. ``--check``: the harness below first reproduces the full set's outputs from its own config and weights
   (every float tensor within the tests' 1e-4, the indices equal outside near
   ties; the differences are those of thread counts and summation order): the fixtures are made by the same code path.
2. The small config is the full set's config with narrower pixel levels (``ch=32``: the reference's GroupNorm(32)
   needs at least 32 channels; ``ch_mult=(1, 1, 1, 1, 2)`` in the encoder, so one DC down block changes the width,
   and ``(1, 1, 1, 1, 1)`` in the decoder, which keeps the weights under 4 MB), a narrower vision tower (one block,
   width 32, 4 heads, merger output 48, so the semantic decoder outputs 48 channels; the width must differ from the
   head's 64, the reference's ``proj_in`` is an Identity that its forward cannot use otherwise) and one block in the
   semantic head and decoder; everything else (layer types, SimVQ, 16 heads, RoPE, the target norm, DC up/down
   blocks, the attention level, code sizes) stays.
3. Weights: ``torch.manual_seed(0)``, then the reference's own constructors and initialisation (the tower from its
   config instead of ``Qwen2VisionTransformerPretrainedModel.from_pretrained``, as ``shared/reference``'s
   ``SOURCE.md`` describes), saved in reference key names.
4. Cases: the two photos of the full set's ``case0`` (256x256, in [-1, 1]), area-downsampled to 64x64 (batch 2;
   not in the reference's resolution mapping, so the semantic branch floors to 56x56) and, for the first photo, a
   centre crop of 48x80 from it area-downsampled to 64x80 (batch 1; non-square grids on both branches).

Usage (about a minute on one core)::

    python tests/data/make_fixtures.py --reference ../shared/reference/ILLUME_plus/vision_tokenizer \\
        --conformance ../shared/conformance --check
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

OUT = Path(__file__).resolve().parent / "conformance"


def _import_reference(reference: Path):
    sys.path.insert(0, str(reference))
    from tokenizer.dualvitok_model import DualViTok  # noqa: PLC0415  (the reference, on sys.path)
    from tokenizer.qwen2vit import modeling_qwen2_vl  # noqa: PLC0415
    from tokenizer.qwen2vit.configuration_qwen2_vl import Qwen2VLVisionConfig  # noqa: PLC0415
    from utils.registry_utils import DotDict  # noqa: PLC0415

    return DualViTok, modeling_qwen2_vl, Qwen2VLVisionConfig, DotDict


def build_reference(reference: Path, config: dict):
    """The reference DualViTok for a reference-layout ``config`` (tower built from ``semantic_encoder_config``)."""
    DualViTok, modeling, VisionConfig, DotDict = _import_reference(reference)
    config = copy.deepcopy(config)
    tower = config["semantic_encoder"].pop("semantic_encoder_config")
    tower_cls = modeling.Qwen2VisionTransformerPretrainedModel
    original = tower_cls.from_pretrained

    def from_config(cls, *args, attn_implementation="sdpa", **kwargs):
        return cls(VisionConfig(**tower, attn_implementation=attn_implementation))

    tower_cls.from_pretrained = classmethod(from_config)
    try:
        return DualViTok(DotDict.convert(config)).eval()
    finally:
        tower_cls.from_pretrained = original


def _margin(x: torch.Tensor, quantizer) -> torch.Tensor:
    """Euclidean distance gap between the best and the second-best code, ``x`` channel-first ``[B,C,h,w]``."""
    flat = x.float().permute(0, 2, 3, 1)
    dist = torch.cdist(flat.reshape(1, -1, flat.shape[-1]), quantizer.codebook.unsqueeze(0))[0]
    two = dist.topk(2, dim=-1, largest=False).values
    return (two[:, 1] - two[:, 0]).reshape(flat.shape[:-1])


@torch.no_grad()
def run_case(model, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every tensor of a conformance case for ``image`` ``[B,3,H,W]`` in [-1, 1]."""
    scaled = model.scaling_layer(image)
    (q_sem, loss_sem, idx_sem, target), (q_pix, loss_pix, idx_pix) = model.encode(image)
    z_sem, _ = model.semantic_encoder(scaled["image"], scaled["image_grid_thw"])
    z_pix = model.pixel_quant_conv(model.pixel_encoder(image))
    return {
        "image": image,
        "semantic_pixel_values": scaled["image"],
        "semantic_grid_thw": scaled["image_grid_thw"].long(),
        "semantic_target": target,
        "semantic_z": z_sem,
        "semantic_quantized": q_sem,
        "semantic_indices": idx_sem.long(),
        "semantic_indices_margin": _margin(z_sem, model.semantic_quantizer),
        "semantic_quantizer_loss": loss_sem.reshape(1),
        "pixel_z": z_pix,
        "pixel_quantized": q_pix,
        "pixel_indices": idx_pix.long(),
        "pixel_indices_margin": _margin(z_pix, model.pixel_quantizer),
        "pixel_quantizer_loss": loss_pix.reshape(1),
        "merged_codes": model.merge_quants(q_sem, q_pix),
        "reconstruction": model.decode(q_sem, q_pix),
        "reconstruction_from_indices": model.decode_code(idx_sem, idx_pix),
        "semantic_reconstruction": model.decode_semantic(q_sem),
    }


def check_full_set(reference: Path, conformance: Path) -> None:
    """Reproduce the full set from its config and weights (the harness is the one that made it)."""
    config = json.loads((conformance / "reference_config.json").read_text())
    model = build_reference(reference, config)
    weights = load_file(conformance / "reference_state_dict.safetensors")
    model.load_state_dict(weights, strict=True)
    for case in json.loads((conformance / "cases.json").read_text()):
        expected = load_file(conformance / case["file"])
        got = run_case(model, expected["image"])
        assert set(got) == set(expected), (case["file"], set(got) ^ set(expected))
        worst = 0.0
        for key, value in expected.items():
            if value.is_floating_point():
                diff = (got[key] - value).abs().max().item()
                worst = max(worst, diff)
                assert diff <= 1e-4, f"{case['file']}:{key}: the harness differs from the full set by {diff:.3g}"
            elif key.endswith("_indices"):
                decisive = expected[f"{key}_margin"] > 1e-4
                assert torch.equal(got[key][decisive], value[decisive]), f"{case['file']}:{key} differs"
            else:
                assert torch.equal(got[key], value), f"{case['file']}:{key}: the harness differs from the full set"
        print(f"check: {case['file']} reproduced (max abs diff {worst:.2g}, indices equal outside near ties)")


def small_config(conformance: Path) -> dict:
    config = json.loads((conformance / "reference_config.json").read_text())
    config["pixel_encoder"].update(ch=32, ch_mult=[1, 1, 1, 1, 2], num_res_blocks=1)
    config["pixel_decoder"].update(ch=32, ch_mult=[1, 1, 1, 1, 1], num_res_blocks=1)
    config["semantic_encoder"]["num_blocks"] = 1
    config["semantic_encoder"]["semantic_encoder_config"].update(depth=1, embed_dim=32, hidden_size=48)
    config["semantic_decoder"]["output_channels"] = 48
    config["semantic_decoder"]["num_blocks"] = 1
    return config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="the reference's vision_tokenizer/ folder")
    parser.add_argument("--conformance", type=Path, required=True, help="the full conformance set (shared/)")
    parser.add_argument("--check", action="store_true", help="first reproduce the full set with this harness")
    parser.add_argument("--listing", type=Path, default=None,
                        help="the released state-dict listing (default: CONFORMANCE/../reference/"
                        "dualvitok_state_dict.txt)")
    parser.add_argument("--output", type=Path, default=OUT, help=f"output folder (default: {OUT})")
    args = parser.parse_args(argv)
    listing = args.listing or args.conformance.parent / "reference" / "dualvitok_state_dict.txt"
    (args.output.parent / "reference").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(listing, args.output.parent / "reference" / listing.name)
    torch.set_num_threads(1)
    if args.check:
        check_full_set(args.reference, args.conformance)

    config = small_config(args.conformance)
    torch.manual_seed(0)
    model = build_reference(args.reference, config)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "reference_config.json").write_text(json.dumps(config, indent=1) + "\n")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, args.output / "reference_state_dict.safetensors")

    photos = load_file(args.conformance / "case0_256x256_b2.safetensors")["image"]
    small = F.interpolate(photos, size=(64, 64), mode="area")
    crop = F.interpolate(photos[:1], size=(64, 80), mode="area")[:, :, 8:56, :].contiguous()
    cases = []
    for image, source in ((small, "case0 images 0 and 1"), (crop, "case0 image 0")):
        b, _, h, w = image.shape
        name = f"case{len(cases)}_{h}x{w}_b{b}.safetensors"
        save_file({k: v.contiguous() for k, v in run_case(model, image).items()}, args.output / name)
        cases.append({"file": name, "height": h, "width": w, "batch": b, "source": source})
        print(f"wrote {name}")
    (args.output / "cases.json").write_text(json.dumps(cases, indent=1) + "\n")
    print(f"wrote {args.output} ({len(state)} tensors, {sum(v.numel() for v in state.values())} parameters)")


if __name__ == "__main__":
    main()
