"""The TTT math against plain re-derivations: a per-token naive loop and the published chunk algorithm."""

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_ttt, tiny_base

from ttt_adapt import TTTConfig, convert
from ttt_adapt.modeling.ttt_layer import Segments, TTTContext, fast_weight_scan


def naive_ttt_mlp(mlp, x, t, doc_lengths, chunk_size, clip=None, decay=None, key_norm=False, delta_rule=False):
    """Token-by-token reference for one row: documents of `doc_lengths` tokens, one after the other; with `decay`,
    the state before each chunk's update is multiplied by it; `key_norm`: the fast weight's key is h / ||h||;
    `delta_rule`: after the chunk's decay, its tokens write one after another S += lr * (v - S k) k^T, S the state
    as the previous token left it (the clip bounds the written targets lr * v k^T)."""
    W = mlp.down_proj.weight.double()
    conv_w = mlp.ttt.conv.weight.double()[:, 0, :]  # (d, k)
    k = conv_w.shape[1]
    p = k // 2
    Wt = mlp.ttt.target_proj.weight.double() if mlp.ttt.target_proj is not None else None
    lr = mlp.ttt.lr.double() * mlp.ttt.lr_scale.double()
    x, t = x.double(), t.double()
    h = mlp.act_fn(x @ mlp.gate_proj.weight.double().T) * (x @ mlp.up_proj.weight.double().T)
    key = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-6) if key_norm else h
    out = torch.zeros(x.shape[0], W.shape[0], dtype=torch.float64)
    start = 0
    for n in doc_lengths:
        delta = torch.zeros_like(W)
        for c0 in range(0, n, chunk_size):
            idx = list(range(start + c0, start + min(c0 + chunk_size, n)))
            for j in idx:  # read: base weight plus the updates of earlier chunks of this document
                out[j] = W @ h[j] + delta @ key[j]
            update = torch.zeros_like(W)
            targets = []
            for i in idx:  # write: centred conv inside the chunk, zero outside it
                v = torch.zeros(W.shape[0], dtype=torch.float64)
                for m in range(k):
                    src = i + m - p
                    if idx[0] <= src <= idx[-1]:
                        v += conv_w[:, m] * t[src]
                if Wt is not None:
                    v = Wt @ v
                lr_i = lr
                if mlp.ttt.lr_gate is not None:
                    g = mlp.ttt.lr_gate.weight.double() @ x[i] + mlp.ttt.lr_gate.bias.double()
                    lr_i = lr * 2 * torch.sigmoid(g)
                update += lr_i * torch.outer(v, key[i])
                targets.append((i, lr_i * v, lr_i))
            scale = 1.0
            if clip is not None:
                scale = torch.clamp(clip / (torch.linalg.matrix_norm(update) + 1e-6), max=1.0)
            delta = delta if decay is None else decay * delta
            if not delta_rule:
                delta = delta + update * scale
                continue
            for i, target, lr_i in targets:  # token after token: the error of what the state returns
                delta = delta + torch.outer(target * scale - lr_i * (delta @ key[i]), key[i])
        start += n
    return out


