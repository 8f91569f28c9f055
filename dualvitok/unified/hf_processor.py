"""The image-structure constraint as a Hugging Face ``LogitsProcessor`` (for ``model.generate``).

Follows the role of ILLUME+'s ``InterleavedLogitsProcessor`` (``generation_eval/models/inference_utils.py`` in
``illume-unified-mllm/ILLUME_plus``), which is passed to Hugging Face ``generate``. Difference: the state machine is
:class:`dualvitok.unified.ImageBlockConstraint` (per row, skeleton-driven); guidance is not included (use
:func:`dualvitok.unified.generate_tokens` or the task methods for classifier-free guidance).
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from .constraints import ImageBlockConstraint


class ImageBlockLogitsProcessor(LogitsProcessor):
    """Wraps an :class:`ImageBlockConstraint`; the first call fixes the prompt length, later calls advance the
    state with the newly generated ids. Use one instance per ``generate`` call.

    Shape: ``input_ids [B, T]``, ``scores [B, V]`` -> ``[B, V]``.
    """

    def __init__(self, constraint: ImageBlockConstraint):
        self.constraint = constraint
        self._seen: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        length = input_ids.shape[1]
        if self._seen is None:
            self._seen = length
        for position in range(self._seen, length):
            self.constraint.update(input_ids[:, position])
        self._seen = length
        return self.constraint(scores)
