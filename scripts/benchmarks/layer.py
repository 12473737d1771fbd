"""`layer`: forward + backward of one MLP on a (1, L, d) fp32 input, CPU: the plain Qwen3 MLP, our TTT MLP, the
published algorithm and a plain Python loop over chunks (time in one process; peak memory in fresh ones)."""

import json
import os
import statistics
import subprocess
import sys
import time

import torch

from benchmarks.common import SCRIPT, VARIANTS, machine, make_mlp, rss_kib, run_once


def measure_memory(args):
    """In a fresh subprocess: MiB by which one forward+backward raises the peak resident set."""
    base, mlp = make_mlp(args.hidden, args.intermediate, args.chunk, state_decay=args.state_decay,
                         write_rule=args.write_rule, key_norm=args.key_norm)
    x = torch.randn(1, args.length, args.hidden, requires_grad=True)
    w = torch.randn(1, args.length, args.hidden)
    before = rss_kib("VmRSS")
    run_once(args.variant, base, mlp, x, w, args.chunk)
    print(json.dumps({"peak_mib": (rss_kib("VmHWM") - before) / 1024}))


def bench_layer(args):
    base, mlp = make_mlp(args.hidden, args.intermediate, args.chunk, state_decay=args.state_decay,
                         write_rule=args.write_rule, key_norm=args.key_norm)
    x = torch.randn(1, args.length, args.hidden, requires_grad=True)
    w = torch.randn(1, args.length, args.hidden)
    times = {v: [] for v in VARIANTS}
    for v in VARIANTS:  # warm-up
        run_once(v, base, mlp, x, w, args.chunk)
    for _ in range(args.repeats):
        for v in VARIANTS:  # interleaved, so machine noise hits every variant alike
            t0 = time.perf_counter()
            run_once(v, base, mlp, x, w, args.chunk)
            times[v].append(time.perf_counter() - t0)
    memory = {v: [] for v in VARIANTS}
    # A fixed mmap threshold makes glibc hand every large block straight back to the OS, so the resident set
    # follows the live tensors instead of the heap's high-water mark.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")
    for _ in range(args.repeats):
        for v in VARIANTS:
            cmd = [sys.executable, SCRIPT, "_memory", "--variant", v, "--length", str(args.length), "--chunk",
                   str(args.chunk), "--hidden", str(args.hidden), "--intermediate", str(args.intermediate),
                   *(["--state-decay", str(args.state_decay)] if args.state_decay is not None else []),
                   "--write-rule", args.write_rule, *(["--key-norm"] if args.key_norm else [])]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
            memory[v].append(json.loads(out.strip().splitlines()[-1])["peak_mib"])
    memory = {v: statistics.median(m) for v, m in memory.items()}
    rows = []
    for v in VARIANTS:
        t = statistics.median(times[v])
        rows.append({
            "variant": v, "seconds": t, "time_vs_plain": t / statistics.median(times["plain"]),
            "peak_mib": memory[v], "memory_vs_plain": memory[v] / memory["plain"],
        })
    result = {"benchmark": "layer", "machine": machine(), "settings": vars(args) | {"func": None}, "rows": rows}
    print(f"layer fwd+bwd  L={args.length} chunk={args.chunk} d={args.hidden} H={args.intermediate} fp32 CPU "
          f"(TTT MLP: write_rule {args.write_rule}, key_norm {args.key_norm}, state_decay {args.state_decay})")
    print(f"{'variant':<10} {'seconds':>8} {'x plain':>8} {'peak MiB':>9} {'x plain':>8}")
    for r in rows:
        print(f"{r['variant']:<10} {r['seconds']:8.3f} {r['time_vs_plain']:8.2f} {r['peak_mib']:9.0f} {r['memory_vs_plain']:8.2f}")
    return result
