#!/usr/bin/env python
"""Read a corpus once into an In-Place TTT export's fast weights and save the state (a fast-weight memory).

    python scripts/memorize.py EXPORT --corpus PATH --out state.safetensors [--resume] [--overwrite]
        [--text-field text] [--piece-tokens N] [--attention document|piece] [--save-every N] [--dtype float32]

The corpus is a .jsonl file (one {"text": ...} a line), a .txt file (one document), a .parquet file (a text column)
or a folder of them (sorted), read document after document into one state. Progress (documents, tokens, tokens/s)
shows on stderr; the summary is one JSON line on stdout. Every --save-every documents the state so far and a progress
file are written next to --out; --resume goes on from them. Use the state with `model.load_state(PATH)` and
`model.generate(..., ttt_state=state)`, or `python scripts/evaluate.py --state PATH`. Bad input prints one line and
exits 2.
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ttt_adapt._util import DTYPES, ArgumentParser, RecipeError  # noqa: E402


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="memorize.py", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", help="the In-Place TTT export folder")
    p.add_argument("--corpus", required=True, help=".jsonl, .txt or .parquet file, or a folder of them")
    p.add_argument("--out", required=True, help="the state file to write (.safetensors)")
    p.add_argument("--resume", action="store_true", help="go on from the progress file an interrupted run left")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--text-field", default="text", help="the text field of .jsonl / .parquet documents")
    p.add_argument("--piece-tokens", type=int, help="tokens per forward (default 4 chunks)")
    p.add_argument("--attention", default="document", choices=("document", "piece"),
                   help="document: a document's pieces share one attention cache (exact); piece: drop it after "
                        "each piece (memory flat for full-attention models)")
    p.add_argument("--save-every", type=int, default=100, help="write the resumable progress every N documents")
    p.add_argument("--max-docs", type=int, help="read only the first N documents")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    return p


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        for flag in ("piece_tokens", "save_every", "max_docs"):
            value = getattr(args, flag)
            if value is not None and value < (0 if flag == "save_every" else 1):
                raise RecipeError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
        from transformers.utils import logging as hf_logging

        from ttt_adapt.memorize import memorize

        hf_logging.disable_progress_bar()
        summary = memorize(args.export, args.corpus, args.out, resume=args.resume, overwrite=args.overwrite,
                           text_field=args.text_field, piece_tokens=args.piece_tokens, attention=args.attention,
                           save_every=args.save_every, dtype=args.dtype, max_docs=args.max_docs)
    except RecipeError as e:  # MemorizeError, EvalError and UsageError are RecipeErrors
        print(f"memorize.py: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
