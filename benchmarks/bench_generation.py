"""Benchmark: image-token generation speed of the unified MLLM loop (tokens/s), with and without guidance.

Runs :func:`dualvitok.unified.generate_tokens` (constrained, KV-cached, optional classifier-free guidance with a
separate unconditional pass) on a randomly initialised Qwen2 built from a config (nothing is downloaded), with random
prompt embeddings, and prints a Markdown table. Random weights decode at the same speed as trained ones: the number
of tokens is fixed by the block layout.

    python benchmarks/bench_generation.py                       # tiny Qwen2, CPU
    python benchmarks/bench_generation.py --preset qwen2.5-3b --device cuda --dtype bfloat16 --sizes 512x512
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

PRESETS = {
    # hidden, layers, heads, kv heads, intermediate, text rows, semantic / pixel codebooks, tied
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, text_rows=400, codebooks=(256, 512), tie=False),
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, text_rows=151936, codebooks=(32768, 98304), tie=True),
    "qwen2.5-3b": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                       intermediate_size=11008, text_rows=151936, codebooks=(32768, 98304), tie=True),
}
TEXT_TOKEN_NUM = {400: 373, 151936: 151665}  # id of <start_of_image> (len(tokenizer) before extension)


def build(preset: str, device: str, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dualvitok.unified import VisionVocabulary

    p = dict(PRESETS[preset])
    sem, pix = p.pop("codebooks")
    text_rows, tie = p.pop("text_rows"), p.pop("tie")
    vocab = VisionVocabulary(TEXT_TOKEN_NUM[text_rows], sem, pix)
    config = Qwen2Config(vocab_size=text_rows + vocab.num_tokens, tie_word_embeddings=tie,
                         max_position_embeddings=8192, **p)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype).eval()
    return model, vocab


def run_once(model, vocab, size, batch, guidance, use_cache, prompt_len, device):
    from dualvitok.unified import TASK_DEFAULTS, ImageBlockConstraint, generate_tokens, image_grids

    grids = image_grids(*size)
    eos = vocab.first_id - 1  # any text id
    dim = model.config.hidden_size
    dtype = model.get_input_embeddings().weight.dtype
    embeds = torch.randn(batch, prompt_len, dim, device=device, dtype=dtype) * 0.02
    mask = torch.ones(batch, prompt_len, dtype=torch.long, device=device)
    u_embeds = torch.randn(batch, prompt_len // 2, dim, device=device, dtype=dtype) * 0.02
    u_mask = torch.ones(batch, prompt_len // 2, dtype=torch.long, device=device)
    settings = TASK_DEFAULTS["text_to_image"].replace(guidance_scale=guidance)
    constraint = ImageBlockConstraint(vocab, grids, batch, eos)
    generator = torch.Generator(device=device).manual_seed(0)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = generate_tokens(model, embeds, mask, constraint, settings, grids.block_length + 1, eos,
                          u_embeds if guidance != 1 else None, u_mask if guidance != 1 else None,
                          generator=generator, use_cache=use_cache)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out.sequences.shape[1] * batch, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--sizes", nargs="+", default=["256x256"], help="HEIGHTxWIDTH of the generated images")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--uncached", action="store_true", help="also time decoding without the KV cache")
    parser.add_argument("--prompt-len", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model, vocab = build(args.preset, args.device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"preset {args.preset} ({n_params / 1e6:.1f} M params, vocab {model.config.vocab_size}), {args.dtype}, "
          f"{device_name}, {args.threads} CPU thread(s), torch {torch.__version__}\n")
    print("| image size | block tokens | batch | guidance | KV cache | tokens/s | ms/step |")
    print("|---|---|---|---|---|---|---|")
    run_once(model, vocab, (64, 64), 1, 2.0, True, args.prompt_len, args.device)  # warm-up
    from dualvitok.unified import image_grids

    for size_text in args.sizes:
        size = tuple(int(v) for v in size_text.split("x"))
        for batch in args.batch_sizes:
            for guidance in args.guidance:
                for use_cache in ([True, False] if args.uncached else [True]):
                    best = None
                    for _ in range(args.repeats):
                        tokens, seconds = run_once(model, vocab, size, batch, guidance, use_cache, args.prompt_len,
                                                   args.device)
                        best = seconds if best is None else min(best, seconds)
                    steps = tokens // batch
                    print(f"| {size[0]}x{size[1]} | {image_grids(*size).block_length} | {batch} | {guidance:g} | "
                          f"{'yes' if use_cache else 'no'} | {tokens / best:,.0f} | {1000 * best / steps:.2f} |",
                          flush=True)


if __name__ == "__main__":
    main()
