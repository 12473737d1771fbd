"""The fast weights under bf16 autocast (CPU autocast is the same dispatch machinery as CUDA's): the scan computes in
fp32 whatever autocast does around it, and the model contract holds under autocast with bf16 tolerances."""

import json
import os

import pytest
import torch
from conftest import CACHE_KW, DEVICE, FAMILY_ARCHS, script_main, tiny_base
from test_modeling import gen_positions, left_padded_rows, ttt_model
from test_sharding import REPO, _launch
from transformers import DynamicCache

from ttt_adapt import TTTConfig, convert
from ttt_adapt.modeling.ttt_layer import Segments, fast_weight_scan

ARCHS = list(FAMILY_ARCHS)
pytestmark = pytest.mark.usefixtures("one_thread")

# Logits under autocast are bf16 (the head runs in bf16) and here of magnitude < 0.5, where bf16 values are 2^-9 to
# 2^-8 apart (0.002 to 0.004). Two computations of the same logits that only group the same bf16 products
# differently (one call vs. token by token, a row alone vs. in a padded batch) land a few of those steps apart: the
# fp32 fast-weight state itself adds nothing visible. 0.02 is five steps at the top of that range; a state rounded
# to bf16 or tokens read with the wrong chunk's state move logits by 0.05 and more here.
LOGITS_ATOL = 0.02


def autocast():
    return torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16)  # CPU or CUDA autocast: same tolerances


def _scan_inputs(seed=0, N=23, d=6, H=10, chunk=4):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(DEVICE).bfloat16().requires_grad_()
    a = torch.randn(N, d, generator=g).to(DEVICE).bfloat16().requires_grad_()
    w = torch.randn(d, H, generator=g).to(DEVICE).requires_grad_()  # an fp32 master weight, as autocast training has
    seg = Segments.build(torch.tensor([N]), torch.tensor([True]), None, torch.zeros(1, dtype=torch.long), chunk,
                         True, DEVICE)
    return h, a, w, seg


@pytest.mark.parametrize("fused", [False, True])
def test_scan_under_autocast_is_the_scan_without_it(fused):
    """On the same bf16 activations the scan gives the same bits inside autocast as outside: no product of the
    states or updates is autocast to bf16 (forward or backward), and the base product is the one autocast makes."""
    results = []
    for amp in (False, True):
        h, a, w, seg = _scan_inputs()
        with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16, enabled=amp):
            out, final = fast_weight_scan(h, a, seg, weight=w if fused else None)
            base = torch.nn.functional.linear(h, w) if fused and amp else None  # autocast's stock down_proj
            (out.float().square().sum() + final.square().sum()).backward()  # backward inside autocast too
        assert final.dtype == torch.float32
        if fused:
            assert out.dtype == torch.bfloat16  # what the stock down_proj returns under autocast
            if amp:
                assert base.dtype == torch.bfloat16 and torch.equal(out[:4], base[:4])  # the first chunk reads no state
        else:
            assert out.dtype == torch.float32
        results.append([out, final, h.grad, a.grad] + ([w.grad] if fused else []))
    for outside, inside in zip(*results):
        assert inside.dtype == outside.dtype and torch.equal(inside, outside)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("ttt_kw", [{}, {"lr_mode": "token", "target": "input_embed", "clip_update_norm": 0.5}])
def test_forward_backward_on_five_chunks_close_to_fp32(arch, ttt_kw):
    model = ttt_model(arch, chunk_size=4, **ttt_kw).train()
    ids = torch.randint(3, 97, (2, 20)).to(DEVICE)  # 5 chunks a row
    loss32 = model(ids, labels=ids).loss
    loss32.backward()
    grads32 = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with autocast():
        loss16 = model(ids, labels=ids).loss
    loss16.backward()
    assert abs(loss16.item() / loss32.item() - 1) < 0.02  # the acceptance bound
    for n, p in model.named_parameters():
        assert p.grad.dtype == torch.float32 and bool(torch.isfinite(p.grad).all()), n
        if ".ttt." in n and grads32[n].norm() > 0:  # the TTT gradients point where fp32's do (bf16 activations)
            cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), grads32[n].flatten(), dim=0)
            assert cos > 0.98, (n, float(cos))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("ttt_kw", [{}, {"lr_mode": "token", "target": "input_embed"}])
