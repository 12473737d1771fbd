"""`train-step`: forward + backward + AdamW step of the mid-size (or small) Qwen3 and its TTT version as training
runs it; time, peak memory (fresh processes) and the memory plan's estimate."""

import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.common import REPO, SCRIPT, SIZES, machine, make_lm, rss_kib
from ttt_adapt.compat import enable_activation_checkpointing

STEP_VARIANTS = ("base", "ttt", "ttt_plain")  # ttt_plain: full logits + transformers' dense packed mask (before)


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
    start = rss_kib("VmRSS")
    _, _, step = make_step(args.variant, args)
    step(min(args.length, 2 * args.chunk))  # optimizer state allocated before measuring
    before = rss_kib("VmRSS")
    step(args.length)
    peak = rss_kib("VmHWM")
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
            cmd = [sys.executable, SCRIPT, "_memory_step", "--variant", v, "--length", str(L), "--chunk",
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
