"""The blocked linear + cross-entropy loss equals the plain one (float64), gradients included, without full logits."""

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, LargestTensor, cpu_only, randomize_ttt, tiny_base
from ttt_adapt import TTTConfig, convert
from ttt_adapt.loss import causal_lm_loss_sum, linear_cross_entropy

IGNORE = -100


def _plain(hidden, weight, labels, bias=None):
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE, reduction="sum")


def _inputs(n=23, d=6, V=11, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, n, d, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    weight = torch.randn(V, d, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    b = torch.randn(V, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_() if bias else None
    labels = torch.randint(0, V, (2, n), generator=g)
    labels[torch.rand(2, n, generator=g) < 0.3] = IGNORE
    labels[0, 0] = IGNORE
    return hidden, weight, b, labels.to(DEVICE)


def _grads(loss, tensors):
    return torch.autograd.grad(loss * 1.7, [t for t in tensors if t is not None])  # a non-unit upstream gradient


@pytest.mark.parametrize("block", [1, 5, 7, 46, 1000])  # 7 does not divide the 32 labelled tokens
@pytest.mark.parametrize("bias", [True, False])
def test_blocked_loss_and_every_gradient_equal_the_plain_computation(block, bias):
    hidden, weight, b, labels = _inputs(bias=bias)
    ref = _plain(hidden, weight, labels, b)
    out = linear_cross_entropy(hidden, weight, labels, b, block_size=block, backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(_grads(out, (hidden, weight, b)), _grads(ref, (hidden, weight, b))):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("block", [3, 1000])
def test_softcapped_logits_loss_and_every_gradient_equal_the_plain_computation(block):
    """Gemma's final_logit_softcapping: logits = cap * tanh(logits / cap) before the cross-entropy."""
    hidden, weight, b, labels = _inputs()
    hidden, weight = (hidden * 4).detach().requires_grad_(), (weight * 4).detach().requires_grad_()  # tanh saturates
    cap = 3.0
    logits = torch.tanh(F.linear(hidden, weight, b) / cap) * cap
    ref = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    out = linear_cross_entropy(hidden, weight, labels, b, block_size=block, backend="torch", softcap=cap)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(_grads(out, (hidden, weight, b)), _grads(ref, (hidden, weight, b))):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_gemma3_model_loss_applies_its_final_logit_softcapping():
    base = tiny_base("gemma3", final_logit_softcapping=0.5, device=DEVICE)
    model = randomize_ttt(convert(base, TTTConfig(layers=[1], chunk_size=4)))
    model = model.double()
    ids = torch.randint(3, 97, (1, 13)).to(DEVICE)
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), IGNORE).to(DEVICE)], 1)
    logits = model(ids).logits
    ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    out = causal_lm_loss_sum(model, labels, input_ids=ids)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_all_ignored_gives_zero_loss_and_zero_gradients():
    hidden, weight, b, labels = _inputs()
    labels[:] = IGNORE
    out = linear_cross_entropy(hidden, weight, labels, b, block_size=4)
    assert out.item() == 0.0
    for g in _grads(out, (hidden, weight, b)):
        assert g.abs().sum() == 0


def test_only_the_inputs_that_need_it_get_gradients_and_no_grad_computes_none():
    hidden, weight, b, labels = _inputs()
    frozen = weight.detach()
    out = linear_cross_entropy(hidden, frozen, labels, None, block_size=3)
    (gh,) = torch.autograd.grad(out, [hidden])
    (rh,) = torch.autograd.grad(_plain(hidden, frozen, labels), [hidden])
    torch.testing.assert_close(gh, rh, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        value = linear_cross_entropy(hidden, weight, labels, b, block_size=3)
    assert not value.requires_grad
    torch.testing.assert_close(value, _plain(hidden, weight, labels, b).detach(), rtol=1e-12, atol=1e-12)


def test_bad_labels_and_shapes_are_refused():
    hidden, weight, b, labels = _inputs()
    with pytest.raises(ValueError, match="disagree"):
        linear_cross_entropy(hidden, weight, labels[:, 1:])
    labels[0, 3] = weight.shape[0]
    with pytest.raises(IndexError, match="labels must be in"):
        linear_cross_entropy(hidden, weight, labels)



def test_no_tensor_grows_with_tokens_times_vocabulary():
    g = torch.Generator().manual_seed(0)
    N, d, V = 512, 8, 1000
    hidden = torch.randn(N, d, generator=g).to(DEVICE).requires_grad_()
    weight = torch.randn(V, d, generator=g).to(DEVICE).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    with LargestTensor() as mode:
        linear_cross_entropy(hidden, weight, labels, block_size=32).backward()
    assert mode.largest <= 32 * V, mode.largest  # one block of logits, never N x V
    with LargestTensor() as plain:
        _plain(hidden, weight, labels).backward()
    assert plain.largest >= N * V  # the check can see full logits


def _ttt_lm(tie):
    from ttt_adapt import TTTConfig, convert

    model = convert(tiny_base(tie=tie, device=DEVICE).double(), TTTConfig(layers=[0, 2], chunk_size=4))
    return randomize_ttt(model).double().train()


def _plain_lm_loss(model, ids, labels, pos):
    logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 97, (2, 24), generator=g)
    pos = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, 24)
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), IGNORE)], 1)
    labels[:, 9] = IGNORE
    return ids.to(DEVICE), labels.to(DEVICE), pos.to(DEVICE)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("lora", [False, True])