def test_converted_equals_base_at_step_zero_under_autocast(arch, ttt_kw):
    """Exact: every op is the stock one or, in the scan, computed as autocast computes the stock down_proj."""
    base = tiny_base(arch, device=DEVICE)
    ids = torch.randint(3, 97, (2, 37)).to(DEVICE)
    with torch.no_grad(), autocast():
        ref = base(ids).logits
        model = convert(base, TTTConfig(layers=[0, 3], chunk_size=8, **ttt_kw))
        assert torch.equal(model(ids).logits, ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_decoding_equals_full_forward_under_autocast(arch):
    model = ttt_model(arch, chunk_size=4, clip_update_norm=0.5)
    ids = torch.randint(3, 97, (2, 19)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    pos = gen_positions(mask)
    with torch.no_grad(), autocast():
        full = model(ids, attention_mask=mask, position_ids=pos).logits
        cache = DynamicCache(config=model.config)
        kw = {CACHE_KW: cache, "use_cache": True}
        steps = [model(ids[:, :5], attention_mask=mask[:, :5], position_ids=pos[:, :5], **kw).logits]
        for j in range(5, 19):  # across three chunk boundaries: the flush runs under autocast
            steps.append(model(ids[:, j : j + 1], attention_mask=mask[:, : j + 1], position_ids=pos[:, j : j + 1],
                               **kw).logits)
    assert cache.layers[0].ttt_state.S.dtype == torch.float32
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real].float(), full[real].float(), rtol=0, atol=LOGITS_ATOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_and_packed_documents_under_autocast(arch):
    model = ttt_model(arch, chunk_size=4)
    rows, ids, mask = left_padded_rows()
    L = ids.shape[1]
    pos = torch.cat([torch.arange(len(r)).to(DEVICE) for r in rows]).unsqueeze(0)
    with torch.no_grad(), autocast():
        batch = model(ids, attention_mask=mask, position_ids=gen_positions(mask)).logits.float()
        packed = model(torch.cat(rows).unsqueeze(0), position_ids=pos, use_cache=False).logits[0].float()
        start = 0
        for i, r in enumerate(rows):
            alone = model(r.unsqueeze(0)).logits[0].float()
            torch.testing.assert_close(batch[i, L - len(r) :], alone, rtol=0, atol=LOGITS_ATOL)
            torch.testing.assert_close(packed[start : start + len(r)], alone, rtol=0, atol=LOGITS_ATOL)
            start += len(r)


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_and_beam_search_under_autocast(arch):
    """Cached generation works under autocast; beam scores are the full forward's log-probabilities of the beams
    (log-softmax of bf16 logits: the same LOGITS_ATOL per token, 8 tokens summed -> 8x)."""
    model = ttt_model(arch, chunk_size=3)
    ids = torch.randint(3, 97, (2, 4)).to(DEVICE)
    with autocast():
        sampled = model.generate(ids, do_sample=True, num_return_sequences=2, top_k=5, max_new_tokens=9,
                                 pad_token_id=0, eos_token_id=None)
        out = model.generate(
            ids[:1], num_beams=3, num_return_sequences=3, do_sample=False, max_new_tokens=8, pad_token_id=0,
            eos_token_id=None, output_scores=True, return_dict_in_generate=True, length_penalty=0.0,
        )
        with torch.no_grad():
            logp = torch.log_softmax(model(out.sequences).logits.float(), -1)
    assert sampled.shape == (4, 13)
    seq_scores = logp[:, 3:-1].gather(-1, out.sequences[:, 4:, None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(seq_scores, out.sequences_scores.float(), rtol=0, atol=8 * LOGITS_ATOL)


# ---------------------------------------------------------------------------------------------- the training loop
# The tiny recipe, 3 steps of 4 rows of 256 tokens (2 chunks a row), TTT parameters trained: `train.mixed_precision:
# bf16` runs under CPU autocast (Accelerate's, or FSDP2's bf16 policy where we shard), never silently in fp32.

LOOP = ["recipes/tiny_qwen3.yaml", "train.max_steps=3", "train.warmup_steps=1", "train.log_every=1",
        "train.eval_every=3", "train.eval_batches=1", "data.seq_len=256", "eval=null", "export.dir=null"]


def _loop_metrics(run):
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [m["loss"] for m in lines if "loss" in m] + [m["eval_loss"] for m in lines if "eval_loss" in m]


def _close(a, b, rel):
    return len(a) == len(b) == 4 and all(y == pytest.approx(x, rel=rel) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def loop_runs(tmp_path_factory):
    """One process, fp32 and bf16 (4 rows a step as 2 micro-batches of 2), and whether the bf16 run's fast-weight
    scans ran under autocast with bf16 activations."""
    from accelerate.state import AcceleratorState

    from ttt_adapt.modeling import ttt_layer

    root = tmp_path_factory.mktemp("loop")
    adapt = script_main("adapt")
    common = [*LOOP, "train.batch_size=2", "train.grad_accum=2", f"data.cache_dir={root / 'cache'}"]
    seen, scan = set(), ttt_layer.fast_weight_scan

    def record(h, *args, **kwargs):
        seen.add((torch.is_autocast_enabled(h.device.type), h.dtype))  # the loop trains on CUDA where there is one
        return scan(h, *args, **kwargs)

    cwd = os.getcwd()
    os.chdir(REPO)
    ttt_layer.fast_weight_scan = record
    try:
        assert adapt([*common, f"train.output_dir={root / 'fp32'}"]) == 0
        fp32_seen = set(seen)
        seen.clear()
        AcceleratorState._reset_state(reset_partial_state=True)  # one process, two mixed-precision settings
        assert adapt([*common, "train.mixed_precision=bf16", f"train.output_dir={root / 'bf16'}"]) == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # the next in-process run sets its own
        ttt_layer.fast_weight_scan = scan
        os.chdir(cwd)
    return {"root": root, "fp32": _loop_metrics(root / "fp32"), "bf16": _loop_metrics(root / "bf16"),
            "seen": {"fp32": fp32_seen, "bf16": set(seen)}}


@pytest.mark.timeout(600)
def test_one_process_trains_under_bf16_autocast(loop_runs):
    assert loop_runs["seen"]["fp32"] == {(False, torch.float32)}
    assert loop_runs["seen"]["bf16"] == {(True, torch.bfloat16)}  # training and the eval loss, under autocast
    fp32, bf16 = loop_runs["fp32"], loop_runs["bf16"]
    assert bf16 != fp32 and _close(fp32, bf16, rel=0.02)  # bf16 applied, and within the acceptance bound


def _launch_bf16(loop_runs, name, *args):
    run = _launch(*LOOP, "train.mixed_precision=bf16", f"data.cache_dir={loop_runs['root'] / 'cache'}",
                  f"train.output_dir={loop_runs['root'] / name}", *args)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "bf16 autocast runs" in run.stdout
    return run, _loop_metrics(loop_runs["root"] / name)


@pytest.mark.timeout(600)
def test_ddp_on_two_processes_under_bf16_autocast_matches_one_process(loop_runs):
    """The same rows, each computed alone in bf16 as in one process; only the gradients' all-reduce sums in another
    order (fp32), which can flip a bf16 rounding later on: 1e-3 relative is far below bf16's 4e-3 step."""
    run, two = _launch_bf16(loop_runs, "ddp", "train.batch_size=2")
    assert "on 2 process(es)" in run.stdout
    assert two != loop_runs["fp32"] and _close(loop_runs["bf16"], two, rel=1e-3)


@pytest.mark.timeout(600)
def test_fsdp_on_two_processes_with_its_bf16_policy(loop_runs):
    """FSDP2 gathers the weights in bf16 (no autocast: the whole layer computes in bf16, norms included), so it is
    compared with fp32 by the acceptance bound, and must differ from it (the policy is applied)."""
    run, two = _launch_bf16(loop_runs, "fsdp", "train.batch_size=2", "parallel.fsdp=true")
    assert "weights sharded over all 2 (FSDP2, parallel.fsdp)" in run.stdout
    assert two != loop_runs["fp32"] and _close(loop_runs["fp32"], two, rel=0.02)


@pytest.mark.timeout(600)
def test_context_parallel_on_two_ranks_under_bf16_autocast_matches_one_process(loop_runs):
    """Each row split over 2 ranks, the fast weights carried across them in fp32: the one-process bf16 losses up to
    bf16 attention computed in other blocks (all-gathered keys, blocked SDPA): within 2e-3 relative."""
    run, two = _launch_bf16(loop_runs, "cp", "train.batch_size=2", "train.grad_accum=2", "parallel.cp_size=2")
    assert "(1 data-parallel x 2 context-parallel)" in run.stdout
    assert two != loop_runs["fp32"] and _close(loop_runs["bf16"], two, rel=2e-3)


@pytest.mark.skipif(torch.accelerator.is_available(), reason="fp16 runs on an accelerator")
def test_fp16_on_cpu_is_refused_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert script_main("adapt")([*LOOP, "train.mixed_precision=fp16", f"train.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("adapt.py: error: train.mixed_precision: fp16 needs a GPU (CPU autocast has no fp16 gradient "
                   "scaler); use bf16 or no")


@pytest.mark.skipif(torch.accelerator.is_available(), reason="flex attention trains on an accelerator")
def test_flex_attention_on_cpu_is_refused_with_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    assert script_main("adapt")([*LOOP, "model.attn_implementation=flex_attention", f"train.output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("adapt.py: error: model.attn_implementation: flex_attention cannot train on CPU (torch has no flex "
                   "attention backward there); use sdpa (packed rows then run as ttt_packed) or train on a GPU")
    assert not out.exists()
