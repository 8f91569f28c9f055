"""Constrained, KV-cached, guided generation with a tiny random Qwen2: well-formedness, CFG, cache equivalence."""

from __future__ import annotations

import pytest
import torch

from dualvitok.unified import (
    TASK_DEFAULTS,
    GenerationSettings,
    ImageBlockConstraint,
    SamplingParams,
    combine_guidance,
    generate_tokens,
    image_grids,
    parse_image_block,
    resolution_tag,
)
from dualvitok.unified.generation import left_pad
from dualvitok.unified.sampling import warp
from dualvitok.unified.templates import text_to_image_prompts


def _gen(model, prompt, size, **kw):
    kw.setdefault("decode", False)
    return model.generate_image(prompt, *size, **kw)


@pytest.mark.parametrize("seed", [0, 1])
def test_sampled_generation_is_well_formed_and_decodes_to_requested_size(unified, seed):
    g = torch.Generator().manual_seed(seed)
    out = unified.generate_image(["a cat with a hat", "a dog"], 256, 256, generator=g)
    grids = image_grids(256, 256)
    assert out.semantic_indices.shape == (2, 9, 9) and out.pixel_indices.shape == (2, 16, 16)
    assert out.images.shape == (2, 3, 256, 256)
    assert out.images.min() >= -1 and out.images.max() <= 1
    for row in out.sequences:
        assert len(row) == grids.block_length + 1 and row[-1] == unified.eos_token_id
        parse_image_block(unified.vocabulary, row, grids)
    # semantic codes span many values: sampling happened over the level's range
    assert out.semantic_indices.unique().numel() > 20


@pytest.mark.parametrize("size", [(64, 128), (192, 128), (128, 128)])
def test_adversarial_logits_still_give_well_formed_blocks(unified, size):
    """An LM that strongly prefers <|im_end|>, text and wrong-level tokens still yields a parseable block."""
    vocab = unified.vocabulary
    bias = torch.zeros(unified.language_model.get_output_embeddings().weight.shape[0])
    bias[unified.eos_token_id] = 1e4
    bias[: vocab.first_id] += 50.0
    bias[vocab.end_of_image] = 80.0
    bias[vocab.code_offset(1):vocab.end_id] += 30.0  # pixel codes everywhere
    hook = unified.language_model.get_output_embeddings().register_forward_hook(lambda m, i, o: o + bias)
    try:
        g = torch.Generator().manual_seed(0)
        out = _gen(unified, "x", size, generator=g, temperature=3.0, top_k=0, top_p=1.0, decode=True)
    finally:
        hook.remove()
    grids = image_grids(*size)
    parsed = parse_image_block(vocab, out.sequences[0], grids)
    assert parsed.grids == grids
    assert out.images.shape == (1, 3, *size)


def test_greedy_512_block_counts(unified):
    out = _gen(unified, "a cat", (512, 512), do_sample=False, guidance_scale=1.0, decode=True)
    assert out.semantic_indices.shape == (1, 18, 18) and out.pixel_indices.shape == (1, 32, 32)
    assert out.sequences.shape[1] == 1404 + 1
    assert out.images.shape == (1, 3, 512, 512)


def test_combine_guidance_formula_and_scale_one():
    c, u = torch.randn(3, 50), torch.randn(3, 50)
    lc, lu = torch.log_softmax(c, -1), torch.log_softmax(u, -1)
    torch.testing.assert_close(combine_guidance(c, u, 1.0), lc)
    torch.testing.assert_close(combine_guidance(c, u, 2.5), 2.5 * lc - 1.5 * lu)


def test_guidance_scale_one_equals_unguided_sampling(unified):
    size = (128, 128)
    kw = dict(temperature=1.0, top_k=0, top_p=1.0)
    a = _gen(unified, "a red car", size, guidance_scale=1.0, generator=torch.Generator().manual_seed(3), **kw)
    # the same sampling loop with no unconditional prompt at all
    cond, _ = text_to_image_prompts("a red car", resolution_tag(*size))
    embeds, mask = left_pad([unified.embed_prompt(cond)])
    grids = image_grids(*size)
    constraint = ImageBlockConstraint(unified.vocabulary, grids, 1, unified.eos_token_id)
    settings = GenerationSettings(semantic=SamplingParams(1.0, 0, 1.0), pixel=SamplingParams(1.0, 0, 1.0))
    b = generate_tokens(unified.language_model, embeds, mask, constraint, settings, grids.block_length + 1,
                        unified.pad_token_id, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.sequences, b.sequences)
    # the unconditional branch computed and combined with scale ~1 gives the same greedy tokens
    greedy = _gen(unified, "a red car", size, guidance_scale=1.0, do_sample=False)
    almost = _gen(unified, "a red car", size, guidance_scale=1.0 + 1e-6, do_sample=False)
    assert torch.equal(greedy.sequences, almost.sequences)
    strong = _gen(unified, "a red car", size, guidance_scale=4.0, do_sample=False)
    assert not torch.equal(greedy.sequences, strong.sequences)


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_cached_equals_uncached_greedy(unified, guidance):
    kw = dict(do_sample=False, guidance_scale=guidance)
    cached = _gen(unified, "a small house", (256, 256), use_cache=True, **kw)
    uncached = _gen(unified, "a small house", (256, 256), use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)


