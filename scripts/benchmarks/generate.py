"""`generate`: prefill of the prompt, then greedy decoding one token at a time with the cache, base vs TTT."""

import statistics
import time

import torch

from benchmarks.common import machine, make_lm


@torch.no_grad()
def decode(model, ids, new_tokens):
    """(prefill seconds, decode seconds) of greedy decoding with the cache."""
    from transformers import DynamicCache

    from ttt_adapt.modeling.modeling_ttt import cache_argument

    cache = {cache_argument(type(model)): DynamicCache(config=model.config)}  # `cache` from transformers 5.24
    t0 = time.perf_counter()
    logits = model(ids, **cache, use_cache=True).logits[:, -1]
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        logits = model(logits.argmax(-1, keepdim=True), **cache, use_cache=True).logits[:, -1]
    return t1 - t0, time.perf_counter() - t1


def bench_generate(args):
    models = {v: make_lm(v == "ttt", args.chunk).eval() for v in ("base", "ttt")}
    rows = []
    for B in args.batches:
        ids = torch.randint(0, 4096, (B, args.prompt))
        res = {v: [] for v in models}
        for v in models:
            decode(models[v], ids[:, :32], 4)  # warm-up
        for _ in range(args.repeats):
            for v in models:
                res[v].append(decode(models[v], ids, args.new_tokens))
        med = {v: (statistics.median(p for p, _ in r), statistics.median(d for _, d in r)) for v, r in res.items()}
        rows.append({
            "batch": B, "prompt": args.prompt, "new_tokens": args.new_tokens,
            "base_prefill_tok_s": B * args.prompt / med["base"][0], "ttt_prefill_tok_s": B * args.prompt / med["ttt"][0],
            "prefill_time_ratio": med["ttt"][0] / med["base"][0],
            "base_decode_ms_per_step": 1000 * med["base"][1] / args.new_tokens,
            "ttt_decode_ms_per_step": 1000 * med["ttt"][1] / args.new_tokens,
            "decode_time_ratio": med["ttt"][1] / med["base"][1],
        })
    print(f"generate: prompt {args.prompt}, {args.new_tokens} new tokens (chunk {args.chunk}: boundary updates included), fp32 CPU")
    print(f"{'batch':>5} {'prefill tok/s base':>18} {'ttt':>8} {'x':>5} {'decode ms/step base':>19} {'ttt':>7} {'x':>5}")
    for r in rows:
        print(f"{r['batch']:>5} {r['base_prefill_tok_s']:18.0f} {r['ttt_prefill_tok_s']:8.0f} {r['prefill_time_ratio']:5.2f} "
              f"{r['base_decode_ms_per_step']:19.1f} {r['ttt_decode_ms_per_step']:7.1f} {r['decode_time_ratio']:5.2f}")
    return {"benchmark": "generate", "machine": machine(), "settings": vars(args) | {"func": None}, "rows": rows}
