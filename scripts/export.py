#!/usr/bin/env python
"""Export a trained In-Place TTT run to a folder anyone can load with trust_remote_code, optionally pushed to the Hub.

    python scripts/export.py --checkpoint RUN_OR_CHECKPOINT --out DIR [--dtype bfloat16|float16|float32]
        [--max-shard-size 5GB] [--push-to-hub ORG/NAME] [--private] [--revision BRANCH]
        [--commit-message MESSAGE] [--overwrite]

--checkpoint is a training output_dir (its latest checkpoint is exported) or one checkpoint-N folder. The Hub
token comes from HF_TOKEN or `hf auth login`. Bad input prints one line and exits 2; a failed push prints one
line and exits 1, with the export kept on disk.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

DTYPES = ("bfloat16", "float16", "float32")


class UsageError(Exception):
    """A command-line mistake argparse found."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message and exits; we want one line and exit 2
        raise UsageError(message)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = OneLineParser(prog="export.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="training output_dir or checkpoint-N folder")
    parser.add_argument("--out", required=True, help="the export folder")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument("--max-shard-size", default="5GB", help="shard the weights above this size (default 5GB)")
    parser.add_argument("--push-to-hub", metavar="ORG/NAME", help="upload the folder to this Hub model repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private")
    parser.add_argument("--revision", metavar="BRANCH", help="Hub branch to push to (created if needed)")
    parser.add_argument("--commit-message", help="Hub commit message")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
    except UsageError as e:
        print(f"export.py: error: {e}", file=sys.stderr)
        return 2
    from ttt_adapt.export import ExportError, PushError, export_model

    try:
        out = export_model(
            args.checkpoint, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
            push_to_hub=args.push_to_hub, private=args.private, revision=args.revision,
            commit_message=args.commit_message, overwrite=args.overwrite,
        )
    except PushError as e:
        print(f"export.py: error: {e}", file=sys.stderr)
        return 1
    except ExportError as e:
        print(f"export.py: error: {e}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    if args.push_to_hub:
        print(f"pushed to https://huggingface.co/{args.push_to_hub}" + (f"/tree/{args.revision}" if args.revision else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
