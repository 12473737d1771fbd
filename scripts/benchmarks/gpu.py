"""`gpu`: the GPU benchmark of the prepared GPU check (`scripts/gpu_check.py` runs it); `--toy` at CPU size."""

import json
import os
import statistics
import time

import torch

from benchmarks.common import REPO, machine, make_mlp, run_once
from ttt_adapt.compat import enable_activation_checkpointing
from ttt_adapt.modeling.configuration_ttt import TTTConfig

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

    Needs only torch, transformers, accelerate and peft (no `datasets`: ttt_adapt.distributed/data/recipe are not
    imported, and of training/ only flops.py, which imports nothing). `--toy` runs every part at CPU size, so the
    unit tests keep it working.
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
