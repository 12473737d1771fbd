"""Benchmarks: the cost of In-Place TTT, measured (never asserted in unit tests).

    python scripts/benchmark.py layer [--length 16384 --chunk 512 --hidden 1024 --intermediate 3072 --repeats 3]

`layer`: forward+backward of one MLP on a (1, L, d) fp32 input, CPU: the plain Qwen3 MLP, our TTT MLP, the
published algorithm (every per-chunk d x H update materialised, then a cumulative sum) and a plain Python loop
over chunks left to autograd. Time: median of interleaved repeats in one process. Peak memory: median over
repeats of one forward+backward in a fresh subprocess; we report the rise of the peak resident set (VmHWM) over the resident set
just before the run (inputs and parameters already allocated), which counts activations, saved tensors,
gradients and temporaries. Writes a JSON file and prints a table.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ttt_adapt.modeling.configuration_ttt import TTTConfig  # noqa: E402
from ttt_adapt.modeling.ttt_layer import TTTMLP  # noqa: E402

VARIANTS = ("plain", "ttt", "published", "loop")


def make_mlp(d, H, chunk, seed=0):
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP

    torch.manual_seed(seed)
    base = Qwen3MLP(Qwen3Config(hidden_size=d, intermediate_size=H))
    mlp = TTTMLP(base, TTTConfig(chunk_size=chunk), layer_idx=0)
    with torch.no_grad():
        mlp.ttt.conv.weight.normal_(0, 0.02)
        mlp.ttt.target_proj.weight.normal_(0, 0.02)
    return base, mlp


def published_forward(mlp, x, C):
    """The published training forward: per-chunk updates materialised (n x d x H), then an exclusive cumsum."""
    B, L, d = x.shape
    n = L // C
    h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    v = F.conv1d(x.reshape(B * n, C, d).transpose(1, 2), mlp.ttt.conv.weight, padding=mlp.ttt.conv.padding[0], groups=d)
    v = mlp.ttt.target_proj(v.transpose(1, 2)).reshape(B, n, C, d) * mlp.ttt.lr
    hc = h.reshape(B, n, C, -1)
    dW = torch.einsum("bncd,bnch->bndh", v, hc)
    W = mlp.down_proj.weight + (torch.cumsum(dW, dim=1) - dW)
    return torch.einsum("bnch,bndh->bncd", hc, W).reshape(B, L, d)


def loop_forward(mlp, x, C):
    """Chunks in a Python loop with a running state, left to autograd (it keeps one d x H state per chunk)."""
    B, L, d = x.shape
    h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    y = mlp.down_proj(h)
    S = torch.zeros(B, d, h.shape[-1])
    outs = []
    for c in range(0, L, C):
        hc, xc = h[:, c : c + C], x[:, c : c + C]
        outs.append(hc @ S.transpose(1, 2))
        v = F.conv1d(xc.transpose(1, 2), mlp.ttt.conv.weight, padding=mlp.ttt.conv.padding[0], groups=d).transpose(1, 2)
        v = mlp.ttt.target_proj(v) * mlp.ttt.lr
        S = S + v.transpose(1, 2) @ hc
    return y + torch.cat(outs, dim=1)


def run_once(variant, base, mlp, x, w, C):
    for p in list(base.parameters()) + list(mlp.parameters()):
        p.grad = None
    x.grad = None
    if variant == "plain":
        y = base(x)
    elif variant == "ttt":
        y = mlp(x)
    elif variant == "published":
        y = published_forward(mlp, x, C)
    else:
        y = loop_forward(mlp, x, C)
    (y * w).sum().backward()


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(args):
    """In a fresh subprocess: MiB by which one forward+backward raises the peak resident set."""
    base, mlp = make_mlp(args.hidden, args.intermediate, args.chunk)
    x = torch.randn(1, args.length, args.hidden, requires_grad=True)
    w = torch.randn(1, args.length, args.hidden)
    before = _rss_kib("VmRSS")
    run_once(args.variant, base, mlp, x, w, args.chunk)
    print(json.dumps({"peak_mib": (_rss_kib("VmHWM") - before) / 1024}))


def bench_layer(args):
    base, mlp = make_mlp(args.hidden, args.intermediate, args.chunk)
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
            cmd = [sys.executable, __file__, "_memory", "--variant", v, "--length", str(args.length), "--chunk",
                   str(args.chunk), "--hidden", str(args.hidden), "--intermediate", str(args.intermediate)]
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
    print(f"layer fwd+bwd  L={args.length} chunk={args.chunk} d={args.hidden} H={args.intermediate} fp32 CPU")
    print(f"{'variant':<10} {'seconds':>8} {'x plain':>8} {'peak MiB':>9} {'x plain':>8}")
    for r in rows:
        print(f"{r['variant']:<10} {r['seconds']:8.3f} {r['time_vs_plain']:8.2f} {r['peak_mib']:9.0f} {r['memory_vs_plain']:8.2f}")
    return result


def machine():
    return {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("layer", "_memory"):
        p = sub.add_parser(name)
        p.add_argument("--length", type=int, default=16384)
        p.add_argument("--chunk", type=int, default=512)
        p.add_argument("--hidden", type=int, default=1024)
        p.add_argument("--intermediate", type=int, default=3072)
        p.add_argument("--repeats", type=int, default=3)
        p.add_argument("--out", default="exports/benchmark_layer.json")
        p.add_argument("--variant", choices=VARIANTS, default="ttt")
    args = parser.parse_args(argv)
    if args.length % args.chunk or min(args.length, args.chunk, args.hidden, args.intermediate, args.repeats) < 1:
        parser.exit(2, "benchmark: sizes must be positive and --length a multiple of --chunk\n")
    if args.command == "_memory":
        return measure_memory(args)
    result = bench_layer(args)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
