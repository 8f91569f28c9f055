"""Tiny random unified models for tests, benchmarks and CPU demos (no download).

A byte-level BPE tokenizer trained in memory on a few sentences, with ChatML special tokens, wrapped in
``PreTrainedTokenizerFast``; a small ``Qwen2ForCausalLM`` from a ``Qwen2Config``; ``dualvitok_tiny``. Written for
this library; no reference counterpart (the reference needs downloaded weights).
"""

from __future__ import annotations

import torch

from ..registry import create_model
from .model import UnifiedMLLM

CHATML_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "You are a helpful assistant.",
    "Generate an image of a cat with a hat, the content of image is",
    "Generate a random image of",
    "Please edit the image according to the instruction: make the sky blue",
    "Reconstruct the image according to the given image",
    "Describe the image. What is in the picture?",
]


def tiny_tokenizer(vocab_size: int = 400):
    """A small byte-level BPE tokenizer with ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=CHATML_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   padding_side="left")


def tiny_language_model(vocab_size: int, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                        num_kv_heads: int = 2, intermediate_size: int = 128, tie_word_embeddings: bool = False,
                        seed: int = 0):
    """A random ``Qwen2ForCausalLM`` built from a config (float32, eval mode)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         max_position_embeddings=8192, tie_word_embeddings=tie_word_embeddings)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).eval()


def tiny_unified_model(hidden_size: int = 64, num_layers: int = 2, padding_rows: int = 16, seed: int = 0,
                       tie_word_embeddings: bool = False) -> UnifiedMLLM:
    """A random :class:`UnifiedMLLM`: tiny tokenizer, tiny Qwen2 (``padding_rows`` unused embedding rows, as Qwen's),
    ``dualvitok_tiny`` (codebooks 256 / 512), vocabulary extended as the reference."""
    tokenizer = tiny_tokenizer()
    language_model = tiny_language_model(len(tokenizer) + padding_rows, hidden_size, num_layers,
                                         tie_word_embeddings=tie_word_embeddings, seed=seed)
    torch.manual_seed(seed)
    vision_tokenizer = create_model("dualvitok_tiny").eval()
    torch.manual_seed(seed)
    return UnifiedMLLM.from_components(language_model, tokenizer, vision_tokenizer).eval()
