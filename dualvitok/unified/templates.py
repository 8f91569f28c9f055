"""Prompt templates of the unified MLLM (ChatML, text-to-image, editing and their unconditional prompts).

Follows ILLUME+ (``illume/conversation.py`` ``conv_qwen2``, ``generation_eval/models/illume.py``, ``app.py`` and
the inference notebook in ``illume-unified-mllm/ILLUME_plus``); the strings are the reference's. The text-to-image
template is the demo / notebook / training-example one ("the content of image is"); the batch-eval variant ("the
content of the image is") is available as :data:`TEXT_TO_IMAGE_EVAL`. The editing template is the inference one
(no trailing '.' after the instruction).
"""

from __future__ import annotations

from collections.abc import Sequence

SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<image>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

TEXT_TO_IMAGE = "Generate an image of {resolution_tag}, the content of image is {content}\n"
TEXT_TO_IMAGE_EVAL = "Generate an image of {resolution_tag}, the content of the image is {content}\n"
TEXT_TO_IMAGE_UNCONDITIONAL = "Generate a random image of {resolution_tag}\n"
EDITING = "{resolution_tag}<image>\nPlease edit the image according to the instruction: {content}\n"
EDITING_UNCONDITIONAL = "{resolution_tag}<image>\nReconstruct the image according to the given image\n"


def chat_prompt(user: str | Sequence[tuple[str, str]], system: str = SYSTEM_PROMPT) -> str:
    """ChatML prompt ending with the assistant header.

    Args:
        user: the user message, or a list of ``(role, message)`` turns (roles ``user`` / ``assistant``).
        system: the system message ("You are a helpful assistant.", the reference's, not Qwen2.5's default).

    Returns:
        ``<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n``
    """
    turns = [("user", user)] if isinstance(user, str) else list(user)
    text = f"{IM_START}system\n{system}{IM_END}\n"
    for role, message in turns:
        if role not in ("user", "assistant"):
            raise ValueError(f"unknown role {role!r}; use 'user' or 'assistant'")
        text += f"{IM_START}{role}\n{message}{IM_END}\n"
    return text + f"{IM_START}assistant\n"


def understanding_message(question: str, num_images: int = 1) -> str:
    """User message for a question about images: ``<image>\\n{question}`` (placeholders prepended if absent)."""
    missing = num_images - question.count(IMAGE_PLACEHOLDER)
    if missing < 0:
        raise ValueError(f"the question has {question.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} placeholders "
                         f"but {num_images} images were given")
    return (IMAGE_PLACEHOLDER + "\n") * missing + question


def text_to_image_prompts(content: str, tag: str, template: str = TEXT_TO_IMAGE) -> tuple[str, str]:
    """(conditional, unconditional) full prompts; both end with ``<|im_start|>assistant\\n<height_H><width_W>``."""
    cond = chat_prompt(template.format(resolution_tag=tag, content=content)) + tag
    uncond = chat_prompt(TEXT_TO_IMAGE_UNCONDITIONAL.format(resolution_tag=tag)) + tag
    return cond, uncond


def editing_prompts(instruction: str, tag: str) -> tuple[str, str]:
    """(conditional, unconditional) editing prompts; each has one ``<image>`` and ends with the resolution tag."""
    cond = chat_prompt(EDITING.format(resolution_tag=tag, content=instruction)) + tag
    uncond = chat_prompt(EDITING_UNCONDITIONAL.format(resolution_tag=tag)) + tag
    return cond, uncond
