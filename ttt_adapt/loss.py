"""Next-token loss without the full logits: `lm_head` + cross-entropy in blocks of tokens.

The logits of a row are tokens x vocabulary (4096 x 151,936 fp32 = 2.5 GB, and autograd keeps several copies);
here only one block of them exists at a time. `linear_cross_entropy` takes the final hidden states, the output
embedding and the labels and returns the summed loss; `causal_lm_loss_sum` runs a (possibly DDP/FSDP/peft
wrapped) causal LM and computes that loss inside its forward.

The gradients are computed block by block during the forward pass (the logits of a block are needed for them
anyway; Liger-Kernel's fused kernel does the same), scaled by the incoming gradient in backward: one pass over
the logits instead of the two a recomputing backward makes. Log-softmax is fp32 (or wider), the logits' matmul runs
in the autocast dtype when autocast is on. On CUDA, Liger-Kernel's fused linear cross-entropy is used when it is
installed (`pip install ttt-adapt[liger]`); it is never required.

Training and the eval loss call `shift_labels` on a batch of packed rows (position i then holds the label of
token i+1, the loss shifts no further), optionally shard it (`ttt_adapt.distributed.context_parallel`) and take
`loss_sum` of it, with or without a context-parallel shard.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
BLOCK_ELEMENTS = 2**25  # logits per block: 128 MiB in fp32, whatever the vocabulary


def block_tokens(vocab_size: int) -> int:
    """Tokens per block for a vocabulary: BLOCK_ELEMENTS logits, at least 16 tokens."""
    return max(16, BLOCK_ELEMENTS // max(1, vocab_size))


def linear_cross_entropy(hidden, weight, labels, bias=None, ignore_index=IGNORE_INDEX, block_size=None,
                         backend="auto", softcap=None) -> torch.Tensor:
    """Sum over tokens of cross_entropy(hidden @ weight.T + bias, labels), tokens labelled `ignore_index` skipped.

    `softcap`: the logits are `softcap * tanh(logits / softcap)` first (Gemma's `final_logit_softcapping`).

    Equals `F.cross_entropy(F.linear(hidden, weight, bias).float(), labels, reduction="sum")` without holding the
    logits. `hidden` (..., d), `labels` (...) with the same leading shape, `weight` (V, d). `block_size`: tokens
    per block (default: `block_tokens(V)`). `backend`: "auto" (Liger-Kernel on CUDA when installed), "torch".
    """
    if backend not in ("auto", "torch"):
        raise ValueError(f"backend must be 'auto' or 'torch', got {backend!r}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree on the tokens")
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    block = block_size or block_tokens(weight.shape[0])
    if block < 1:
        raise ValueError(f"block_size must be >= 1, got {block}")
    device = hidden.device.type
    autocast = torch.is_autocast_enabled(device)
    compute = torch.get_autocast_dtype(device) if autocast else torch.promote_types(hidden.dtype, weight.dtype)
    if backend == "auto" and hidden.is_cuda and _liger() is not None and softcap is None:
        return _liger()(ignore_index=ignore_index, reduction="sum")(
            weight.to(compute), hidden.to(compute), labels, None if bias is None else bias.to(compute)
        ).float()
    # gradients only where autograd would want them (none under no_grad, e.g. the eval loss)
    needs = [torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
        return _LinearCrossEntropy.apply(hidden, weight, bias, labels, block, ignore_index, compute, needs, softcap)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed loss, with the gradients of the inputs that need one computed per block in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, block, ignore_index, compute, needs, softcap=None):
        acc = torch.promote_types(compute, torch.float32)
        rows = torch.nonzero(labels != ignore_index).flatten()  # only labelled tokens cost anything
        h, y = hidden.index_select(0, rows), labels.index_select(0, rows)
        if bool(((y < 0) | (y >= weight.shape[0])).any()):
            raise IndexError(f"labels must be in [0, {weight.shape[0]}) or {ignore_index}")
        w = weight.to(compute)
        b = None if bias is None else bias.to(compute)
        need_h, need_w, need_b = needs
        grad_h = torch.empty(h.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for s in range(0, h.shape[0], block):
            hb, yb = h[s : s + block].to(compute), y[s : s + block]
            logits = F.linear(hb, w, b).to(acc)
            if softcap is not None:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, yb[:, None]).squeeze(1)).sum()
            if not (need_h or need_w or need_b):
                continue
            # d loss / d logits = softmax - one_hot(label), in place of the logits
            probs = logits.sub_(lse[:, None]).exp_()
            probs[torch.arange(len(yb), device=yb.device), yb] -= 1
            if softcap is not None:  # d(softcap * tanh(z / softcap)) / dz = 1 - tanh^2
                probs *= 1 - capped.square()
            d = probs.to(compute)
            if need_h:
                grad_h[s : s + block] = (d @ w).to(hidden.dtype)
            if need_w:
                grad_w += (d.T @ hb).to(acc)
            if need_b:
                grad_b += d.sum(0).to(acc)
            del logits, probs, d
        ctx.save_for_backward(rows, grad_h, grad_w, grad_b)
        ctx.shapes = (hidden.shape, hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        rows, grad_h, grad_w, grad_b = ctx.saved_tensors
        hidden_shape, hidden_dtype, weight_dtype, bias_dtype = ctx.shapes
        out_h = out_w = out_b = None
        if grad_h is not None:
            out_h = torch.zeros(hidden_shape, dtype=hidden_dtype, device=grad_h.device)
            out_h.index_copy_(0, rows, grad_h * grad_total.to(hidden_dtype))
        if grad_w is not None:
            out_w = (grad_w * grad_total).to(weight_dtype)
        if grad_b is not None:
            out_b = (grad_b * grad_total).to(bias_dtype)
        return out_h, out_w, out_b, None, None, None, None, None, None


def causal_lm_loss_sum(model, labels, block_size=None, **inputs) -> torch.Tensor:
    """Summed next-token loss of `model(**inputs)` against `labels` (already aligned with the tokens: position i
    holds the label of token i+1), without full logits.

    `model` may be wrapped (DDP, FSDP, Accelerate, peft). It is called as a whole, so the wrappers' forward
    machinery (DDP's gradient-sync bookkeeping, FSDP's parameter gathering, autocast) runs as usual; a forward
    pre-hook on the output embedding computes the loss from the final hidden states inside that call and hands
    the layer an empty slice, so no logits are made. An output embedding that is not a plain `nn.Linear` (e.g.
    LoRA on `lm_head`) gets the plain full-logits loss.
    """
    causal_lm = unwrap_causal_lm(model)
    head = causal_lm.get_output_embeddings()
    if type(head) is not nn.Linear:
        logits = model(**inputs).logits
        logits = logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits, labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    # the head's output transform the model applies after lm_head (Gemma 2/3: final logit softcapping)
    softcap = getattr(causal_lm.config, "final_logit_softcapping", None)
    found = []

    def hook(module, args):
        (hidden,) = args
        found.append(linear_cross_entropy(hidden, module.weight, labels, module.bias, block_size=block_size,
                                          softcap=softcap))
        return (hidden[..., :0, :],)

    handle = head.register_forward_pre_hook(hook)
    try:
        out = model(**inputs)
    finally:
        handle.remove()
    if len(found) != 1:
        raise RuntimeError(f"the output embedding ran {len(found)} times in one forward; expected once")
    # + the (empty) logits' sum, exactly 0: backward then starts from the model's own output, so the hooks
    # wrappers put on it (FSDP2's pre-backward) run as they would for the plain loss.
    return found[0] + out.logits.sum().to(found[0].dtype)


def shift_labels(batch: dict) -> dict:
    """`batch` with its `labels` shifted left by one (position i holds the label of token i+1; the last position
    none), so that the loss, and any split of the rows into shards, needs no further shift."""
    out = dict(batch)
    if out.get("labels") is not None:
        labels = out["labels"]
        out["labels"] = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], 1)
    return out


def loss_sum(model, batch: dict, cp_shard=None) -> torch.Tensor:
    """Sum of next-token losses over a batch of packed rows (`batch` from `shift_labels`; with context
    parallelism this rank's part of it and its `cp_shard`).

    No attention mask: with restarting position_ids transformers (and the CP mask) keep packed documents apart,
    and the TTT layers restart their fast weights at each document; trailing padding is a document of its own.
    """
    extra = {} if cp_shard is None else {"cp_shard": cp_shard}
    return causal_lm_loss_sum(model, batch["labels"], input_ids=batch["input_ids"],
                              position_ids=batch.get("position_ids"), use_cache=False, **extra)


def unwrap_causal_lm(model):
    """The transformers model inside DDP/FSDP (`.module`) and peft (`get_base_model()`) wrappers."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module) and not hasattr(model, "get_output_embeddings"):
            model = model.module
        else:
            return model


_LIGER = []


def _liger():
    """Liger-Kernel's `LigerFusedLinearCrossEntropyLoss` class, or None when it is not installed."""
    if not _LIGER:
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            LigerFusedLinearCrossEntropyLoss = None
        _LIGER.append(LigerFusedLinearCrossEntropyLoss)
    return _LIGER[0]


__all__ = ["linear_cross_entropy", "causal_lm_loss_sum", "shift_labels", "loss_sum", "unwrap_causal_lm", "block_tokens", "IGNORE_INDEX"]
