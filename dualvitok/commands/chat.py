"""``dualvitok chat``: ask the unified MLLM about images (one question, or an interactive session)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    from .generate import add_model_arguments

    p = subparsers.add_parser("chat", help="ask a unified MLLM about images",
                              description="Image understanding with a UnifiedMLLM (needs: pip install "
                                          "'dualvitok[unified]'). Without a question: interactive, empty line quits.")
    p.add_argument("question", nargs="?", default=None, help="the question (omit for an interactive session)")
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    add_model_arguments(p)
    p.add_argument("--max-new-tokens", type=int, default=512, help="answer length limit (default: 512)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None, help="text temperature when sampling")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..unified.cli_support import generator_for, load_unified

    model = load_unified(args)
    generator = generator_for(args)
    history: list[tuple[str, str]] = []
    question = args.question
    while True:
        if question is None:
            try:
                question = input("> ").strip()
            except EOFError:
                return 0
            if not question:
                return 0
        reply = model.answer(question, args.image, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                             temperature=args.temperature, generator=generator, history=history)
        print(reply)
        if args.question is not None:
            return 0
        history += [("user", model.user_message(question, len(args.image), history)), ("assistant", reply)]
        question = None
