"""Benchmarks: the cost of In-Place TTT, measured (never asserted in unit tests).

    python scripts/benchmark.py layer [--length 16384 --chunk 512 --hidden 1024 --intermediate 3072 --repeats 3 --state-decay G
                                      --write-rule sum|delta --key-norm]
    python scripts/benchmark.py train-step [--lengths 2048,4096 --repeats 3 --model mid|small --vocab 4096
                                            --trainable full|ttt --checkpointing --variants base,ttt,ttt_plain
                                            --compile]
    python scripts/benchmark.py gpu [--toy]
    python scripts/benchmark.py generate [--prompt 1024 --new-tokens 128 --batches 1,8 --chunk 64]
    python scripts/benchmark.py cp [--length 4096 --ranks 2 --chunk 512 --repeats 3 --write-rule sum|delta --key-norm]
    python scripts/benchmark.py fsdp [--length 512 --processes 1,2,4 --chunk 512 --steps 3]
    python scripts/benchmark.py serve [--requests 16 --prompt 512 --new-tokens 128 --chunks 64,4096 --repeats 3]
                                      (needs vLLM)

`layer`: forward+backward of one MLP on a (1, L, d) fp32 input, CPU: the plain Qwen3 MLP, our TTT MLP, the
published algorithm (every per-chunk d x H update materialised, then a cumulative sum) and a plain Python loop
over chunks left to autograd. Time: median of interleaved repeats in one process. Peak memory: median over
repeats of one forward+backward in a fresh subprocess; we report the rise of the peak resident set (VmHWM) over the resident set
just before the run (inputs and parameters already allocated), which counts activations, saved tensors,
gradients and temporaries. Writes a JSON file and prints a table.

`train-step` and `generate` use a mid-size CPU-runnable Qwen3 (hidden 512, 12 layers, MLP 1536, vocab 4096) and
its TTT version (TTT every 6th layer: 0 and 6); `--model small` (hidden 256, 2 layers) and `--vocab` give the
issue-13 memory models. `train-step`: forward + backward + AdamW step as training runs it (one packed row of 4
documents, the blocked loss, `ttt_packed` attention; `ttt_plain`: full logits and transformers' dense mask, as
before); time (interleaved, median) and peak memory (fresh process, as above), with the memory plan's estimate.
`generate`: prefill of the prompt, then greedy decoding one token at a time with the cache.
`gpu`: the GPU benchmark of the prepared GPU check (`bench_gpu`; `scripts/gpu_check.py` runs it); `--toy` runs it at
CPU size.

`cp`: context parallelism (`ttt_adapt.distributed.context_parallel`) on that TTT model: one training step (forward + backward + AdamW)
of a row of N x L tokens split over N gloo ranks, against L tokens on 1 rank (and N x L on 1 rank, what context
parallelism avoids). Every rank is a fresh process; per-rank peak memory as above (the largest rank), step time
the median of repeats (the CPU cores are shared out among the ranks).

`fsdp`: full fine-tuning of the mid-size Qwen3 (weights, gradients and AdamW states dominate memory) as
`scripts/adapt.py` runs it: the base read from safetensors, converted, the shipped corpus packed, 3 steps of one
row of L tokens per process, on 1, 2 and 4 processes, as plain data parallelism (DDP) and sharded (FSDP2:
process 0 reads the weights, the others build the model on the meta device and receive their shards). Every
process is fresh; the peak resident set (VmHWM) of the largest process after set-up (loading) and after
training (3 steps and the final checkpoint), and the largest relative difference of the logged losses from DDP's.

`serve`: the mid-size model's base export and its TTT exports (TTT on layers 0 and 6, one per chunk size: a small
chunk, so that every request reads a non-zero fast weight and closes chunks while decoding, and the published 4096)
served by vLLM (the ttt-adapt plugin), one after the other in the same run, each in a fresh engine process: N
concurrent requests (random prompts, greedy, a fixed number of new tokens), wall time of the whole batch after a
warm-up, the median of `--repeats` batches; then transformers `generate()` of the first chunk size's TTT model on
the same prompts (one batch of N, greedy, cache). Output tokens per second, and the ratios.
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..")]  # the benchmarks beside this file; ttt_adapt from this checkout

from benchmarks import cp, fsdp, generate, gpu, layer, serve, train_step  # noqa: E402
from benchmarks.common import SIZES, VARIANTS, ints, names  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per benchmark (those starting with `_` are the measured child processes)."""
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
        p.add_argument("--state-decay", type=float, default=None, help="the TTT MLP's ttt.state_decay (default off)")
        p.add_argument("--write-rule", choices=("sum", "delta"), default="sum", help="the TTT MLP's ttt.write_rule")
        p.add_argument("--key-norm", action="store_true", help="the TTT MLP's ttt.key_norm")
    for name in ("train-step", "_memory_step"):
        p = sub.add_parser(name)
        p.add_argument("--lengths", type=ints, default=[2048, 4096])
        p.add_argument("--length", type=int, default=4096)
        p.add_argument("--variant", choices=train_step.STEP_VARIANTS, default="ttt")
        p.add_argument("--variants", type=names(train_step.STEP_VARIANTS), default=["base", "ttt"])
        p.add_argument("--model", choices=tuple(SIZES), default="mid")
        p.add_argument("--vocab", type=int, default=4096)
        p.add_argument("--trainable", choices=("full", "ttt"), default="full")
        p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
        p.add_argument("--compile", action="store_true", help="also time each variant with compiled decoder layers")
        p.add_argument("--chunk", type=int, default=512)
        p.add_argument("--repeats", type=int, default=3, help="timed steps per variant (0: memory only)")
        p.add_argument("--out", default="exports/benchmark_train_step.json")
    p = sub.add_parser("generate")
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", type=ints, default=[1, 8])
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="exports/benchmark_generate.json")
    p = sub.add_parser("serve", help="TTT export vs its base in vLLM, and vs transformers generate() (needs vLLM)")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--chunks", type=ints, default=[64, 4096])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="exports/benchmark_serve.json")
    p = sub.add_parser("_serve_engine")
    p.add_argument("--folder")
    p.add_argument("--prompts")
    p.add_argument("--new-tokens", type=int)
    p.add_argument("--repeats", type=int, default=1)
    p = sub.add_parser("gpu", help="the prepared GPU check (one GPU, <= 8 minutes)")
    p.add_argument("--toy", action="store_true", help="CPU-test sizes")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="exports/benchmark_gpu.json")
    for name in ("cp", "_cp_rank"):
        p = sub.add_parser(name)
        p.add_argument("--length", type=int, default=4096, help="tokens per rank")
        p.add_argument("--ranks", type=int, default=2)
        p.add_argument("--chunk", type=int, default=512)
        p.add_argument("--repeats", type=int, default=3)
        p.add_argument("--out", default="exports/benchmark_cp.json")
        p.add_argument("--write-rule", choices=("sum", "delta"), default="sum", help="the TTT layers' ttt.write_rule")
        p.add_argument("--key-norm", action="store_true", help="the TTT layers' ttt.key_norm")
        p.add_argument("--rank", type=int, default=0)
        p.add_argument("--port", type=int, default=0)
    p = sub.add_parser("fsdp")
    p.add_argument("--length", type=int, default=512, help="tokens per process and step")
    p.add_argument("--processes", type=ints, default=[1, 2, 4])
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--out", default="exports/benchmark_fsdp.json")
    p = sub.add_parser("_fsdp_rank")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "fsdp" and min(args.length, args.chunk, args.steps) < 1:
        parser.exit(2, "benchmark: sizes must be positive\n")
    if args.command == "_fsdp_rank":
        return fsdp.fsdp_rank(args)
    if args.command in ("cp", "_cp_rank"):
        if min(args.length, args.ranks, args.chunk, args.repeats) < 1 or args.length % args.chunk:
            parser.exit(2, "benchmark: sizes must be positive and --length a multiple of --chunk\n")
        if args.command == "_cp_rank":
            return cp.cp_rank(args)
    if args.command == "_serve_engine":
        return serve.serve_engine(args)
    if args.command == "serve" and min(args.requests, args.prompt, args.new_tokens, args.repeats, *args.chunks) < 1:
        parser.exit(2, "benchmark: sizes must be positive\n")
    if args.command == "_memory_step":
        return train_step.measure_step_memory(args)
    if args.command in ("layer", "_memory"):
        if args.length % args.chunk or min(args.length, args.chunk, args.hidden, args.intermediate, args.repeats) < 1:
            parser.exit(2, "benchmark: sizes must be positive and --length a multiple of --chunk\n")
        if args.command == "_memory":
            return layer.measure_memory(args)
        result = layer.bench_layer(args)
    elif args.command == "train-step":
        result = train_step.bench_train_step(args)
    elif args.command == "cp":
        result = cp.bench_cp(args)
    elif args.command == "gpu":
        result = gpu.bench_gpu(args)
    elif args.command == "fsdp":
        result = fsdp.bench_fsdp(args)
    elif args.command == "serve":
        result = serve.bench_serve(args)
    else:
        result = generate.bench_generate(args)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
