"""Context parallelism: 2 gloo ranks on CPU give the single-process logits and gradients (float64)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from conftest import (IGNORE, QWEN3_CASE, REPO, ROWS_16, ROWS_24, assert_same_metrics, cp_model, cp_reference,
                      gather_sequence, packed_batch, run_on_ranks, tiny_base)

CASES = {
    "qwen3": QWEN3_CASE,
    "qwen3_clip_token_sliding": dict(
        arch="qwen3", ttt=dict(layers=[1, 3], chunk_size=4, clip_update_norm=0.05, lr_mode="token"),
        rows=ROWS_24, base=dict(use_sliding_window=True, sliding_window=5, max_window_layers=2),
    ),
    "llama_input_embed_ckpt": dict(
        arch="llama", ttt=dict(layers=[0, 3], chunk_size=4, target="input_embed", clip_update_norm=0.2),
        rows=ROWS_24, checkpointing=True,
    ),
    "padded_to_shards": dict(arch="qwen3", ttt=dict(layers=[2], chunk_size=4), rows=[[5, 6], [11]]),
    "lora_on_down_proj": dict(arch="qwen3", ttt=dict(layers=[0, 3], chunk_size=4), rows=ROWS_16, lora=True),
    # the other families with their tiny test configs (conftest.FAMILY_ARCHS): sliding windows on some or all
    # layers; Gemma 3's scaled embeddings as the target, query_pre_attn_scalar, final logit softcapping
    "qwen2": dict(arch="qwen2", ttt=dict(layers=[1, 2], chunk_size=4, lr_mode="token"), rows=ROWS_16),
    "mistral": dict(arch="mistral", ttt=dict(layers=[0, 3], chunk_size=4, clip_update_norm=0.05), rows=ROWS_24),
    # Gemma3RMSNorm computes in float32 even in a float64 model: its weight gradient is a float32 sum over tokens,
    # which the shards split differently (1e-7 relative); every other gradient is float64-exact
    "gemma3_input_embed": dict(arch="gemma3", ttt=dict(layers=[1, 2], chunk_size=4, target="input_embed"),
                               rows=ROWS_24, fp32_norms=True),
    # the state decays before each chunk's update: across ranks the earlier ranks' updates carry their powers
    "qwen3_decay_clip_token": dict(
        arch="qwen3", ttt=dict(layers=[0, 2], chunk_size=4, state_decay=0.7, clip_update_norm=0.05, lr_mode="token"),
        rows=ROWS_24,
    ),
    "qwen3_delta_token": dict(arch="qwen3", ttt=dict(layers=[0, 2], chunk_size=4, write_rule="delta", key_norm=True,
                                                     lr_mode="token"), rows=ROWS_24),
}
# 4 ranks of 8 tokens: documents crossing several shards, so the state is carried through middle ranks.
ROWS_32 = [[32], [3, 27, 2], [9, 23], [16, 16], [1, 6, 25], [30, 2], [1, 10, 21]]
CASES_4 = {
    "4_ranks": dict(arch="qwen3", ttt=dict(layers=[0, 3], chunk_size=4), rows=ROWS_32),
    "4_ranks_clip_sliding": dict(
        arch="qwen3", ttt=dict(layers=[1, 2], chunk_size=4, clip_update_norm=0.05), rows=ROWS_32,
        base=dict(use_sliding_window=True, sliding_window=11, max_window_layers=2),
    ),
    "4_ranks_decay": dict(arch="qwen3", ttt=dict(layers=[0, 3], chunk_size=4, state_decay=0.7), rows=ROWS_32),
    # the delta rule (normalised keys): no per-rank sums; each rank runs the layer over the row up to its shard
    "4_ranks_delta_input_embed": dict(
        arch="llama", ttt=dict(layers=[1, 2], chunk_size=4, write_rule="delta", key_norm=True, state_decay=0.8,
                               target="input_embed", clip_update_norm=0.05), rows=ROWS_32,
    ),
    "4_ranks_decay_clip_input_embed": dict(
        arch="llama", ttt=dict(layers=[1, 2], chunk_size=4, state_decay=0.5, clip_update_norm=0.05,
                               target="input_embed"), rows=ROWS_32,
    ),
}


def _run_cases(rank, world, names):
    from ttt_adapt.distributed.context_parallel import ContextParallel, prepare_model
    from ttt_adapt.loss import loss_sum, shift_labels

    cp = ContextParallel(cp_size=world, query_block=5)  # attention in blocks of 5 local queries (not chunk-aligned)
    for name in names:
        case = {**CASES, **CASES_4}[name]
        batch = packed_batch(case["rows"])
        ref_logits, ref_loss, ref_grads = cp_reference(case, batch)
        model = cp_model(case)
        prepare_model(model)
        local, shard = cp.shard(shift_labels(batch), case["ttt"]["chunk_size"])
        logits = model(input_ids=local["input_ids"], position_ids=local["position_ids"], use_cache=False,
                       cp_shard=shard).logits
        loss = F.cross_entropy(logits.flatten(0, 1), local["labels"].flatten(), ignore_index=IGNORE,
                               reduction="sum")
        loss.backward()
        # the blocked loss (ttt_adapt.loss) sums in another order than F.cross_entropy: equal to rounding
        torch.testing.assert_close(loss_sum(model, local, shard).detach(), loss.detach(), rtol=1e-12, atol=0)
        full = gather_sequence(cp, logits.detach(), batch["input_ids"].shape[1])
        total = loss.detach().clone()
        dist.all_reduce(total)
        torch.testing.assert_close(full, ref_logits, rtol=1e-10, atol=1e-10, msg=f"{name}: logits")
        torch.testing.assert_close(total, ref_loss, rtol=1e-10, atol=1e-10, msg=f"{name}: loss")
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert grads.keys() == ref_grads.keys(), name
        for n, g in grads.items():
            dist.all_reduce(g)
            fp32 = case.get("fp32_norms") and n.endswith("norm.weight")
            tol = dict(rtol=1e-6, atol=1e-7) if fp32 else dict(rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(g, ref_grads[n], **tol, msg=f"{name}: grad of {n}")
        assert any(".mlp.ttt." in n and g.abs().sum() > 0 for n, g in grads.items()), name


def check_dp_cp_mesh(cp, name="qwen3"):
    """2 data-parallel groups x 2 context-parallel ranks: each group takes half the rows (run by
    tests/test_sharding.py in the same 4-rank spawn as FSDP on that mesh)."""
    from ttt_adapt.distributed.context_parallel import prepare_model
    from ttt_adapt.loss import loss_sum, shift_labels

    assert (cp.dp_size, cp.dp_rank, cp.cp_rank) == (2, dist.get_rank() // 2, dist.get_rank() % 2)
    case = CASES[name]
    batch = packed_batch(case["rows"])
    _, ref_loss, ref_grads = cp_reference(case, batch)
    model = cp_model(case)
    prepare_model(model)
    mine = {k: v[cp.dp_rank :: cp.dp_size] for k, v in batch.items()}
    local, shard = cp.shard(shift_labels(mine), case["ttt"]["chunk_size"])
    loss = loss_sum(model, local, shard)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    torch.testing.assert_close(total, ref_loss, rtol=1e-10, atol=1e-10)
    for n, p in model.named_parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-9, atol=1e-10, msg=f"{name}: grad of {n}")


@pytest.mark.timeout(600)
def test_two_ranks_equal_one_process():
    run_on_ranks(2, _run_cases, list(CASES))


@pytest.mark.timeout(600)
def test_four_ranks_equal_one_process():
    run_on_ranks(4, _run_cases, list(CASES_4))


# ---------------------------------------------------------------------------------------------- guards


def test_what_cannot_be_split_exactly_is_refused():
    from ttt_adapt import TTTConfig, convert
    from ttt_adapt.distributed.context_parallel import ContextParallel, CPShard, prepare_model

    with pytest.raises(ValueError, match="needs an In-Place TTT model"):
        prepare_model(tiny_base())
    with pytest.raises(ValueError, match="attention_dropout 0"):
        prepare_model(convert(tiny_base(attention_dropout=0.1), TTTConfig(layers=[0], chunk_size=4)))
    with pytest.raises(ValueError, match="does not divide the 1 process"):
        ContextParallel(cp_size=2)
    with pytest.raises(ValueError, match="integer >= 1"):
        ContextParallel(cp_size=0)
    model = convert(tiny_base(), TTTConfig(layers=[0], chunk_size=4))
    prepare_model(model)
    batch = packed_batch([[8], [3, 5]])
    shard = CPShard(None, 0, 2, batch["position_ids"])  # rank 0 of 2 (the refusals come before any exchange)
    local = {k: v[:, :4] for k, v in batch.items()}
    for kwargs, match in (({"attention_mask": torch.ones(2, 4, dtype=torch.long)}, "takes no attention_mask"),
                          ({"use_cache": True}, "use_cache=False")):
        with pytest.raises(ValueError, match=match):
            model(input_ids=local["input_ids"], position_ids=local["position_ids"], cp_shard=shard, **kwargs)
    misaligned = CPShard(None, 0, 2, torch.arange(12).expand(2, 12))  # shards of 6 tokens, chunks of 4
    with pytest.raises(ValueError, match="not whole 4-token TTT chunks"):
        misaligned.plan(chunk_size=4, kernel_size=5)
    # without a shard the `ttt_cp` attention is plain SDPA: the prepared model still gives the base's logits
    base = tiny_base()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=batch["input_ids"]).logits, base(input_ids=batch["input_ids"]).logits)


# ---------------------------------------------------------------------------------------------- the training loop


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(900)
def test_tiny_recipe_with_cp_size_2_logs_the_losses_of_one_process(tmp_path):
    """`accelerate launch --num_processes 2 scripts/adapt.py recipes/tiny_qwen3.yaml parallel.cp_size=2`: each
    1024-token row is split over 2 gloo ranks (4 chunks each), yet every logged loss equals the 1-process run."""
    common = ["train.max_steps=4", "train.warmup_steps=2", "train.log_every=1", "train.eval_every=2",
              "train.eval_batches=2", "eval=null", "export.dir=null"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "scripts/adapt.py", "recipes/tiny_qwen3.yaml", *common,
                          f"train.output_dir={tmp_path / 'one'}"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "scripts/adapt.py",
              "recipes/tiny_qwen3.yaml", *common, "parallel.cp_size=2", f"train.output_dir={tmp_path / 'two'}"]
    two = subprocess.run(launch, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "(1 data-parallel x 2 context-parallel)" in two.stdout
    a, b = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [m["step"] for m in a] == [m["step"] for m in b] and len([m for m in a if "eval_loss" in m]) == 2
    assert_same_metrics(a, b)
