#!/usr/bin/env python
"""Packed-row attention, part 4 of the prepared GPU check: `ttt_packed` vs flex attention vs unpacked SDPA.

    python scripts/benchmark_attention.py [--toy] [--repeats 3] [--out exports/gpu_check/attention.json]

One row of packed documents of different lengths (Qwen3-0.6B's attention: 16 query heads, 8 KV heads, head_dim
128, 32k tokens, bf16 on CUDA; `--toy`: the same code at CPU-test size in fp32), with full causal attention and with
a sliding window. Three ways to attend within each document only:
- `ttt_packed` (what training uses today): SDPA on blocks of queries, each over the keys it can reach, with a
  block x keys mask (`ttt_adapt.attention.blocked_sdpa`);
- `flex`: torch's flex attention with a BlockMask (document, causal and window), compiled on CUDA; the BlockMask is
  built once per batch (`mask_ms`, not in the step time);
- `unpacked_sdpa`: each document alone through SDPA (causal; a window as a mask), the unpacked reference.
Forward + backward time (median of `--repeats`) and peak memory above the inputs (CUDA), and the largest
difference of each output from `ttt_packed`'s. torch has no flex attention backward on CPU: there flex runs
forward only (`backward: false`).
"""

import argparse
import json
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ttt_adapt.attention import blocked_sdpa, document_layout, query_blocks  # noqa: E402

SIZES = {
    "full": dict(heads=16, kv_heads=8, head_dim=128, docs=[2048, 6144, 8192, 16384], window=4096, query_block=1024),
    "toy": dict(heads=4, kv_heads=2, head_dim=16, docs=[32, 64, 96, 64], window=48, query_block=64),
}
VARIANTS = ("ttt_packed", "flex", "unpacked_sdpa")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="benchmark_attention.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy", action="store_true", help="CPU-test sizes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="exports/gpu_check/attention.json")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


def attention_fns(size, doc_lengths, window, device):
    """{variant: fn(q, k, v) -> (B, L, heads, D)} for one row of packed documents."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    L = sum(doc_lengths)
    pos = torch.cat([torch.arange(n) for n in doc_lengths])[None].to(device)
    doc_id, doc_start = document_layout(pos)
    blocks = query_blocks(doc_start, 0, L, size["query_block"], window)
    doc = doc_id[0]

    def mask_mod(b, h, q, kv):
        allowed = (doc[q] == doc[kv]) & (kv <= q)
        return allowed & (q - kv < window) if window is not None else allowed

    t0 = time.perf_counter()
    block_mask = create_block_mask(mask_mod, 1, None, L, L, device=device.type)
    mask_ms = 1000 * (time.perf_counter() - t0)
    flex = torch.compile(flex_attention) if device.type == "cuda" else flex_attention
    # off CUDA the toy sizes time the unfused implementation, which says so at every call
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    starts = [sum(doc_lengths[:i]) for i in range(len(doc_lengths))]

    def ttt_packed(q, k, v):
        return blocked_sdpa(q, k, v, doc_id, 0, blocks, sliding_window=window)

    def flex_fn(q, k, v):
        return flex(q, k, v, block_mask=block_mask, enable_gqa=True).transpose(1, 2)

    def unpacked(q, k, v):
        outs = []
        for s, n in zip(starts, doc_lengths):
            mask = None
            if window is not None:
                i = torch.arange(n, device=device)
                mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
            outs.append(F.scaled_dot_product_attention(q[:, :, s : s + n], k[:, :, s : s + n], v[:, :, s : s + n],
                                                       attn_mask=mask, is_causal=mask is None, enable_gqa=True))
        return torch.cat(outs, 2).transpose(1, 2)

    return {"ttt_packed": ttt_packed, "flex": flex_fn, "unpacked_sdpa": unpacked}, mask_ms


def measure(fn, inputs, grad_out, backward, repeats, device):
    """(median ms of forward [+ backward], peak GiB above the inputs or None off CUDA, the output)."""
    cuda = device.type == "cuda"

    def once():
        q, k, v = (t.detach().requires_grad_(backward) for t in inputs)
        out = fn(q, k, v)
        if backward:
            (out.float() * grad_out).sum().backward()
        return out.detach()

    out = once()  # warm-up (compiles)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        once()
        if cuda:
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t0))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None
    return statistics.median(times), peak, out


def run(args) -> dict:
    size = SIZES["toy" if args.toy else "full"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    docs = size["docs"]
    L = sum(docs)
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, h, L, size["head_dim"], generator=g).to(device, dtype)
              for h in (size["heads"], size["kv_heads"], size["kv_heads"])]
    grad_out = torch.randn(1, L, size["heads"], size["head_dim"], generator=g).to(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result = {"benchmark": "packed_attention", "device": name,
              "torch": torch.__version__, "dtype": str(dtype), "toy": args.toy, "doc_lengths": docs, "rows": []}
    for window in (None, size["window"]):
        fns, mask_ms = attention_fns(size, docs, window, device)
        reference = None
        for variant in VARIANTS:
            backward = not (variant == "flex" and device.type == "cpu")
            ms, peak, out = measure(fns[variant], inputs, grad_out, backward, args.repeats, device)
            if reference is None:
                reference = out
            row = {"variant": variant, "window": window, "tokens": L, "backward": backward, "ms": ms, "peak_gib": peak,
                   "max_diff_vs_ttt_packed": float((out.float() - reference.float()).abs().max())}
            if variant == "flex":
                row["mask_ms"] = mask_ms
            result["rows"].append(row)
    print(f"packed-row attention on {result['device']}, {L} tokens in documents of {docs}, {dtype}")
    print(f"{'variant':<14} {'window':>7} {'fwd+bwd ms':>11} {'peak GiB':>9} {'max diff':>9}")
    for r in result["rows"]:
        peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        print(f"{r['variant']:<14} {str(r['window']):>7} {r['ms']:>11.2f}{'' if r['backward'] else '*'} {peak:>8} "
              f"{r['max_diff_vs_ttt_packed']:>9.1e}")
    if device.type == "cpu":
        print("* forward only: torch has no flex attention backward on CPU")
    return result


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    result = run(args)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
