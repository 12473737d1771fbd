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
    from ttt_adapt.training.stopping import Interrupted, Preempted, TrainingStopped

    main_process = os.environ.get("RANK", "0") == "0"  # under `accelerate launch`: one line, not one per process
    try:
        plan, argv = _plan_options(argv)
        recipe = load_recipe(argv[0], argv[1:])
        if plan is not None:
            print(_plan(recipe, **plan))
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


def _plan_options(argv):
    """Split `--plan` and its options off the arguments; (None, argv) without `--plan`."""
    from ttt_adapt.config import RecipeError

    rest, opts, i, plan = [], {"device_memory": None, "processes": 1, "fsdp": False, "device": "cuda"}, 0, False
    while i < len(argv):
        a = argv[i]
        if a in ("--plan", "--fsdp"):
            plan |= a == "--plan"
            opts["fsdp"] |= a == "--fsdp"
        elif a in ("--device-memory", "--processes", "--device"):
            if i + 1 == len(argv):
                raise RecipeError(f"{a} needs a value")
            opts[a[2:].replace("-", "_")] = argv[i + 1]
            i += 1
        else:
            rest.append(a)
        i += 1
    if not plan:
        if any(v != d for v, d in zip(opts.values(), (None, 1, False, "cuda"))):
            raise RecipeError("--device-memory, --processes, --fsdp and --device go with --plan")
        return None, argv
    from ttt_adapt._util import parse_size

    try:
        opts["processes"] = int(opts["processes"])
        opts["device_memory"] = None if opts["device_memory"] is None else parse_size(opts["device_memory"])
    except ValueError as e:
        raise RecipeError(f"--plan: {e}") from None
    if opts["processes"] < 1 or opts["device"] not in ("cuda", "cpu"):
        raise RecipeError("--plan: --processes must be >= 1 and --device cuda or cpu")
    return opts, rest


def _plan(recipe, device_memory, processes, fsdp, device) -> str:
    from ttt_adapt.config import RecipeError
    from ttt_adapt.memory_plan import plan_memory
    from ttt_adapt.preflight import base_config

    config = base_config(recipe)
    if processes % recipe.parallel.cp_size:
        raise RecipeError(f"--processes {processes} is not a multiple of parallel.cp_size {recipe.parallel.cp_size}")
    return plan_memory(recipe, config, processes=processes, fsdp=fsdp, device=device).format(device_memory)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
