"""Sampling settings per token kind, per-task defaults, and the classifier-free-guidance combination.

Follows ILLUME+ (``generation_eval/models/inference_utils.py``, ``scripts/inference_text_to_image.sh``,
``scripts/inference_image_editing.sh`` in ``illume-unified-mllm/ILLUME_plus``): per-kind temperature / top-k /
top-p applied in the order guidance, structure mask, temperature, top-k, top-p; the pixel level uses 3x the
semantic top-k; guidance ``g * (logp_c - logp_u) + logp_u``. Defaults: text-to-image T=1, k=2048 (pixel 6144),
p=1, guidance 2.0; editing T=0.7, k=512 (pixel 1536), p=0.8, guidance 1.25 (the inference scripts); understanding
is greedy (the notebook). Difference: the eval pipeline's second pass of Hugging Face warpers (temperature applied
twice, global top-k capping the pixel top-k) is not reproduced.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """Temperature, top-k (0: off) and top-p (1: off) for one kind of token."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature} (use do_sample=False for greedy)")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={self.top_k}, top_p={self.top_p}")


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling of a task: per-kind parameters, guidance scale inside images, greedy or sampled, token budget."""

    text: SamplingParams = field(default_factory=SamplingParams)
    semantic: SamplingParams = field(default_factory=SamplingParams)
    pixel: SamplingParams = field(default_factory=SamplingParams)
    guidance_scale: float = 1.0
    do_sample: bool = True
    max_new_tokens: int | None = None

    def replace(self, **overrides) -> GenerationSettings:
        """A copy with fields replaced; ``temperature`` / ``top_k`` / ``top_p`` set both image levels (pixel top-k
        is 3x the given one, as the reference) and ``text_*`` keys the text settings. ``None`` values are ignored."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        image = {k: overrides.pop(k) for k in ("temperature", "top_k", "top_p") if k in overrides}
        text = {k[5:]: overrides.pop(k) for k in list(overrides) if k.startswith("text_")}
        out = dataclasses.replace(self, **overrides)
        if image:
            semantic = dataclasses.replace(out.semantic, **image)
            pixel = dataclasses.replace(out.pixel, **image)
            if "top_k" in image:
                pixel = dataclasses.replace(pixel, top_k=3 * image["top_k"])
            out = dataclasses.replace(out, semantic=semantic, pixel=pixel)
        if text:
            out = dataclasses.replace(out, text=dataclasses.replace(out.text, **text))
        return out


TASK_DEFAULTS: dict[str, GenerationSettings] = {
    "text_to_image": GenerationSettings(
        text=SamplingParams(1.0, 0, 1.0), semantic=SamplingParams(1.0, 2048, 1.0), pixel=SamplingParams(1.0, 6144, 1.0),
        guidance_scale=2.0, do_sample=True),
    "editing": GenerationSettings(
        text=SamplingParams(0.7, 0, 0.8), semantic=SamplingParams(0.7, 512, 0.8), pixel=SamplingParams(0.7, 1536, 0.8),
        guidance_scale=1.25, do_sample=True),
    "understanding": GenerationSettings(text=SamplingParams(1.0, 128, 1.0), guidance_scale=1.0, do_sample=False,
                                        max_new_tokens=512),
}
"""Per-task defaults (copies are made with :meth:`GenerationSettings.replace`)."""


def combine_guidance(cond_logits: Tensor, uncond_logits: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance on log-probabilities: ``g * (logp_c - logp_u) + logp_u``. Shape ``[B, V]``."""
    cond = torch.log_softmax(cond_logits.float(), dim=-1)
    uncond = torch.log_softmax(uncond_logits.float(), dim=-1)
    return scale * (cond - uncond) + uncond


def warp(scores: Tensor, params: SamplingParams) -> Tensor:
    """Temperature, then top-k, then top-p on ``scores [V]`` or ``[B, V]`` (masked entries are ``-inf``)."""
    scores = scores / params.temperature
    if params.top_k and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        cum = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
        remove = cum - torch.softmax(sorted_scores, dim=-1) >= params.top_p  # keep the token that crosses top_p
        scores = scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return scores


def select_tokens(scores: Tensor, params: list[SamplingParams], do_sample: bool,
                  generator: torch.Generator | None = None) -> Tensor:
    """Pick one token per row of ``scores [B, V]`` (already guided and masked) with that row's parameters -> ``[B]``."""
    if not do_sample:
        return scores.argmax(-1)
    out = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
    for row, p in enumerate(params):
        probs = torch.softmax(warp(scores[row], p), dim=-1)
        out[row] = torch.multinomial(probs, 1, generator=generator)[0]
    return out
