#!/usr/bin/env python
"""Convert a checkpoint (Qwen3, Qwen2, Llama, Mistral, Gemma 3 text) to In-Place TTT, tune it on long sequences, export it.

    python scripts/adapt.py RECIPE.yaml [dotted.key=value ...]
    accelerate launch scripts/adapt.py RECIPE.yaml [dotted.key=value ...]
    python scripts/adapt.py RECIPE.yaml --plan [--device-memory 80GB] [--processes N] [--fsdp] [--device cpu]

`--plan` reads the model config only (no weights, no data) and prints what one device holds during a training
step (parameters, gradients, optimizer states, activations, fast-weight states, loss buffers) and, with
`--device-memory`, whether it fits; `--processes`/`--fsdp` describe the launch (FSDP shards over all processes).

Overrides take YAML values: `ttt.layers=[0,2] train.max_steps=3 train.lora.r=8`. Relative paths in the recipe
are relative to the current directory. Rerunning the same command resumes from the last checkpoint.

Exit status: 0 done; 2 a bad recipe, override or run folder (one line, before any work); 3 training diverged
(a non-finite loss or gradient norm, or a loss spike: `train.on_spike`; one line naming the step and the last
good checkpoint); 75 stopped by
a signal in `train.preempt_signals` (default SIGTERM, SIGINT) after checkpointing the step in flight, or at
once during set-up, the final evaluation or the export: rerun the same command to resume (or to finish the
evaluation and export without retraining); 130 interrupted (Ctrl-C) before training started.

Several processes on a CPU-only machine (gloo): `accelerate launch --multi_gpu --num_processes 2 scripts/adapt.py ...`
One sequence split over N processes (context parallelism, exact): add `parallel.cp_size=N`.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ttt_adapt._util import ArgumentParser, RecipeError, parse_size  # noqa: E402

USAGE = "adapt.py RECIPE.yaml [dotted.key=value ...] [--plan [--device-memory SIZE] [--processes N] [--fsdp] " \
        "[--device cuda|cpu]]"
PLAN_DEFAULTS = {"device_memory": None, "processes": 1, "fsdp": False, "device": "cuda"}


def size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="adapt.py", usage=USAGE, description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", metavar="RECIPE.yaml")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value")
    parser.add_argument("--plan", action="store_true", help="print the memory plan of one device; train nothing")
    parser.add_argument("--device-memory", type=size, metavar="SIZE", help="the device's memory, e.g. 80GB")
    parser.add_argument("--processes", type=int, default=1, metavar="N", help="processes of the planned launch")
    parser.add_argument("--fsdp", action="store_true", help="the planned launch shards with FSDP")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_intermixed_args(argv)  # overrides and --plan options in any order
    if args.recipe is None:
        parser.error("the following arguments are required: RECIPE.yaml")
    given = [k for k, v in PLAN_DEFAULTS.items() if getattr(args, k) != v]
    if given and not args.plan:
        parser.error("--device-memory, --processes, --fsdp and --device go with --plan")
    if args.processes < 1:
        parser.error(f"--processes must be >= 1, got {args.processes}")
    return args


def main(argv: list[str]) -> int:
    from ttt_adapt.training.stopping import Interrupted, Preempted, TrainingStopped

    main_process = os.environ.get("RANK", "0") == "0"  # under `accelerate launch`: one line, not one per process
    try:
        args = parse_args(argv)
        from ttt_adapt.recipe import load_recipe

        recipe = load_recipe(args.recipe, args.overrides)
        if args.plan:
            print(_plan(recipe, args.device_memory, args.processes, args.fsdp, args.device))
            return 0
        from ttt_adapt.pipeline import adapt

        adapt(recipe)
    except RecipeError as e:
        if main_process:
            print(f"adapt.py: error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        if main_process:
            print(f"adapt.py: {'' if isinstance(e, Preempted) else 'error: '}{e}", file=sys.stderr)
        return e.exit_code
    except Interrupted as e:
        if main_process:
            print(f"adapt.py: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("adapt.py: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0


def _plan(recipe, device_memory, processes, fsdp, device) -> str:
    from ttt_adapt.training.memory_plan import plan_memory
    from ttt_adapt.training.preflight import base_config, check_files

    check_files(recipe, outputs=False)  # the inputs as for training; a plan writes nothing
    config = base_config(recipe)
    if processes % recipe.parallel.cp_size:
        raise RecipeError(f"--processes {processes} is not a multiple of parallel.cp_size {recipe.parallel.cp_size}")
    return plan_memory(recipe, config, processes=processes, fsdp=fsdp, device=device).format(device_memory)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
