"""`cp`: context parallelism on the mid-size TTT model: one training step of N x L tokens over N gloo ranks against
L (and N x L) tokens on one rank; every rank a fresh process."""

import json
import os
import statistics
import subprocess
import sys
import time

import torch

from benchmarks.common import SCRIPT, machine, make_lm, rss_kib


def cp_rank(args):
    """One rank of the `cp` benchmark (a fresh process): peak-memory rise of a training step, then step times."""
    import torch.distributed as dist

    from ttt_adapt.distributed.context_parallel import ContextParallel, prepare_model
    from ttt_adapt.loss import loss_sum, shift_labels

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.ranks))
    if args.ranks > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
        dist.init_process_group("gloo", rank=args.rank, world_size=args.ranks)
    cp = ContextParallel(args.ranks)
    model = make_lm(True, args.chunk, write_rule=args.write_rule, key_norm=args.key_norm).train()
    if cp.enabled:
        prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)

    def step(length):
        ids = torch.randint(0, 4096, (1, length), generator=g)
        batch = shift_labels({"input_ids": ids, "labels": ids})
        local, shard = cp.shard(batch, args.chunk) if cp.enabled else (batch, None)
        optimizer.zero_grad(set_to_none=True)
        loss_sum(model, local, shard).backward()
        optimizer.step()

    step(args.ranks * args.chunk)  # optimizer state allocated before measuring
    before = rss_kib("VmRSS")
    step(args.length)
    peak = (rss_kib("VmHWM") - before) / 1024
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step(args.length)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"rank": args.rank, "peak_mib": peak, "seconds": statistics.median(times)}))
    if args.ranks > 1:
        dist.destroy_process_group()


def run_cp(ranks, length, chunk, repeats, rule=()):
    """Launch `ranks` fresh processes on one row of `length` tokens; (largest per-rank peak MiB, seconds)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")
    procs = [subprocess.Popen([sys.executable, SCRIPT, "_cp_rank", "--ranks", str(ranks), "--rank", str(r),
                               "--port", str(port), "--length", str(length), "--chunk", str(chunk),
                               "--repeats", str(repeats), *rule],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in range(ranks)]
    results = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode:
            raise RuntimeError(f"cp rank failed: {err.strip().splitlines()[-1] if err.strip() else p.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return max(r["peak_mib"] for r in results), max(r["seconds"] for r in results)


def bench_cp(args):
    L, N = args.length, args.ranks
    runs = [("1 rank", 1, L), (f"{N} ranks", N, N * L), ("1 rank", 1, N * L)]
    rows = []
    rule = ["--write-rule", args.write_rule] + (["--key-norm"] if args.key_norm else [])
    for name, ranks, tokens in runs:
        peak, seconds = run_cp(ranks, tokens, args.chunk, args.repeats, rule)
        rows.append({"setup": name, "ranks": ranks, "tokens": tokens, "tokens_per_rank": tokens // ranks,
                     "peak_mib_per_rank": peak, "seconds": seconds})
    ref = rows[0]["peak_mib_per_rank"]
    for r in rows:
        r["memory_vs_1_rank_L"] = r["peak_mib_per_rank"] / ref
    print(f"cp: train step (fwd+bwd+AdamW), Qwen3 hidden 512 x 12 layers, TTT layers 0,6 chunk {args.chunk}, "
          f"write rule {args.write_rule}{', key_norm' if args.key_norm else ''}, fp32 CPU, gloo")
    print(f"{'setup':>8} {'tokens':>7} {'tok/rank':>8} {'peak MiB/rank':>13} {'x (1 rank, L)':>13} {'step s':>7}")
    for r in rows:
        print(f"{r['setup']:>8} {r['tokens']:>7} {r['tokens_per_rank']:>8} {r['peak_mib_per_rank']:13.0f} "
              f"{r['memory_vs_1_rank_L']:13.2f} {r['seconds']:7.2f}")
    return {"benchmark": "cp", "machine": machine(), "settings": vars(args) | {"func": None}, "rows": rows}
