"""`flexbert-data`: train a tokenizer, or convert a corpus to MDS shards.

flexbert-data tokenizer OUT_DIR [--corpus stdlib|PATH] [--vocab-size 50368] [--max-bytes N]
flexbert-data prepare OUT_DIR --tokenizer TOK_DIR [--corpus stdlib|PATH] [--max-length 8192]
flexbert-data inspect MDS_DIR [--split train] [--tokenizer TOK_DIR] [--samples 3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flexbert.data.corpus import TEXT_MODES, CorpusSpec
from flexbert.data.errors import DataError


def _add_corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--corpus", default="stdlib", help="'stdlib' (embedded) or a file/directory path"
    )
    p.add_argument("--text-field", default="text", help="JSONL/Parquet/datasets text column")
    p.add_argument("--text-mode", default="paragraph", choices=TEXT_MODES, help="plain-text split")
    p.add_argument("--hf-split", default=None, help="split of a saved DatasetDict")
    p.add_argument("--max-documents", type=int, default=None, help="cap on documents read")
    p.add_argument("--max-bytes", type=int, default=None, help="cap on text bytes read")


def _corpus(args: argparse.Namespace) -> CorpusSpec:
    return CorpusSpec(
        source=args.corpus,
        text_field=args.text_field,
        text_mode=args.text_mode,
        hf_split=args.hf_split,
        max_documents=args.max_documents,
        max_bytes=args.max_bytes,
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (separate so tests and docs can inspect it)."""
    parser = argparse.ArgumentParser(prog="flexbert-data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    defaults = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}
    tok = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer", **defaults)
    tok.add_argument("out_dir", help="directory to write tokenizer.json and configs into")
    _add_corpus_args(tok)
    tok.add_argument("--vocab-size", type=int, default=50368, help="target size (multiple of 64)")
    tok.add_argument("--num-unused", type=int, default=83, help="reserved [unusedN] tokens (min)")
    tok.add_argument("--min-frequency", type=int, default=2)
    tok.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")

    prep = sub.add_parser(
        "prepare", help="tokenize a corpus into MDS shards (train/ and val/)", **defaults
    )
    prep.add_argument("out_dir", help="output directory (gets train/, val/, manifest.json)")
    prep.add_argument("--tokenizer", required=True, help="local Hugging Face tokenizer directory")
    _add_corpus_args(prep)
    prep.add_argument(
        "--max-length", type=int, default=8192, help="tokens per sample, specials included"
    )
    prep.add_argument("--overflow", default="split", choices=("split", "truncate"))
    prep.add_argument("--val-fraction", type=float, default=0.01)
    prep.add_argument("--split-seed", type=int, default=0)
    prep.add_argument("--compression", default="zstd", help="MDS compression ('none' to disable)")
    prep.add_argument("--size-limit", default="64mb", help="max bytes per shard")
    prep.add_argument("--overwrite", action="store_true", help="replace a different conversion")
    prep.add_argument("--no-progress", action="store_true")

    look = sub.add_parser(
        "inspect", help="manifest, sample lengths and decoded samples of shards", **defaults
    )
    look.add_argument("mds_dir", help="a prepared directory (train/, val/, manifest.json)")
    look.add_argument("--split", default="train", choices=("train", "val"))
    look.add_argument("--tokenizer", default=None, help="decode samples with this tokenizer")
    look.add_argument("--samples", type=int, default=3, help="samples to show")
    look.add_argument("--scan", type=int, default=10_000, help="samples read for length stats")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `flexbert-data` console script."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "tokenizer":
            from flexbert.data.tokenizer import save_tokenizer, train_tokenizer

            out_dir = Path(args.out_dir)
            if out_dir.is_dir() and any(out_dir.iterdir()) and not args.overwrite:
                raise DataError(
                    f"{out_dir} is not empty (shards and runs made with a tokenizer there "
                    "would no longer match it): write to a new directory or pass --overwrite"
                )

            tokenizer = train_tokenizer(
                _corpus(args).texts(), args.vocab_size, args.num_unused, args.min_frequency
            )
            out = save_tokenizer(tokenizer, args.out_dir)
            print(f"tokenizer: {len(tokenizer)} tokens -> {out}")
            if len(tokenizer) < args.vocab_size:
                print(
                    f"note: fewer than --vocab-size {args.vocab_size}: the corpus holds no more "
                    "merges that often (--min-frequency); a model's vocabulary follows the "
                    "tokenizer it trains with"
                )
        elif args.command == "inspect":
            from flexbert.data.shard_info import inspect_shards
            from flexbert.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
            report = inspect_shards(args.mds_dir, args.split, tokenizer, args.samples, args.scan)
            print(json.dumps(report, indent=2, ensure_ascii=False))
        else:
            from flexbert.data.mds import prepare_mds
            from flexbert.data.tokenizer import load_tokenizer

            manifest = prepare_mds(
                _corpus(args),
                args.out_dir,
                load_tokenizer(args.tokenizer),
                max_length=args.max_length,
                val_fraction=args.val_fraction,
                split_seed=args.split_seed,
                overflow=args.overflow,
                compression=None if args.compression == "none" else args.compression,
                size_limit=args.size_limit,
                overwrite=args.overwrite,
                progress=not args.no_progress,
            )
            state = "already up to date" if manifest["reused"] else "written"
            print(f"{args.out_dir}: {state}")
            print(json.dumps(manifest["counts"], indent=2))
    except DataError as e:
        print(f"flexbert-data: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