def test_guided_greedy_matches_naive_reimplementation(unified):
    """Reference loop: full recomputation of both branches, guidance from the formula, masks from token strings."""
    tok, lm = unified.tokenizer, unified.language_model
    size, scale = (128, 192), 3.0
    grids = image_grids(*size)
    cond_text, uncond_text = text_to_image_prompts("a boat", resolution_tag(*size))
    ids_of = tok.convert_tokens_to_ids
    level = {0: (ids_of("<|image_level0_0|>"), ids_of("<|image_level0_255|>") + 1),
             1: (ids_of("<|image_level1_0|>"), ids_of("<|image_level1_511|>") + 1)}
    plan = [ids_of("<start_of_image>")]
    for lv, (rows, cols) in ((0, grids.semantic), (1, grids.pixel)):
        plan.append(ids_of(f"<start_of_level{lv}>"))
        for _ in range(rows):
            plan += [("level", lv)] * cols + [ids_of("<end_of_line>")]
        plan.append(ids_of(f"<end_of_level{lv}>"))
    plan += [ids_of("<end_of_image>"), ids_of("<|im_end|>")]
    seq_c = tok(cond_text, add_special_tokens=False, return_tensors="pt").input_ids
    seq_u = tok(uncond_text, add_special_tokens=False, return_tensors="pt").input_ids
    expected = []
    with torch.no_grad():
        for step, kind in enumerate(plan):
            lc = torch.log_softmax(lm(input_ids=seq_c).logits[0, -1].float(), -1)
            lu = torch.log_softmax(lm(input_ids=seq_u).logits[0, -1].float(), -1)
            inside = 0 < step < len(plan) - 1  # after <start_of_image> up to <end_of_image>
            scores = scale * (lc - lu) + lu if inside else lc
            if isinstance(kind, tuple):
                lo, hi = level[kind[1]]
                token = lo + int(scores[lo:hi].argmax())
            else:
                token = kind
            expected.append(token)
            seq_c = torch.cat([seq_c, torch.tensor([[token]])], 1)
            seq_u = torch.cat([seq_u, torch.tensor([[token]])], 1)
    out = _gen(unified, "a boat", size, guidance_scale=scale, do_sample=False)
    assert out.sequences[0].tolist() == expected


def test_left_padded_batch_equals_single_prompts(unified):
    prompts = ["a cat", "a very long prompt about a small red boat on a lake at night"]
    kw = dict(do_sample=False, guidance_scale=2.0)
    batch = _gen(unified, prompts, (128, 192), **kw)
    for i, p in enumerate(prompts):
        single = _gen(unified, p, (128, 192), **kw)
        assert torch.equal(batch.sequences[i], single.sequences[0])


def _naive_warp(scores, temperature, top_k, top_p):
    s = scores / temperature
    order = sorted(range(len(s)), key=lambda i: -float(s[i]))
    keep = set(order[:top_k]) if top_k else set(order)
    cum, nucleus = 0.0, set()
    for i in sorted(keep, key=lambda i: -float(s[i])):
        if cum >= top_p:
            break
        nucleus.add(i)
        cum += float(torch.softmax(torch.tensor([float(s[j]) if j in keep else -1e30 for j in range(len(s))]), 0)[i])
    return nucleus


@pytest.mark.parametrize("params", [(1.0, 5, 1.0), (0.7, 0, 0.8), (2.0, 10, 0.5), (1.0, 0, 1.0)])
def test_warp_keeps_the_same_set_as_a_naive_implementation(params):
    torch.manual_seed(0)
    scores = torch.randn(40)
    warped = warp(scores, SamplingParams(*params))
    kept = {i for i in range(40) if torch.isfinite(warped[i])}
    assert kept == _naive_warp(scores, *params)


def test_task_defaults_are_the_reference_values():
    t2i, edit = TASK_DEFAULTS["text_to_image"], TASK_DEFAULTS["editing"]
    assert (t2i.guidance_scale, t2i.semantic, t2i.pixel) == (2.0, SamplingParams(1.0, 2048, 1.0),
                                                              SamplingParams(1.0, 6144, 1.0))
    assert (edit.guidance_scale, edit.semantic, edit.pixel) == (1.25, SamplingParams(0.7, 512, 0.8),
                                                                SamplingParams(0.7, 1536, 0.8))
    custom = t2i.replace(top_k=100, guidance_scale=3.0, temperature=None)
    assert custom.semantic.top_k == 100 and custom.pixel.top_k == 300 and custom.guidance_scale == 3.0
    assert custom.semantic.temperature == 1.0


def test_hugging_face_generate_with_the_logits_processor_matches_our_loop(unified):
    """Independent decoding loop (transformers' generate, its own cache) + our processor == our greedy loop."""
    from dualvitok.unified import ImageBlockLogitsProcessor

    size = (128, 192)
    grids = image_grids(*size)
    cond, _ = text_to_image_prompts("a lighthouse", resolution_tag(*size))
    ids = unified.tokenizer(cond, add_special_tokens=False, return_tensors="pt").input_ids
    constraint = ImageBlockConstraint(unified.vocabulary, grids, 1, unified.eos_token_id)
    hf = unified.language_model.generate(
        ids, attention_mask=torch.ones_like(ids), logits_processor=[ImageBlockLogitsProcessor(constraint)],
        do_sample=False, max_new_tokens=grids.block_length + 1, eos_token_id=unified.eos_token_id,
        pad_token_id=unified.pad_token_id)[0, ids.shape[1]:]
    ours = _gen(unified, "a lighthouse", size, do_sample=False, guidance_scale=1.0).sequences[0]
    assert hf.tolist() == ours.tolist()
