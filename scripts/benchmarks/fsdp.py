"""`fsdp`: full fine-tuning of the mid-size Qwen3 as `scripts/adapt.py` runs it, on 1, 2 and 4 fresh processes, as
plain data parallelism (DDP) and sharded (FSDP2): peak resident sets and the losses against DDP's."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, SCRIPT, machine, make_lm, rss_kib


def fsdp_rank(args):
    """One process of the `fsdp` benchmark: the real run (`ttt_adapt.pipeline`'s set-up, then `train`), with the
    peak resident set (VmHWM) after set-up (the model loaded, sharded, the data packed) and after training."""
    from ttt_adapt.distributed.fsdp import local_parameter_bytes
    from ttt_adapt.recipe import load_recipe
    from ttt_adapt.training.loop import make_accelerator, set_up, train
    from ttt_adapt.training.preflight import preflight

    recipe = load_recipe(args.recipe, args.overrides)
    accelerator = make_accelerator(recipe)
    baseline = rss_kib("VmRSS")
    run = set_up(recipe, accelerator, preflight(recipe, accelerator))
    loading = rss_kib("VmHWM")
    t0 = time.perf_counter()
    train(run)
    seconds = (time.perf_counter() - t0) / recipe.train.max_steps
    print(json.dumps({"rank": accelerator.process_index, "params": sum(p.numel() for p in run.model.parameters()),
                      "local_param_mib": local_parameter_bytes(run.model) / 2**20, "imports_mib": baseline / 1024,
                      "loading_peak_mib": loading / 1024, "training_peak_mib": rss_kib("VmHWM") / 1024,
                      "seconds_per_step": seconds}))


def run_fsdp(mode, processes, folder, args):
    """Train the benchmark recipe on `processes` fresh processes (plain data parallelism or FSDP); per-process
    numbers and the logged losses."""
    out = folder / f"{mode}-{processes}"
    overrides = [f"model.name_or_path={folder / 'base'}", f"train.output_dir={out}", f"data.seq_len={args.length}",
                 f"ttt.chunk_size={args.chunk}", f"train.max_steps={args.steps}", f"parallel.fsdp={mode == 'fsdp'}",
                 f"data.cache_dir={folder / 'cache'}"]
    recipe = folder / "recipe.yaml"
    if not recipe.is_file():
        recipe.write_text(FSDP_RECIPE.format(corpus=Path(REPO) / "ttt_adapt" / "assets" / "corpus" / "train.jsonl"))
    launch = [] if processes == 1 else [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                                        "--num_processes", str(processes), "--num_machines", "1",
                                        "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd = (launch or [sys.executable]) + [SCRIPT, "_fsdp_rank", str(recipe), *overrides]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1)
                                                                                          // processes)))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode:
        raise RuntimeError(f"fsdp run failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}")
    ranks = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"rank"')]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line and "eval_loss" not in line]
    return {"setup": mode, "processes": processes, "ranks": sorted(ranks, key=lambda r: r["rank"]), "losses": losses}


FSDP_RECIPE = """
model: {{name_or_path: unused, dtype: float32}}
ttt: {{layers: [0, 6], chunk_size: 512}}
data: {{path: {corpus}, seq_len: 512, eval_fraction: 0.05}}
train: {{output_dir: unused, max_steps: 3, batch_size: 1, trainable: full, lr: 1.0e-4, warmup_steps: 0,
         log_every: 1, eval_batches: 1, keep_last: 1}}
export: {{dir: null}}
"""


def bench_fsdp(args):
    import tempfile

    from transformers import AutoTokenizer

    folder = Path(tempfile.mkdtemp(prefix="bench_fsdp_"))
    base = make_lm(False, args.chunk, vocab=args.vocab)  # the recipe converts it, as a user's run would
    base.save_pretrained(folder / "base")
    AutoTokenizer.from_pretrained(Path(REPO) / "ttt_adapt" / "assets" / "tiny_qwen3_base").save_pretrained(folder / "base")
    del base
    rows = []
    for n in args.processes:
        for mode in ("ddp", "fsdp") if n > 1 else ("ddp",):
            row = run_fsdp(mode, n, folder, args)
            worst = {k: max(r[k] for r in row["ranks"]) for k in ("loading_peak_mib", "training_peak_mib")}
            rows.append(dict(row, **worst, peak_mib=max(worst.values())))
    for r in rows:
        ddp = next(x for x in rows if x["processes"] == r["processes"] and x["setup"] == "ddp")
        r["peak_vs_ddp"] = r["peak_mib"] / ddp["peak_mib"]
        r["max_loss_rel_diff_vs_ddp"] = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ddp["losses"]))
    params = rows[0]["ranks"][0]["params"]
    print(f"fsdp: full fine-tuning of a TTT Qwen3 (hidden 512 x 12 layers, vocab {args.vocab}: {params / 1e6:.1f}M "
          f"parameters) read from safetensors by scripts/adapt.py's set-up, {args.steps} steps of 1 row x "
          f"{args.length} tokens per process, fp32 CPU (gloo); VmHWM of the largest process")
    print(f"{'setup':>5} {'procs':>5} {'params MiB/proc':>15} {'loading MiB':>11} {'training MiB':>12} {'x DDP':>6} "
          f"{'loss rel diff':>13}")
    for r in rows:
        print(f"{r['setup']:>5} {r['processes']:5d} {max(x['local_param_mib'] for x in r['ranks']):15.0f} "
              f"{r['loading_peak_mib']:11.0f} {r['training_peak_mib']:12.0f} {r['peak_vs_ddp']:6.2f} "
              f"{r['max_loss_rel_diff_vs_ddp']:13.1e}")
    return {"benchmark": "fsdp", "machine": machine(), "settings": vars(args) | {"func": None}, "rows": rows}
