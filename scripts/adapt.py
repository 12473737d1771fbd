#!/usr/bin/env python
"""Convert a checkpoint (Qwen3, Qwen2, Llama, Mistral, Gemma 3 text) to In-Place TTT, tune it on long sequences, export it.

    python scripts/adapt.py RECIPE.yaml [dotted.key=value ...]
    accelerate launch scripts/adapt.py RECIPE.yaml [dotted.key=value ...]

Overrides take YAML values: `ttt.layers=[0,2] train.max_steps=3 train.lora.r=8`. Relative paths in the recipe
are relative to the current directory. Rerunning the same command resumes from the last checkpoint. A bad
recipe, override or run folder prints one line and exits 2.

Several processes on a CPU-only machine (gloo): `accelerate launch --multi_gpu --num_processes 2 scripts/adapt.py ...`
One sequence split over N processes (context parallelism, exact): add `parallel.cp_size=N`.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

USAGE = "usage: adapt.py RECIPE.yaml [dotted.key=value ...]"


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() if argv else USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    from ttt_adapt.config import RecipeError, load_recipe

    try:
        recipe = load_recipe(argv[0], argv[1:])
        from ttt_adapt.train import train

        train(recipe)
    except RecipeError as e:
        if os.environ.get("RANK", "0") == "0":  # under `accelerate launch`, one line in all, not one per process
            print(f"adapt.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("adapt.py: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
