#!/usr/bin/env python
"""Export a trained In-Place TTT run to a folder anyone can load with trust_remote_code, optionally pushed to the Hub.

    python scripts/export.py --checkpoint RUN_OR_CHECKPOINT --out DIR [--best] [--dtype bfloat16|float16|float32]
        [--max-shard-size 5GB] [--push-to-hub ORG/NAME] [--private] [--revision BRANCH]
        [--commit-message MESSAGE] [--overwrite]
    python scripts/export.py --refresh-code DIR [--push-to-hub ORG/NAME] [--revision BRANCH] [--commit-message M]

--refresh-code rewrites an existing export's modeling files, config metadata and model-card note to this
version's code (weights untouched, atomically) and, with --push-to-hub, uploads the changed files.
--checkpoint is a training output_dir (its latest checkpoint is exported; with --best the one with the lowest
eval loss) or one checkpoint-N folder. The Hub
token comes from HF_TOKEN or `hf auth login`. Bad input prints one line and exits 2; a failed push prints one
line and exits 1, with the export kept on disk.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ttt_adapt._util import DTYPES, ArgumentParser, RecipeError  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="export.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="training output_dir or checkpoint-N folder")
    parser.add_argument("--out", help="the export folder")
    parser.add_argument("--best", action="store_true", help="export the run's checkpoint with the lowest eval loss")
    parser.add_argument("--refresh-code", metavar="DIR", help="update an existing export's modeling code in place")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument("--max-shard-size", default="5GB", help="shard the weights above this size (default 5GB)")
    parser.add_argument("--push-to-hub", metavar="ORG/NAME", help="upload the folder to this Hub model repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private")
    parser.add_argument("--revision", metavar="BRANCH", help="Hub branch to push to (created if needed)")
    parser.add_argument("--commit-message", help="Hub commit message")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    if args.refresh_code is not None:
        given = [f"--{k.replace('_', '-')}" for k in ("checkpoint", "out", "best", "dtype", "max_shard_size",
                                                      "overwrite")
                 if getattr(args, k) != parser.get_default(k)]
        if given:
            parser.error(f"--refresh-code rewrites an export in place: {', '.join(given)} cannot be combined with it")
    elif args.checkpoint is None or args.out is None:
        parser.error("the following arguments are required: --checkpoint and --out (or --refresh-code DIR)")
    return args


def main(argv: list[str]) -> int:
    from ttt_adapt.export import PushError

    try:
        args = parse_args(argv)
        from ttt_adapt.export.folder import export_model, refresh_code

        if args.refresh_code is not None:
            out = refresh_code(args.refresh_code, push_to_hub=args.push_to_hub, private=args.private,
                               revision=args.revision, commit_message=args.commit_message)
        else:
            out = export_model(
                args.checkpoint, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                push_to_hub=args.push_to_hub, private=args.private, revision=args.revision,
                commit_message=args.commit_message, overwrite=args.overwrite, best=args.best,
            )
    except PushError as e:
        print(f"export.py: error: {e}", file=sys.stderr)
        return 1
    except RecipeError as e:  # ExportError and UsageError are RecipeErrors
        print(f"export.py: error: {e}", file=sys.stderr)
        return 2
    print(f"refreshed the modeling code of {out}" if args.refresh_code is not None else f"exported to {out}")
    if args.push_to_hub:
        print(f"pushed to https://huggingface.co/{args.push_to_hub}" + (f"/tree/{args.revision}" if args.revision else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
