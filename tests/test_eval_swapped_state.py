"""The swapped-state control: a document read with another document's fast weights, chunk for chunk, equals a
token-by-token reference; no state equals a model whose fast weights are never written; rows reading their own
state equal the plain forward; pairing and the bootstrap interval."""

import copy

import pytest
import torch
from conftest import DEVICE, randomize_ttt

from ttt_adapt import TTTConfig, convert
from ttt_adapt.eval import bootstrap_difference, fast_weight_sources, swap_partners

pytestmark = pytest.mark.usefixtures("one_thread")
CHUNK = 8


def ttt_model(tiny, target="hidden_states", clip=None):
    config = TTTConfig(layers=[0, 2], chunk_size=CHUNK, target=target, clip_update_norm=clip, lr_init=0.5)
    return randomize_ttt(convert(tiny(layers=3, device=DEVICE).double(), config), scale=0.3).eval()


def naive_swapped_logits(model, a_ids, b_ids):
    """Logits of document `a_ids` when chunk c of every TTT layer reads W_down + sum_{c' < c} dW_c' of document
    `b_ids`: b's updates computed token by token from b's own forward (no Segments, no scan, no chunked conv)."""
    mlps = model.model.ttt_modules()
    inputs = {}
    hooks = [m.register_forward_hook(lambda m, args, out, i=i: inputs.__setitem__(i, args[0][0])) for i, m in mlps.items()]
    model(input_ids=b_ids, use_cache=False)
    for hook in hooks:
        hook.remove()
    embeds = model.model.embed_tokens(b_ids)[0]
    states = {i: prefix_states(m, inputs[i], embeds if m.target == "input_embed" else inputs[i]) for i, m in mlps.items()}

    def read_b(m, args, out):
        x = args[0][0]
        h = m.act_fn(m.gate_proj(x)) * m.up_proj(x)
        S = states[m.layer_idx]
        return torch.stack([(m.down_proj.weight + S[j // CHUNK]) @ h[j] for j in range(len(h))]).unsqueeze(0)

    hooks = [m.register_forward_hook(read_b) for m in mlps.values()]
    try:
        return model(input_ids=a_ids, use_cache=False).logits
    finally:
        for hook in hooks:
            hook.remove()


def prefix_states(m, x, t):
    """[sum_{c' < c} dW_c' for c = 0, 1, ...] with dW_c = sum_{i in c} a_i h_i^T, a = lr * W_target conv(t)."""
    h = m.act_fn(m.gate_proj(x)) * m.up_proj(x)
    w = m.ttt.conv.weight[:, 0, :]
    k, p = w.shape[1], w.shape[1] // 2
    S = [torch.zeros(w.shape[0], h.shape[1], dtype=h.dtype, device=h.device)]
    for c0 in range(0, len(x), CHUNK):
        n = min(CHUNK, len(x) - c0)
        update = torch.zeros_like(S[0])
        for j in range(n):
            v = sum(w[:, q] * t[c0 + j + q - p] for q in range(k) if 0 <= j + q - p < n)
            a = m.ttt.lr * m.ttt.target_proj(v)
            update += torch.outer(a, h[c0 + j])
        if m.clip_update_norm is not None:
            update = update * torch.clamp(m.clip_update_norm / (torch.linalg.matrix_norm(update) + 1e-6), max=1.0)
        S.append(S[-1] + update)
    return S


@pytest.mark.parametrize("target,clip", [("hidden_states", None), ("input_embed", 0.05)])
def test_swapped_state_equals_token_by_token_reference(tiny, target, clip):
    model = ttt_model(tiny, target, clip)
    g = torch.Generator().manual_seed(0)
    a = torch.randint(3, 97, (1, 37), generator=g).to(DEVICE)  # chunks of 8: 4 full, one partial
    b = torch.randint(3, 97, (1, 45), generator=g).to(DEVICE)  # longer: read up to a's length
    c = torch.randint(3, 97, (1, 37), generator=g).to(DEVICE)
    ids = torch.zeros(4, 45, dtype=torch.long).to(DEVICE)
    mask = torch.zeros(4, 45, dtype=torch.long).to(DEVICE)
    for row, doc in enumerate([a, b, c, b]):
        ids[row, : doc.shape[1]], mask[row, : doc.shape[1]] = doc[0], 1
    mask[3, 37:] = 0  # b cut to a's length: still the same fast weights for a's chunks
    with torch.no_grad(), fast_weight_sources(model, [3, 1, 1, 3]):  # a reads b (cut), c reads b, b and b-cut own
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        again = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    with torch.no_grad():
        expected_a = naive_swapped_logits(model, a, b)
        expected_c = naive_swapped_logits(model, c, b)
        own = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(logits[0, :37], expected_a[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(logits[2, :37], expected_c[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(logits[1], own[1], rtol=0, atol=1e-12)  # rows reading their own state are untouched
    assert not torch.allclose(logits[0, :37], own[0, :37])  # the state matters in this model
    torch.testing.assert_close(logits[0, :CHUNK], own[0, :CHUNK], rtol=0, atol=1e-12)  # the first chunk reads nothing
    torch.testing.assert_close(again, logits, rtol=0, atol=0)  # the hooks stay for every forward inside


def test_no_state_equals_fast_weights_never_written(tiny):
    model = ttt_model(tiny)
    silent = copy.deepcopy(model)
    for m in silent.model.ttt_modules().values():
        m.ttt.lr.data.zero_()
    ids = torch.randint(3, 97, (2, 29), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        with fast_weight_sources(model, None):
            none = model(input_ids=ids, use_cache=False).logits
        expected = silent(input_ids=ids, use_cache=False).logits
        own = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(none, expected, rtol=0, atol=1e-12)
    assert not torch.allclose(none, own)
    with fast_weight_sources(model, [1, 1]), pytest.raises(RuntimeError, match="at least as long"):
        model(input_ids=ids, attention_mask=torch.tensor([[1] * 29, [1] * 20 + [0] * 9]).to(DEVICE), use_cache=False)


def test_swap_partners_read_a_document_at_least_as_long():
    assert swap_partners([5, 5, 5]) == [1, 0, 1]
    assert swap_partners([3, 7, 5, 7]) == [2, 3, 3, 1]
    assert swap_partners([9, 4]) == [None, 0]
    assert swap_partners([4]) == [None]
    for lengths in ([5, 5, 5], [3, 7, 5, 7], [9, 4, 4, 1]):
        for i, p in enumerate(swap_partners(lengths)):
            assert p is None or (p != i and lengths[p] >= lengths[i])


def test_bootstrap_difference_interval():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 6, generator=g) - 1.0
    b = torch.randn(40, 6, generator=g)
    weights = torch.ones(40, 6, dtype=torch.bool)
    weights[:, 0] = False
    weights[::2, 5] = False
    edges = [0, 1, 3, 6]
    out = bootstrap_difference(a, b, weights, edges)
    assert out[0] is None  # no tokens
    for d, (lo, hi) in zip(out[1:], [(1, 3), (3, 6)]):
        w = weights[:, lo:hi].double()
        assert d["mean"] == pytest.approx(float(((a - b)[:, lo:hi] * w).sum() / w.sum()))
        assert d["low"] < d["mean"] < d["high"] < 0  # a is 1 lower: the interval excludes 0
    same = bootstrap_difference(b, b, weights, edges)
    assert all(d["mean"] == d["low"] == d["high"] == 0 for d in same[1:])
    assert bootstrap_difference(a[:1], b[:1], weights[:1], edges) == [None] * 3
    assert bootstrap_difference(a, b, weights, edges) == out  # seeded
