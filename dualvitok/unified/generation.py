"""KV-cached decoding with classifier-free guidance from a separate unconditional pass.

Follows ILLUME+ (``IllumeQwen2ForCausalLM.generate`` and ``CFGLogits`` / ``InterleavedLogitsProcessor`` in
``illume-unified-mllm/ILLUME_plus``): the prompt enters as input embeddings (so continuous image features can be
mixed in), the unconditional prompt runs as a second forward pass of the same model with its own KV cache and is fed
every token sampled from the conditional branch, and guidance is used only inside image blocks. Differences: a
small explicit loop instead of Hugging Face ``generate`` (one code path for cached, uncached, guided and unguided
decoding); the unconditional branch is prefilled at the start and follows all generated tokens (the reference
starts it at ``<start_of_image>``, which is the same when the image is the first generated token, as in the task
methods); guidance scale 1 skips the unconditional pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .constraints import PIXEL, SEMANTIC, TEXT, ImageBlockConstraint
from .sampling import GenerationSettings, SamplingParams, combine_guidance, select_tokens


@dataclass
class GenerationOutput:
    """Generated ids ``sequences [B, N]`` (``pad_token_id`` after a row ended) and the number of decoding steps."""

    sequences: Tensor
    num_steps: int


def left_pad(embeddings: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Left-pad per-prompt embeddings ``[T_i, D]`` -> ``(inputs_embeds [B, T, D], attention_mask [B, T])``."""
    length = max(e.shape[0] for e in embeddings)
    dim = embeddings[0].shape[-1]
    embeds = embeddings[0].new_zeros(len(embeddings), length, dim)
    mask = torch.zeros(len(embeddings), length, dtype=torch.long, device=embeddings[0].device)
    for i, e in enumerate(embeddings):
        embeds[i, length - e.shape[0]:] = e
        mask[i, length - e.shape[0]:] = 1
    return embeds, mask


class _Branch:
    """One forward stream (conditional or unconditional) with its KV cache, attention mask and positions."""

    def __init__(self, model: nn.Module, inputs_embeds: Tensor, attention_mask: Tensor, use_cache: bool):
        self.model, self.use_cache = model, use_cache
        self.mask = attention_mask
        self.positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]; left padding gets position 0
        self.embeds = inputs_embeds
        self.cache = None
        if use_cache:
            from transformers import DynamicCache

            try:
                self.cache = DynamicCache(config=getattr(model, "config", None))
            except TypeError:  # transformers < 4.56: no config argument
                self.cache = DynamicCache()
        self.logits = self._run(inputs_embeds, self.positions)

    def _run(self, embeds: Tensor, positions: Tensor) -> Tensor:
        out = self.model(inputs_embeds=embeds, attention_mask=self.mask, position_ids=positions,
                         past_key_values=self.cache, use_cache=self.use_cache, logits_to_keep=1)
        return out.logits[:, -1].float()  # [B, V]

    def step(self, token_embeds: Tensor) -> Tensor:
        """Append ``token_embeds [B, 1, D]``; returns the next-token logits ``[B, V]``."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        next_position = self.positions[:, -1:] + 1
        self.positions = torch.cat([self.positions, next_position], dim=1)
        if self.use_cache:
            self.logits = self._run(token_embeds, next_position)
        else:  # recompute the whole sequence (reference path for tests)
            self.embeds = torch.cat([self.embeds, token_embeds], dim=1)
            self.logits = self._run(self.embeds, self.positions)
        return self.logits


@torch.no_grad()
def generate_tokens(
    language_model: nn.Module,
    inputs_embeds: Tensor,
    attention_mask: Tensor,
    constraint: ImageBlockConstraint,
    settings: GenerationSettings,
    max_new_tokens: int,
    pad_token_id: int,
    unconditional_embeds: Tensor | None = None,
    unconditional_attention_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> GenerationOutput:
    """Decode with structure constraints and optional classifier-free guidance.

    Args:
        language_model: a Hugging Face causal LM (``inputs_embeds``, ``attention_mask``, ``position_ids``,
            ``past_key_values`` and ``logits_to_keep`` are used).
        inputs_embeds: left-padded prompt embeddings ``[B, T, D]``; attention_mask ``[B, T]``.
        constraint: the :class:`ImageBlockConstraint` (its state advances here).
        settings: sampling per token kind, guidance scale and greedy / sampled.
        max_new_tokens: step budget.
        pad_token_id: fills rows that have ended.
        unconditional_embeds, unconditional_attention_mask: the unconditional prompt ``[B, T_u, D]``, needed when
            ``settings.guidance_scale != 1``.
        generator: random generator for sampling.
        use_cache: KV caching (``False`` recomputes the full sequence each step: same tokens, slower).
        progress: show a progress bar.

    Returns:
        :class:`GenerationOutput` with ``sequences [B, N]``, ``N <= max_new_tokens``.
    """
    guided = settings.guidance_scale != 1.0
    if guided and unconditional_embeds is None:
        raise ValueError(f"guidance_scale={settings.guidance_scale} needs an unconditional prompt; pass "
                         "unconditional_embeds or use guidance_scale=1")
    embed = language_model.get_input_embeddings()
    cond = _Branch(language_model, inputs_embeds, attention_mask, use_cache)
    uncond = _Branch(language_model, unconditional_embeds, unconditional_attention_mask, use_cache) if guided else None
    by_kind: dict[str, SamplingParams] = {TEXT: settings.text, SEMANTIC: settings.semantic, PIXEL: settings.pixel}
    generated: list[Tensor] = []
    steps = 0
    for step in tqdm(range(1, max_new_tokens + 1), disable=not progress, desc="generating", unit="tok"):
        steps = step
        scores = torch.log_softmax(cond.logits, dim=-1)  # [B, V]
        if uncond is not None:
            inside = torch.tensor(constraint.in_image(), device=scores.device)
            if bool(inside.any()):
                guided_scores = combine_guidance(cond.logits, uncond.logits, settings.guidance_scale)
                scores = torch.where(inside[:, None], guided_scores, scores)
        kinds = constraint.kinds()
        finished = torch.tensor(constraint.finished, device=scores.device)
        scores = constraint(scores)
        params = [by_kind.get(k, settings.text) if isinstance(k, str) else settings.text for k in kinds]
        tokens = select_tokens(scores, params, settings.do_sample, generator)
        tokens = torch.where(finished, torch.full_like(tokens, pad_token_id), tokens)
        generated.append(tokens)
        constraint.update(tokens)
        if all(constraint.finished):
            break
        token_embeds = embed(tokens[:, None])  # [B, 1, D]
        cond.step(token_embeds)
        if uncond is not None:
            uncond.step(token_embeds)
    sequences = torch.stack(generated, dim=1) if generated else inputs_embeds.new_zeros(len(inputs_embeds), 0).long()
    return GenerationOutput(sequences=sequences, num_steps=steps)
