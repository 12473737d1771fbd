"""FSDP2 (`ttt_adapt.distributed.fsdp`): sharded training on gloo ranks equals one process, checkpoints are sharded and
resume bit-exact on the same or another number of processes, the export reads them, requests that cannot be
honoured are refused (float64 where exactness is claimed)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import (QWEN3_CASE, REPO, assert_same_metrics, cp_model, cp_reference, packed_batch, run_on_ranks,
                      script_main)
from test_parallel import check_dp_cp_mesh

WORLD = 4  # a 2 x 2 (dp x cp) mesh; FSDP shards over all four ranks


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _step(model, optimizer, local, shard, scale, clip=1.0):
    from ttt_adapt.distributed.fsdp import clip_grad_norm
    from ttt_adapt.loss import loss_sum

    loss = loss_sum(model, local, shard)
    (loss * scale).backward()
    norm = clip_grad_norm(model, clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), norm


def _save_full(model, path, rank):
    full = {n: _full(p).detach() for n, p in model.named_parameters()}  # collectives: every rank gathers
    if rank == 0:
        torch.save(full, path)


def _check_bf16_scan(case, batch):
    """bf16 mixed precision: weights gathered in bf16 for compute, the fast-weight state accumulated in fp32."""
    from ttt_adapt.modeling import ttt_layer
    from ttt_adapt.distributed.fsdp import fsdp_mesh, shard_model

    seen = []
    scan, add = ttt_layer.fast_weight_scan, ttt_layer._add_update

    def record_scan(h, a, *args, **kwargs):
        seen.append(("h", h.dtype))
        return scan(h, a, *args, **kwargs)

    def record_add(S, a, h, *args):
        out = add(S, a, h, *args)
        seen.append(("state", out.dtype))
        return out

    ttt_layer.fast_weight_scan, ttt_layer._add_update = record_scan, record_add
    try:
        model = cp_model(case).float()  # fp32 master weights, as trained
        shard_model(model, fsdp_mesh("cpu"), mixed_precision="bf16")
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    finally:
        ttt_layer.fast_weight_scan, ttt_layer._add_update = scan, add
    assert logits.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in model.parameters())
    assert {d for k, d in seen if k == "h"} == {torch.bfloat16}
    assert {d for k, d in seen if k == "state"} == {torch.float32}


def _run_fsdp_cp(rank, world, folder):
    """The 2 x 2 (dp x cp) mesh equals one process, without and with FSDP over all ranks: loss and every
    gradient; the global gradient norm; each rank holds 1/world of the weights; a sharded checkpoint reloads
    bit-exact (weights, optimizer, RNG) and the next step is bitwise equal."""
    from ttt_adapt.distributed.context_parallel import ContextParallel, prepare_model
    from ttt_adapt.distributed.fsdp import clip_grad_norm, fsdp_mesh, is_sharded, local_parameter_bytes, shard_model
    from ttt_adapt.loss import loss_sum, shift_labels
    from ttt_adapt.training.checkpoints import load_sharded, save_sharded

    cp = ContextParallel(cp_size=2)
    check_dp_cp_mesh(cp)  # without FSDP
    check_dp_cp_mesh(cp, "qwen3_decay_clip_token")  # the state decays before each chunk's update
    case = QWEN3_CASE
    batch = packed_batch(case["rows"])
    _, ref_loss, ref_grads = cp_reference(case, batch)
    ref_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in ref_grads.values()]))

    def sharded_model():
        model = cp_model(case)
        prepare_model(model)
        full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        shard_model(model, fsdp_mesh("cpu"))
        return model, full_bytes

    model, full_bytes = sharded_model()
    assert is_sharded(model)
    # one 97-row embedding shards unevenly (25 + 24 + 24 + 24): within a few rows of a quarter
    assert abs(local_parameter_bytes(model) / full_bytes - 1 / world) < 0.01, local_parameter_bytes(model)
    mine = {k: v[cp.dp_rank :: cp.dp_size] for k, v in batch.items()}
    local, shard = cp.shard(shift_labels(mine), case["ttt"]["chunk_size"])
    loss = loss_sum(model, local, shard)
    (loss * world).backward()  # FSDP averages gradients over the ranks; the training step scales the same way
    total = loss.detach().clone()
    dist.all_reduce(total)
    torch.testing.assert_close(total, ref_loss, rtol=1e-10, atol=1e-10)
    grads = {n: _full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-9, atol=1e-10, msg=f"grad of {n}")
    torch.testing.assert_close(torch.tensor(clip_grad_norm(model, float("inf")), dtype=torch.float64), ref_norm,
                               rtol=1e-9, atol=0)
    model.zero_grad(set_to_none=True)

    # Sharded checkpoint: train a step, save; a fresh sharded model + optimizer loads it, and the next step
    # of both is bitwise equal (fused AdamW on the DTensor shards).
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    _step(model, optimizer, local, shard, world)
    save_sharded(Path(folder), model, optimizer)
    _save_full(model, Path(folder) / "saved.pt", rank)
    expected_rng = torch.get_rng_state()  # as saved
    torch.manual_seed(99)  # load_sharded restores the saved RNG state
    fresh, _ = sharded_model()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2, fused=True)
    load_sharded(Path(folder), fresh, fresh_opt)
    assert torch.equal(torch.get_rng_state(), expected_rng)
    for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p.to_local(), q.to_local()), n
    a, b = _step(model, optimizer, local, shard, world), _step(fresh, fresh_opt, local, shard, world)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p.to_local(), q.to_local()), n
    _save_full(model, Path(folder) / "after.pt", rank)
    _check_bf16_scan(case, batch)


@pytest.mark.timeout(600)
def test_fsdp_with_context_parallelism_equals_one_process(tmp_path):
    run_on_ranks(WORLD, _run_fsdp_cp, str(tmp_path))
    # The 4-rank checkpoint loads into one process without FSDP and without a process group: the same weights,
    # and the next step on the whole batch gives the weights of the 4-rank step.
    from ttt_adapt.loss import shift_labels
    from ttt_adapt.training.checkpoints import SHARDED, _load_sharded_weights, load_sharded

    case = QWEN3_CASE
    model = cp_model(case)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    load_sharded(tmp_path, model, optimizer)
    saved, after = torch.load(tmp_path / "saved.pt"), torch.load(tmp_path / "after.pt")
    for n, p in model.named_parameters():
        assert torch.equal(p, saved[n]), n
    other = cp_model(case)
    assert _load_sharded_weights(other, tmp_path / SHARDED) == ([], [])
    assert all(torch.equal(p, saved[n]) for n, p in other.named_parameters())
    local = shift_labels(packed_batch(case["rows"]))
    _step(model, optimizer, local, None, 1.0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, after[n], rtol=1e-9, atol=1e-12, msg=n)
    assert any(not torch.equal(after[n], saved[n]) for n in saved)


# ---------------------------------------------------------------------------------------------- the training loop


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _launch(*args, num_processes=2):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "scripts/adapt.py", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _assert_same_losses(a, b, steps=None):
    pick = (lambda m: m) if steps is None else (lambda m: [x for x in m if x["step"] in steps])
    a, b = pick(a), pick(b)
    assert [m["step"] for m in a] == [m["step"] for m in b] and a
    assert_same_metrics(a, b)


@pytest.mark.timeout(1200)
def test_tiny_recipe_with_fsdp_on_two_processes_equals_one_process(tmp_path, monkeypatch):
    """The tiny recipe, fully fine-tuned, with `parallel.fsdp=true` on 2 gloo processes: the losses, gradient
    norms, eval losses and end-of-training evaluation of 1 process, checkpoints written sharded, and an export
    (read straight from the sharded checkpoint) with the 1-process export's logits. The sharded checkpoint
    resumes bit-exact on 2 processes and, with the same global batch, on 1 process without FSDP."""
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(REPO)
    adapt = script_main("adapt")
    common = ["recipes/tiny_qwen3.yaml", "train.max_steps=4", "train.warmup_steps=2", "train.log_every=1",
              "train.eval_every=2", "train.eval_batches=1", "train.save_every=2", "train.keep_last=3",
              "train.trainable=full", "train.lr=1e-3", "data.seq_len=256", f"data.cache_dir={tmp_path / 'cache'}",
              "eval.tasks=[]", "eval.max_docs=2", "export.dtype=float32"]
    one = [*common, "train.batch_size=2", "train.grad_accum=2"]  # 4 rows a step, like 2 processes x 2 rows
    two = [*common, "train.batch_size=2", "parallel.fsdp=true"]
    assert adapt([*one, f"train.output_dir={tmp_path / 'one'}", f"export.dir={tmp_path / 'one_export'}"]) == 0
    run = _launch(*two, f"train.output_dir={tmp_path / 'two'}", f"export.dir={tmp_path / 'two_export'}")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "weights sharded over all 2 (FSDP2, parallel.fsdp)" in run.stdout
    _assert_same_losses(_metrics(tmp_path / "one"), _metrics(tmp_path / "two"))
    reports = [json.loads((tmp_path / r / "eval" / "report.json").read_text()) for r in ("one", "two")]
    assert reports[1]["adapted"]["loss_by_position"] == pytest.approx(reports[0]["adapted"]["loss_by_position"],
                                                                      rel=1e-5)
    checkpoint = tmp_path / "two" / "checkpoint-2"
    assert (checkpoint / "sharded" / ".metadata").is_file() and not (checkpoint / "model.safetensors").exists()

    ids = torch.randint(3, 60, (2, 300), generator=torch.Generator().manual_seed(0))
    logits = []
    for name in ("one_export", "two_export"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name, trust_remote_code=True)
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    # fp32 with another reduction order, after 4 AdamW steps of every weight: equal to ~1e-6 of the logits' scale
    assert logits[0].abs().max() > 1
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)

    # Resume from checkpoint-2: on 2 processes (bit-exact), on 1 process without FSDP (same global batch).
    for name in ("two_again", "one_from_two"):
        (tmp_path / name).mkdir()
        shutil.copytree(checkpoint, tmp_path / name / checkpoint.name)
        shutil.copy(tmp_path / "two" / "metrics.jsonl", tmp_path / name / "metrics.jsonl")
    run = _launch(*two, f"train.output_dir={tmp_path / 'two_again'}", "eval=null", "export.dir=null")
    assert run.returncode == 0, run.stderr[-3000:]
    timeless = [[{k: v for k, v in m.items() if k != "tokens_per_s"} for m in _metrics(tmp_path / r)]
                for r in ("two", "two_again")]
    assert timeless[0] == timeless[1]  # bit for bit
    from ttt_adapt.training.checkpoints import SHARDED

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    states = []
    for r in ("two", "two_again"):  # weights and optimizer state of the final checkpoints, bit for bit
        dcp_to_torch_save(tmp_path / r / "checkpoint-4" / SHARDED, tmp_path / f"{r}.pt")
        states.append(torch.load(tmp_path / f"{r}.pt"))
    flat = [{k: v for k, v in _flatten(s)} for s in states]
    assert flat[0].keys() == flat[1].keys() and any(".exp_avg" in k for k in flat[0])
    for k, v in flat[0].items():
        assert torch.equal(v, flat[1][k]) if isinstance(v, torch.Tensor) else v == flat[1][k], k
    assert adapt([*one, f"train.output_dir={tmp_path / 'one_from_two'}", "eval=null", "export.dir=null"]) == 0
    _assert_same_losses(_metrics(tmp_path / "two"), _metrics(tmp_path / "one_from_two"), steps={3, 4})


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _flatten(v, f"{prefix}.{i}")
    else:
        yield prefix, tree


def test_fsdp_requests_that_cannot_be_honoured_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    adapt = script_main("adapt")
    args = ["recipes/tiny_qwen3.yaml", "train.max_steps=1", "train.warmup_steps=0",
            f"train.output_dir={tmp_path / 'run'}", "eval=null", "export.dir=null"]
    assert adapt([*args, "parallel.fsdp=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("adapt.py: error: FSDP (parallel.fsdp) shards the weights over several processes") \
        and "\n" not in err
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --use_fsdp` sets
    for env, match in ((dict(FSDP_VERSION="1"), "fsdp_version 1: ttt-adapt shards with FSDP2 only"),
                       (dict(FSDP_VERSION="2", FSDP_OFFLOAD_PARAMS="true"), "fsdp_offload_params"),
                       (dict(FSDP_VERSION="2", FSDP_OFFLOAD_PARAMS="false"), "FSDP (accelerate (--use_fsdp))")):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert adapt(args) == 2
        err = capsys.readouterr().err.strip()
        assert match in err and "\n" not in err, err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- loading


def _load_without_a_full_copy(rank, world, recipe_path):
    """Process 1 reads no weights and allocates none before its shards arrive; after loading every process
    holds exactly its shards of the model process 0 built, and the sharded model computes its logits."""
    import transformers
    from torch.distributed.tensor import DTensor

    from ttt_adapt.distributed.fsdp import fsdp_mesh, load_from_rank0, local_parameter_bytes, sharded_skeleton
    from ttt_adapt.model_setup import build_model
    from ttt_adapt.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    config = transformers.AutoConfig.from_pretrained(recipe.model.name_or_path)
    reference = build_model(recipe)  # what process 0 builds, for comparison (every process, in this test only)
    real = transformers.AutoModelForCausalLM.from_pretrained
    if rank:
        def refuse(*args, **kwargs):
            raise AssertionError("process 1 read the weights")
        transformers.AutoModelForCausalLM.from_pretrained = refuse
    try:
        model, full = sharded_skeleton(recipe, config, fsdp_mesh("cpu"))
        if rank:
            assert full == {}
            params = list(model.parameters())
            assert params and all(isinstance(p, DTensor) and p.to_local().is_meta for p in params)
            assert all(b.is_meta for b in model.buffers())
        load_from_rank0(model, full, torch.device("cpu"))
    finally:
        transformers.AutoModelForCausalLM.from_pretrained = real
    full_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())
    assert abs(local_parameter_bytes(model) / full_bytes - 1 / world) < 0.02
    for name, p in model.named_parameters():
        assert not p.to_local().is_meta and torch.equal(p.full_tensor(), reference.get_parameter(name)), name
    for name, b in reference.named_buffers():
        assert torch.equal(model.get_buffer(name), b), name
    ids = torch.randint(3, 60, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_fsdp_processes_other_than_the_first_never_hold_the_whole_model(tmp_path):
    from conftest import make_tiny_files, recipe_dict, write_recipe

    files = make_tiny_files(tmp_path)
    for trainable, lora in (("full", 0), ("ttt", 2)):
        raw = recipe_dict(files, tmp_path, trainable=trainable, lora={"r": lora})
        run_on_ranks(2, _load_without_a_full_copy, str(write_recipe(tmp_path / f"{trainable}.yaml", raw)))
