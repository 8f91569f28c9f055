"""Image blocks: grid sizes and counts, layout against a string-built reference, parsing and its errors."""

from __future__ import annotations

import pytest
import torch

from dualvitok.unified import (
    ImageBlockError,
    ImageGrids,
    block_skeleton,
    build_image_block,
    extend_tokenizer,
    image_grids,
    parse_image_block,
    parse_image_blocks,
    resolution_tag,
)
from dualvitok.unified.tiny import tiny_tokenizer

# (H, W) -> (semantic grid, pixel grid, block tokens): the reference table (section 2.2)
REFERENCE_TABLE = {
    (256, 256): ((9, 9), (16, 16), 368), (512, 512): ((18, 18), (32, 32), 1404),
    (384, 512): ((12, 16), (24, 32), 1002), (512, 384): ((16, 12), (32, 24), 1014),
    (384, 768): ((13, 26), (24, 48), 1533), (768, 384): ((26, 13), (48, 24), 1570),
    (384, 576): ((12, 18), (24, 36), 1122), (576, 384): ((18, 12), (36, 24), 1140),
    (320, 960): ((11, 33), (20, 60), 1600), (960, 320): ((33, 11), (60, 20), 1662),
    (256, 1024): ((9, 36), (16, 64), 1379), (1024, 256): ((36, 9), (64, 16), 1454),
}


@pytest.fixture(scope="module")
def tok_vocab():
    tok = tiny_tokenizer()
    return tok, extend_tokenizer(tok, 256, 512)


@pytest.mark.parametrize("size", sorted(REFERENCE_TABLE))
def test_grids_and_block_length_match_reference_table(size):
    semantic, pixel, length = REFERENCE_TABLE[size]
    grids = image_grids(*size)
    assert grids.semantic == semantic and grids.pixel == pixel and grids.block_length == length


def test_counts_256_and_512(tok_vocab):
    _, vocab = tok_vocab
    for size, (n_sem, n_pix, n_eol) in {(256, 256): (81, 256, 25), (512, 512): (324, 1024, 50)}.items():
        grids = image_grids(*size)
        assert (grids.num_semantic, grids.num_pixel) == (n_sem, n_pix)
        sk = block_skeleton(vocab, grids)
        assert int((sk == -1).sum()) == n_sem and int((sk == -2).sum()) == n_pix
        assert int((sk == vocab.end_of_line).sum()) == n_eol
        assert len(sk) == n_sem + n_pix + n_eol + 6


def _string_block(sem, pix) -> str:
    """Naive reference: the block written out as token strings (reference section 2.1)."""
    text = "<start_of_image><start_of_level0>"
    for row in sem.tolist():
        text += "".join(f"<|image_level0_{k}|>" for k in row) + "<end_of_line>"
    text += "<end_of_level0><start_of_level1>"
    for row in pix.tolist():
        text += "".join(f"<|image_level1_{k}|>" for k in row) + "<end_of_line>"
    return text + "<end_of_level1><end_of_image>"


@pytest.mark.parametrize("size", [(256, 256), (384, 512), (96, 160)])
def test_build_matches_string_reference_and_round_trips(tok_vocab, size):
    tok, vocab = tok_vocab
    grids = image_grids(*size)
    sem = torch.randint(0, 256, (2, *grids.semantic))
    pix = torch.randint(0, 512, (2, *grids.pixel))
    blocks = build_image_block(vocab, sem, pix)
    assert blocks.shape == (2, grids.block_length)
    for b in range(2):
        expected = tok(_string_block(sem[b], pix[b]), add_special_tokens=False).input_ids
        assert blocks[b].tolist() == expected
        parsed = parse_image_block(vocab, blocks[b], grids)
        assert torch.equal(parsed.semantic_indices, sem[b]) and torch.equal(parsed.pixel_indices, pix[b])
        inferred = parse_image_block(vocab, blocks[b])  # grid sizes from the <end_of_line> tokens
        assert inferred.grids == grids


def test_parse_finds_blocks_in_interleaved_text(tok_vocab):
    tok, vocab = tok_vocab
    grids = ImageGrids((2, 3), (4, 5))
    a = build_image_block(vocab, torch.randint(0, 256, (2, 3)), torch.randint(0, 512, (4, 5)))
    b = build_image_block(vocab, torch.randint(0, 256, (2, 3)), torch.randint(0, 512, (4, 5)))
    text = tok("some text " + resolution_tag(128, 192), add_special_tokens=False).input_ids
    ids = text + a.tolist() + text + b.tolist() + text
    blocks = parse_image_blocks(vocab, ids)
    assert len(blocks) == 2 and blocks[0].start == len(text) and blocks[1].end == len(ids) - len(text)
    assert all(p.grids == grids for p in blocks)


def _corrupt(vocab, grids, kind):
    sem = torch.randint(0, 256, grids.semantic)
    pix = torch.randint(0, 512, grids.pixel)
    ids = build_image_block(vocab, sem, pix).tolist()
    eol = vocab.end_of_line
    first_eol = ids.index(eol)
    if kind == "short_row":
        del ids[first_eol - 1]
    elif kind == "long_row":
        ids.insert(first_eol, vocab.code_offset(0))
    elif kind == "missing_end_of_level":
        ids.remove(vocab.end_of_level(0))
    elif kind == "missing_start_of_level":
        ids.remove(vocab.start_of_level(1))
    elif kind == "missing_end_of_image":
        ids = ids[:-1]
    elif kind == "foreign_token":
        ids[first_eol - 1] = vocab.code_offset(1)  # a pixel code inside the semantic grid
    elif kind == "truncated":
        ids = ids[: len(ids) // 2]
    elif kind == "no_image":
        ids = ids[1:]
    elif kind == "missing_eol":
        last = len(ids) - 3  # the final pixel row's <end_of_line>
        assert ids[last] == eol
        del ids[last]
    return ids


@pytest.mark.parametrize("kind, message", [
    ("short_row", "row 0 has 2 codes, expected 3"), ("long_row", "row 0 has 4 codes, expected 3"),
    ("missing_end_of_level", "unexpected id"), ("missing_start_of_level", "expected <start_of_level1>"),
    ("missing_end_of_image", "expected <end_of_image>"), ("foreign_token", "unexpected id"),
    ("truncated", "cut off"), ("no_image", "no <start_of_image>|no image block"),
    ("missing_eol", "no <end_of_line>"),
])
def test_malformed_blocks_raise_clear_errors(tok_vocab, kind, message):
    _, vocab = tok_vocab
    grids = ImageGrids((2, 3), (3, 4))
    with pytest.raises(ImageBlockError, match=message):
        parse_image_block(vocab, _corrupt(vocab, grids, kind), grids)


def test_wrong_grid_size_and_ragged_rows_raise(tok_vocab):
    _, vocab = tok_vocab
    ids = build_image_block(vocab, torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ImageBlockError, match="3 rows, expected 4"):
        parse_image_block(vocab, ids, ImageGrids((2, 3), (4, 4)))
    ragged = ids.tolist()
    second_eol = [i for i, t in enumerate(ragged) if t == vocab.end_of_line][1]
    del ragged[second_eol - 1]
    with pytest.raises(ImageBlockError, match="row 1 has 2 codes but row 0 has 3"):
        parse_image_block(vocab, ragged)
    with pytest.raises(ValueError, match="multiples of 16"):
        image_grids(250, 256)
