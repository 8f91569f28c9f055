"""Vocabulary extension: token strings and order, reference ids, resizing, gradient masking."""

from __future__ import annotations

import pytest
import torch

from dualvitok.unified import (
    VisionVocabulary,
    extend_tokenizer,
    resize_embeddings,
    train_only_vision_rows,
    vision_token_strings,
)
from dualvitok.unified.tiny import tiny_language_model, tiny_tokenizer


def test_released_token_strings_order_and_count():
    strings = vision_token_strings(32768, 98304)
    assert len(strings) == 131111  # 3 + 4 + 16 + 16 + 32768 + 98304 (reference section 1.1)
    assert strings[:7] == ["<start_of_image>", "<end_of_image>", "<end_of_line>", "<start_of_level0>",
                           "<end_of_level0>", "<start_of_level1>", "<end_of_level1>"]
    assert strings[7:23] == [f"<height_{64 * i}>" for i in range(1, 17)]
    assert strings[23:39] == [f"<width_{64 * i}>" for i in range(1, 17)]
    assert strings[39] == "<|image_level0_0|>" and strings[39 + 32767] == "<|image_level0_32767|>"
    assert strings[39 + 32768] == "<|image_level1_0|>" and strings[-1] == "<|image_level1_98303|>"


def test_qwen25_ids_match_the_reference_hard_coded_values():
    vocab = VisionVocabulary(151665, 32768, 98304)  # len(Qwen2.5 tokenizer) = 151665
    assert vocab.marker_ids == [151665, 151666, 151667, 151668, 151669, 151670, 151671]
    assert (vocab.start_of_image, vocab.end_of_image, vocab.end_of_line) == (151665, 151666, 151667)
    assert (vocab.start_of_level(0), vocab.end_of_level(0), vocab.start_of_level(1), vocab.end_of_level(1)) == \
        (151668, 151669, 151670, 151671)
    for h in (64, 256, 512, 1024):
        assert vocab.height_id(h) == 151671 + h // 64
        assert vocab.width_id(h) == 151687 + h // 64
    assert vocab.code_range(0) == (151704, 184472)
    assert vocab.code_range(1) == (184472, 282776)
    assert vocab.end_id == 282776 and vocab.num_tokens == 131111
    with pytest.raises(ValueError, match="multiple of 64"):
        vocab.height_id(200)


def test_extend_tokenizer_plain_tokens_contiguous_ids():
    tok = tiny_tokenizer()
    n_text = len(tok)
    vocab = extend_tokenizer(tok, 256, 512)
    strings = vision_token_strings(256, 512)
    assert vocab.first_id == n_text and len(tok) == n_text + len(strings) == vocab.end_id
    assert tok.convert_tokens_to_ids(strings) == list(range(n_text, n_text + len(strings)))
    # arithmetic mapping == the tokenizer's own lookup
    codes = torch.tensor([0, 17, 255])
    assert vocab.codes_to_ids(codes, 0).tolist() == tok.convert_tokens_to_ids([f"<|image_level0_{k}|>" for k in codes])
    level, code = vocab.ids_to_codes(torch.tensor([vocab.code_offset(1) + 5, vocab.code_offset(0) + 3, 7]))
    assert level.tolist() == [1, 0, -1] and code.tolist() == [5, 3, -1]
    # plain (non-special) tokens: kept by decode(skip_special_tokens=True), tags tokenise to single ids
    ids = tok("<height_256><width_512><|image_level1_3|>", add_special_tokens=False).input_ids
    assert ids == [vocab.height_id(256), vocab.width_id(512), vocab.code_offset(1) + 3]
    assert "<|image_level1_3|>" in tok.decode(ids, skip_special_tokens=True)
    assert tok.convert_tokens_to_ids("<start_of_image>") not in tok.all_special_ids
    # idempotent; reading back from the tokenizer agrees
    assert extend_tokenizer(tok, 256, 512) == vocab == VisionVocabulary.from_tokenizer(tok, 256, 512)
    with pytest.raises(ValueError, match="not contiguous"):
        VisionVocabulary.from_tokenizer(tok, 256, 1024)


@pytest.mark.parametrize("tied", [False, True])
def test_resize_embeddings_reference_rule_and_init(tied):
    tok = tiny_tokenizer()
    lm = tiny_language_model(len(tok) + 16, hidden_size=32, num_layers=1, tie_word_embeddings=tied)
    old_rows = lm.get_input_embeddings().weight.shape[0]
    old_embed = lm.get_input_embeddings().weight.detach().clone()
    vocab = extend_tokenizer(tok, 512, 1024)
    torch.manual_seed(1)
    rows = resize_embeddings(lm, vocab)
    emb, head = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    assert rows == old_rows + vocab.num_tokens == emb.shape[0] == head.shape[0]  # embedding rows + added, not len(tok)
    assert torch.equal(emb[:old_rows], old_embed)
    new = emb[old_rows:].detach()
    std = lm.config.initializer_range
    assert abs(new.mean().item()) < 0.1 * std and abs(new.std().item() / std - 1) < 0.05
    assert (head.data_ptr() == emb.data_ptr()) == tied
    if not tied:
        assert abs(head[old_rows:].std().item() / std - 1) < 0.05


def test_train_only_vision_rows_masks_text_gradients():
    tok = tiny_tokenizer()
    lm = tiny_language_model(len(tok), hidden_size=32, num_layers=1)
    vocab = extend_tokenizer(tok, 64, 64)
    resize_embeddings(lm, vocab)
    lm.requires_grad_(False)
    mask = train_only_vision_rows(lm, vocab.first_id)
    ids = torch.cat([torch.arange(0, 20), torch.arange(vocab.first_id, vocab.first_id + 20)])[None]
    lm(input_ids=ids, labels=ids).loss.backward()
    for weight in (lm.get_input_embeddings().weight, lm.get_output_embeddings().weight):
        assert weight.grad[: vocab.first_id].abs().sum() == 0
        assert weight.grad[vocab.first_id: vocab.first_id + 19].abs().sum(-1).gt(0).all()  # last input: no loss
    mask.remove()
    lm.zero_grad()
    lm(input_ids=ids, labels=ids).loss.backward()
    assert lm.get_input_embeddings().weight.grad[:20].abs().sum() > 0
