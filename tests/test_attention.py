"""`ttt_packed` attention: packed rows in query blocks equal transformers' dense-mask SDPA and each document alone."""

import pytest
import torch

import ttt_adapt.attention as attention
from conftest import DEVICE, LargestTensor, randomize_ttt, tiny_base

SLIDING = dict(use_sliding_window=True, sliding_window=5, max_window_layers=2)
DOCS = [[9, 17, 14], [20, 20], [40]]


def _model(arch="qwen3", **base):
    from ttt_adapt import TTTConfig, convert

    model = convert(tiny_base(arch, **base).double(), TTTConfig(layers=[0, 2], chunk_size=4))
    return randomize_ttt(model).double().train().to(DEVICE)


def _packed(docs_per_row=DOCS, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = sum(docs_per_row[0])
    ids = torch.randint(3, 97, (len(docs_per_row), L), generator=g)
    pos = torch.stack([torch.cat([torch.arange(n) for n in docs]) for docs in docs_per_row])
    return ids.to(DEVICE), pos.to(DEVICE)


@pytest.mark.parametrize("arch,base", [("qwen3", {}), ("qwen3", SLIDING), ("llama", {})])
def test_packed_rows_in_blocks_equal_dense_mask_sdpa_and_each_document_alone(arch, base, monkeypatch):
    monkeypatch.setattr(attention, "QUERY_BLOCK", 7)  # blocks that cut documents and chunks everywhere
    ids, pos = _packed()
    ref_model, model = _model(arch, **base), _model(arch, **base)
    attention.use_packed_attention(model)
    w = torch.randn(*ids.shape, 97, dtype=torch.float64).to(DEVICE)
    ref = ref_model(ids, position_ids=pos, use_cache=False).logits
    out = model(ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    (ref * w).sum().backward()
    (out * w).sum().backward()
    for (n, p), r in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-9, atol=1e-10, msg=n)
    with torch.no_grad():
        for b, docs in enumerate(DOCS):
            start = 0
            for n in docs:
                alone = model(ids[b : b + 1, start : start + n], use_cache=False).logits[0]
                torch.testing.assert_close(out[b, start : start + n].detach(), alone, rtol=1e-10, atol=1e-10)
                start += n



def test_no_mask_grows_with_length_squared(monkeypatch):
    monkeypatch.setattr(attention, "QUERY_BLOCK", 16)
    ids, pos = _packed([[100, 60, 96]])
    L = ids.shape[1]
    model = _model(**SLIDING)
    with torch.no_grad(), LargestTensor(torch.bool) as dense:
        model(ids, position_ids=pos, use_cache=False)
    assert dense.largest >= L * L  # the check sees transformers' (1, 1, L, L) mask
    attention.use_packed_attention(model)
    with torch.no_grad(), LargestTensor(torch.bool) as blocked:
        model(ids, position_ids=pos, use_cache=False)
    assert blocked.largest <= 16 * L, blocked.largest


def test_generation_and_padded_batches_are_unchanged(monkeypatch):
    """With a cache or a padding mask the attention is transformers' SDPA with its own mask."""
    monkeypatch.setattr(attention, "QUERY_BLOCK", 5)
    ids, _ = _packed()
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # left padding
    ref_model, model = _model(**SLIDING).eval(), _model(**SLIDING).eval()
    attention.use_packed_attention(model)
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            a = ref_model.generate(ids[:, :14], max_new_tokens=6, do_sample=False, **{
                k: v[:, :14] for k, v in kwargs.items()})
            b = model.generate(ids[:, :14], max_new_tokens=6, do_sample=False, **{k: v[:, :14] for k, v in kwargs.items()})
            assert torch.equal(a, b)
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, ref_model(ids, attention_mask=mask).logits,
                                   rtol=1e-10, atol=1e-10)


def test_flex_attention_forward_equals_ttt_packed_on_packed_rows_with_sliding_windows():
    """transformers' `flex_attention` (a sparse BlockMask from the restarting positions) isolates the packed
    documents and honours the sliding windows as `ttt_packed` does; fp32 (flex takes no float64 on CPU), 1e-5 on
    every device. Forward only: torch has no flex backward on CPU (training with it is refused there, preflight)."""
    ids, pos = _packed()
    packed, flex = _model(**SLIDING).float().eval(), _model(**SLIDING).float().eval()
    attention.use_packed_attention(packed)
    flex.set_attn_implementation("flex_attention")
    with torch.no_grad():
        ref = packed(ids, position_ids=pos, use_cache=False).logits
        out = flex(ids, position_ids=pos, use_cache=False).logits
        unpacked = flex(ids, use_cache=False).logits  # the same rows read as one document each
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (unpacked - ref).abs().max() > 1e-2  # the documents really are isolated, not one causal row