def test_model_loss_equals_full_logits_loss_with_every_gradient(tie, lora):
    """Through the model (peft-wrapped or not): tied embeddings get the head's gradient as well."""
    ids, labels, pos = _batch()
    ref_model, model = _ttt_lm(tie), _ttt_lm(tie)
    if lora:
        from peft import LoraConfig, get_peft_model

        cfg = dict(r=2, target_modules=["q_proj"], modules_to_save=["ttt"], init_lora_weights=False)
        ref_model, model = (get_peft_model(m, LoraConfig(**cfg)).double() for m in (ref_model, model))
        model.load_state_dict(ref_model.state_dict())
    ref = _plain_lm_loss(ref_model, ids, labels, pos)
    ref.backward()
    out = causal_lm_loss_sum(model, labels, block_size=5, input_ids=ids, position_ids=pos, use_cache=False)
    out.backward()
    torch.testing.assert_close(out, ref.detach(), rtol=1e-12, atol=1e-10)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    ref_grads = {n: p.grad for n, p in ref_model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and any("embed_tokens" in n for n in grads) != lora  # peft freezes it
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-10, atol=1e-12, msg=n)


@cpu_only("a gloo process group: multi-process tests stay on CPU")
def test_ddp_wrapped_model_trains_through_its_own_forward(tmp_path):
    """DDP (1 gloo process): the loss runs inside DDP's forward, so gradient sync sees every parameter, twice."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    ids, labels, pos = _batch()
    ref_model, model = _ttt_lm(False), _ttt_lm(False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        for _ in range(2):  # a reducer left unfinished by the first step would raise in the second
            for p in list(model.parameters()) + list(ref_model.parameters()):
                p.grad = None
            causal_lm_loss_sum(ddp, labels, input_ids=ids, position_ids=pos, use_cache=False).backward()
            _plain_lm_loss(ref_model, ids, labels, pos).backward()
            for (n, p), r in zip(model.named_parameters(), ref_model.parameters()):
                torch.testing.assert_close(p.grad, r.grad, rtol=1e-10, atol=1e-12, msg=n)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.device(DEVICE).type != "cuda", reason="Liger-Kernel runs on CUDA only (pytest --device cuda)")
def test_liger_kernel_loss_and_gradients_close_to_the_blocked_loss(device):
    """Where Liger-Kernel is installed, `backend="auto"` on CUDA is its fused kernel: the same loss and gradients as
    our blocked loss, under bf16 autocast (bf16 logits: 1e-2 relative)."""
    from ttt_adapt.loss import _liger

    if _liger() is None:
        pytest.skip("liger-kernel is not installed (pip install ttt-adapt[liger])")
    g = torch.Generator().manual_seed(0)
    N, d, V = 300, 64, 1000
    hidden = torch.randn(N, d, generator=g).to(device).requires_grad_()
    weight = (torch.randn(V, d, generator=g) * 0.1).to(device).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::7] = IGNORE
    labels = labels.to(device)
    results = []
    for backend in ("torch", "auto"):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = linear_cross_entropy(hidden, weight, labels, backend=backend)
        results.append((loss.detach().float(), *torch.autograd.grad(loss, [hidden, weight])))
    for ours, liger in zip(*results):
        torch.testing.assert_close(liger.float(), ours.float(), rtol=1e-2, atol=1e-3)
