"""Input checks of the index paths: clear errors for bad and degenerate inputs, value checks that can be skipped."""

from __future__ import annotations

import pytest
import torch

from dualvitok.quantizers import SimVQ, VectorQuantizer
from dualvitok.validation import check_images, check_indices, set_value_checks, value_checks, value_checks_enabled


def _long(*shape):
    return torch.zeros(*shape, dtype=torch.long)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: m.encode(torch.zeros(0, 3, 64, 64)), "empty batch"),
        (lambda m: m.decode_indices(_long(0, 2, 2), _long(0, 4, 4)), "empty batch"),
        (lambda m: m.decode_indices(_long(1, 0, 2), _long(1, 0, 4)), "empty grid"),
        (lambda m: m.decode(torch.zeros(1, 8, 0, 2), torch.zeros(1, 8, 0, 4)), "empty grid"),
        (lambda m: m.semantic_quantizer(torch.zeros(0, 8, 2, 2)), "empty input"),
        (lambda m: m.pixel_quantizer(torch.zeros(1, 8, 0, 4)), "empty input"),
    ],
    ids=["encode-b0", "decode_indices-b0", "decode_indices-empty-grid", "decode-empty-grid", "quantizer-b0",
         "quantizer-empty-grid"],
)
def test_degenerate_shapes_get_clear_errors(tiny_model_on, device, call, match):
    with torch.no_grad(), pytest.raises(ValueError, match=match):
        call(_On(tiny_model_on, device))


class _On:
    """Calls the model with its tensor arguments moved to ``device``."""

    def __init__(self, model, device):
        self.model, self.device = model, device

    def __getattr__(self, name):
        attr = getattr(self.model, name)
        return lambda *args: attr(*(a.to(self.device) for a in args))


@pytest.mark.parametrize("size", [(64, 64), (256, 256), (512, 384), (320, 448)])
def test_decode_indices_refuses_a_semantic_grid_of_another_image_size(tiny_model, size):
    (hs, ws), (h, w) = tiny_model.grid_sizes(*size)
    pix = _long(1, h, w)
    with torch.no_grad():
        assert tiny_model.decode_indices(_long(1, hs, ws), pix).shape == (1, 3, 16 * h, 16 * w)
        for wrong in ((hs + 1, ws), (hs, ws - 1), (h, w)):
            if wrong == (hs, ws):
                continue
            with pytest.raises(ValueError, match=f"semantic grid.*{hs}x{ws}|{hs}x{ws} semantic grid"):
                tiny_model.decode_indices(_long(1, *wrong), pix)


def test_value_checks_can_be_switched_off_and_are_restored():
    assert value_checks_enabled()
    bad = torch.full((1, 3, 32, 32), 100.0)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        check_images(bad)
    with value_checks(False):
        assert not value_checks_enabled()
        check_images(bad)  # skipped: no host synchronisation
        check_indices(torch.tensor([10**6]), 16)
        with pytest.raises(ValueError, match="multiples of 16"):  # metadata checks always run
            check_images(torch.zeros(1, 3, 40, 32))
    assert value_checks_enabled()
    previous = set_value_checks(False)
    try:
        assert previous is True and not value_checks_enabled()
    finally:
        set_value_checks(previous)


@pytest.mark.parametrize(
    "values, match",
    [(float("nan"), "NaN"), (float("inf"), "infinite"), (-float("inf"), "infinite"), (1.6, r"\[-1, 1\]")],
)
def test_image_values_are_checked_in_one_pass(values, match):
    x = torch.zeros(2, 3, 32, 32)
    x[1, 2, 5, 7] = values
    with pytest.raises(ValueError, match=match):
        check_images(x)
    check_images(x.clamp(-1, 1).nan_to_num(0.0))


@pytest.mark.parametrize("quantizer", [SimVQ, VectorQuantizer])
def test_indices_range_errors_name_the_range(quantizer, device):
    q = quantizer(dim=4, codebook_size=16).to(device)
    with pytest.raises(ValueError, match=r"found values in \[-1, 3\].*16 codes"):
        q.indices_to_codes(torch.tensor([[-1, 3]], device=device))
    with pytest.raises(ValueError, match=r"\[0, 16\]"):
        q.indices_to_codes(torch.tensor([[0, 16]], dtype=torch.int32, device=device))
    assert q.indices_to_codes(torch.tensor([[0, 15]], dtype=torch.uint8, device=device)).shape == (1, 4, 2)