def published_ttt_mlp(mlp, x, chunk_size):
    """The published algorithm (batch, no documents): per-chunk conv via reshape into the batch, target
    `conv(t) @ W_target` with their orientation, per-chunk updates materialised, exclusive cumsum."""
    B, L, d = x.shape
    C = chunk_size
    n = -(-L // C)
    pad = n * C - L
    h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    t = F.pad(x, (0, 0, 0, pad))
    hp = F.pad(h, (0, 0, 0, pad))
    chunks = t.reshape(B * n, C, d).transpose(1, 2)
    k = mlp.ttt.conv.weight.shape[-1]
    v = F.conv1d(chunks, mlp.ttt.conv.weight, padding=k // 2, groups=d).transpose(1, 2)
    W_target_published = mlp.ttt.target_proj.weight.T  # their stored matrix; ours is its nn.Linear transpose
    v = (v @ W_target_published).reshape(B, n, C, d)
    dW = mlp.ttt.lr * torch.einsum("bncd,bnch->bndh", v, hp.reshape(B, n, C, -1))
    prefix = torch.cumsum(dW, dim=1) - dW
    W = mlp.down_proj.weight + prefix  # (B, n, d, H)
    y = torch.einsum("bnch,bndh->bncd", hp.reshape(B, n, C, -1), W).reshape(B, n * C, d)
    return y[:, :L]


def _ttt_model(arch="qwen3", **ttt):
    cfg = TTTConfig(**{"layers": [1], "chunk_size": 5, **ttt})
    model = randomize_ttt(convert(tiny_base(arch, dtype=torch.float64).double(), cfg)).double()
    return model, model.model.layers[1].mlp


def _call(mlp, x, ctx):
    mlp.ttt_context = ctx
    try:
        return mlp(x)
    finally:
        mlp.ttt_context = None


@pytest.mark.parametrize("L", [3, 5, 17, 20])
def test_matches_published_algorithm(L):
    model, mlp = _ttt_model()
    x = torch.randn(2, L, 32, dtype=torch.float64)
    torch.testing.assert_close(_call(mlp, x, None), published_ttt_mlp(mlp, x, 5), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "ttt,docs",
    [
        ({}, [23]),
        ({"conv_kernel_size": 3, "use_proj": False}, [23]),
        ({"lr_mode": "token"}, [7, 11, 5]),
        ({"clip_update_norm": 0.05}, [16, 9]),
        ({"chunk_size": 1}, [6, 4]),
        ({"target": "input_embed", "lr_warmup_steps": 4}, [12, 1, 10]),
        ({"state_decay": 0.7}, [23, 4, 11]),
        ({"state_decay": 0.5, "clip_update_norm": 0.05, "lr_mode": "token"}, [16, 9]),
        ({"state_decay": 0.8, "chunk_size": 1, "target": "input_embed"}, [6, 4]),
        ({"key_norm": True}, [23, 4]),
        ({"key_norm": True, "state_decay": 0.7, "clip_update_norm": 0.05}, [16, 9]),
        ({"write_rule": "delta"}, [23, 4, 11]),
        ({"write_rule": "delta", "key_norm": True}, [23, 4, 11]),
        ({"write_rule": "delta", "key_norm": True, "state_decay": 0.8, "lr_mode": "token", "clip_update_norm": 0.05},
         [16, 9]),
        ({"write_rule": "delta", "chunk_size": 1, "target": "input_embed"}, [6, 4]),
    ],
)
def test_chunked_equals_naive_reference(ttt, docs):
    model, mlp = _ttt_model(**ttt)
    if ttt.get("lr_warmup_steps"):
        from ttt_adapt import set_ttt_training_step

        set_ttt_training_step(model, 1)
        assert float(mlp.ttt.lr_scale) == 0.25
    L = sum(docs)
    x = torch.randn(1, L, 32, dtype=torch.float64)
    t = torch.randn(1, L, 32, dtype=torch.float64) if ttt.get("target") == "input_embed" else x
    pos = torch.cat([torch.arange(n) for n in docs]).unsqueeze(0)
    ctx = TTTContext.from_inputs(None, pos, t)
    got = _call(mlp, x, ctx)[0]
    ref = naive_ttt_mlp(mlp, x[0], t[0], docs, mlp.chunk_size, ttt.get("clip_update_norm"), ttt.get("state_decay"),
                        ttt.get("key_norm", False), ttt.get("write_rule") == "delta")
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("decay,rule", [(None, {}), (0.6, {}), (None, {"write_rule": "delta"}),
                                        (0.6, {"write_rule": "delta", "key_norm": True}), (None, {"key_norm": True})])
def test_gradients_match_reference(decay, rule):
    model, mlp = _ttt_model(lr_mode="token", clip_update_norm=0.2, state_decay=decay, **rule)
    docs = [9, 13]
    x = torch.randn(1, sum(docs), 32, dtype=torch.float64, requires_grad=True)
    pos = torch.cat([torch.arange(n) for n in docs]).unsqueeze(0)
    params = [p for p in mlp.parameters()]
    got = _call(mlp, x, TTTContext.from_inputs(None, pos, x))
    w = torch.randn_like(got)
    g_got = torch.autograd.grad((got * w).sum(), [x, *params])
    ref = naive_ttt_mlp(mlp, x[0], x[0], docs, mlp.chunk_size, 0.2, decay, rule.get("key_norm", False),
                        rule.get("write_rule") == "delta")
    g_ref = torch.autograd.grad((ref * w[0]).sum(), [x, *params])
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("with_weight,decay", [(False, None), (True, None), (True, 0.7)])
def test_scan_gradcheck_with_initial_and_final_state(with_weight, decay):
    torch.manual_seed(0)
    N, d, H = 11, 3, 4
    seg = Segments.build(
        torch.tensor([7, 4]), torch.tensor([False, True]), torch.tensor([0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]).bool(),
        torch.tensor([2, 0]), 3, True, "cpu",
    )
    h = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    a = torch.randn(N, d, dtype=torch.float64, requires_grad=True)
    S0 = torch.randn(2, d, H, dtype=torch.float64, requires_grad=True)
    W = torch.randn(d, H, dtype=torch.float64, requires_grad=True)
    if with_weight:
        assert torch.autograd.gradcheck(lambda h, a, S0, W: fast_weight_scan(h, a, seg, S0, W, decay), (h, a, S0, W))
    else:
        assert torch.autograd.gradcheck(lambda h, a, S0: fast_weight_scan(h, a, seg, S0), (h, a, S0))


def test_memory_saved_for_backward_is_independent_of_chunk_count():
    """The scan keeps its inputs only: no per-chunk d x H matrices are saved for backward (the layout table, 8
    integers a chunk on the host, aside)."""
    sizes = []
    for chunk in (64, 4):
        seg = Segments.build(torch.tensor([256]), torch.tensor([True]), None, torch.tensor([0]), chunk, False, "cpu")
        h = torch.randn(256, 48, requires_grad=True)
        a = torch.randn(256, 32, requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
            fast_weight_scan(h, a, seg)
        assert [t for t in saved if not t.is_floating_point()] == [seg.table]
        sizes.append(sum(t.numel() for t in saved if t.is_floating_point()))
    assert sizes[0] == sizes[1] == 256 * (48 + 32)


def test_state_decay_off_is_the_plain_sum_bit_for_bit():
    """`state_decay` unset and `state_decay: 1` both run the published plain sum: the same bits as before."""
    model, mlp = _ttt_model()
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    ref = _call(mlp, x, None)
    mlp.state_decay = 1.0
    assert torch.equal(_call(mlp, x, None), ref)
    mlp.state_decay = 0.9
    assert not torch.allclose(_call(mlp, x, None), ref)


def test_new_write_options_off_are_todays_fast_weight_bit_for_bit():
    """`key_norm: false` and `write_rule: sum` (the defaults) run the published scan, the same bits as a config that
    never names them; turning either on changes the outputs."""
    _, mlp = _ttt_model(state_decay=0.7)
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    ref = _call(mlp, x, None)
    assert mlp.key_norm is False and mlp.write_rule == "sum"
    torch.testing.assert_close(ref, published_ttt_mlp_decayed(mlp, x, 5, 0.7), rtol=1e-10, atol=1e-10)
    mlp.key_norm = True
    assert not torch.allclose(_call(mlp, x, None), ref)
    mlp.key_norm, mlp.write_rule = False, "delta"
    assert not torch.allclose(_call(mlp, x, None), ref)
    mlp.write_rule = "sum"
    assert torch.equal(_call(mlp, x, None), ref)


def published_ttt_mlp_decayed(mlp, x, chunk_size, decay):
    """`published_ttt_mlp` with the state decay: chunk c reads W_down + sum_{c' < c} decay^(c - 1 - c') dW_c'."""
    B, L, d = x.shape
    n = -(-L // chunk_size)
    out = []
    S = torch.zeros_like(mlp.down_proj.weight).expand(B, -1, -1).clone()
    h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    k = mlp.ttt.conv.weight.shape[-1]
    for c in range(n):
        sl = slice(c * chunk_size, min((c + 1) * chunk_size, L))
        out.append(torch.einsum("blh,bdh->bld", h[:, sl], mlp.down_proj.weight + S))
        v = F.conv1d(x[:, sl].transpose(1, 2), mlp.ttt.conv.weight, padding=k // 2, groups=d).transpose(1, 2)
        v = v @ mlp.ttt.target_proj.weight.T
        S = decay * S + mlp.ttt.lr * torch.einsum("bld,blh->bdh", v, h[:, sl])
    return torch.cat(out, 1)
