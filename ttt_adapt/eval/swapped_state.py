"""The swapped-state control: forwards whose TTT layers read, row by row, another row's fast weights chunk for
chunk, or none (`fast_weight_sources`), and which held-out document reads whose (`swap_partners`)."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

from ttt_adapt._util import unwrap
from ttt_adapt.eval.settings import EvalError
from ttt_adapt.modeling.ttt_layer import INIT, TTTMLP, ZERO, FlatLayout, fast_weight_scan


def swap_partners(lengths: list[int]) -> list[int | None]:
    """For each document, another one at least as long whose fast weights it reads in the swapped control (cut to
    its length, so of the same length); None for the single longest document when no other is as long.

    Documents are ordered by length (longest first, then by index); each reads its predecessor's state, the first
    one its successor's."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    partners = [None] * len(lengths)
    for k, i in enumerate(order):
        if k > 0:
            partners[i] = order[k - 1]
        elif len(order) > 1 and lengths[order[1]] == lengths[i]:
            partners[i] = order[1]
    return partners


@contextmanager
def fast_weight_sources(model, sources: list[int | None] | None):
    """Inside, every forward of `model` (a TTT model, no cache) reads fast weights per row as `sources` says:
    `sources[r] == r` its own, `j` row j's (a row reading its own, and as long as row r), None none (the TTT MLPs
    then compute plain `down_proj(h)`); `sources=None`: no row reads any.

    Row r's chunk c reads `W_down + sum_{c' < c} dW_c'` of row j, chunk for chunk, while attention, h and everything
    else come from row r itself. Row j's updates are computed by the TTT layer's own functions from row j's
    activations in the same forward, so later TTT layers see row j's own-state activations."""
    mlps = [m for m in unwrap(model).modules() if isinstance(m, TTTMLP)]
    if not mlps:
        raise EvalError("the swapped-state control needs an In-Place TTT model (no TTT layer found)")
    hooks = [m.register_forward_hook(lambda mlp, args, out: _read_sources(mlp, args[0], out, sources)) for m in mlps]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _read_sources(mlp, x, y, sources):
    """The TTT MLP's output `y` with each row's fast-weight read replaced as `sources` says."""
    ctx = mlp.ttt_context
    if ctx is None or ctx.layer_states is not None or ctx.parallel is not None:
        raise RuntimeError("fast_weight_sources: the TTT layer ran without its context, with a cache or under context "
                           "parallelism; call the model with use_cache=False")
    sources = [None] * x.shape[0] if sources is None else sources
    if len(sources) != x.shape[0]:
        raise RuntimeError(f"fast_weight_sources: {len(sources)} sources for a batch of {x.shape[0]} rows")
    changed = [r for r, s in enumerate(sources) if s != r]
    if not changed:
        return y
    swapped = [r for r in changed if sources[r] is not None]
    lengths = [x.shape[1]] * x.shape[0] if ctx.valid is None else ctx.valid.sum(1).tolist()
    if any(lengths[sources[r]] < lengths[r] for r in swapped):
        raise RuntimeError("fast_weight_sources: a row may only read the fast weights of a row at least as long")
    y = y.clone()
    h = mlp.inner(x[changed])
    y[changed] = mlp.down_proj(h)
    if swapped:
        donors = sorted({sources[r] for r in swapped})
        if any(sources[j] != j for j in donors):
            raise RuntimeError("fast_weight_sources: a row may only read the fast weights of a row that reads its own")
        states, donor_seg = _states_after_each_chunk(mlp, x, ctx, donors)
        first_unit = {j: donor_seg.rows.index(k) for k, j in enumerate(donors)}
        pick = [changed.index(r) for r in swapped]
        read = _read_states(mlp, h[pick], _rows(ctx.valid, swapped), states,
                            [first_unit[sources[r]] for r in swapped])
        y[swapped] = y[swapped] + read.to(y.dtype)
    return y


def _states_after_each_chunk(mlp, x, ctx, rows):
    """(U, d, H): the fast-weight state after each chunk of `rows` (each row one document, from position 0), by the
    layer's own target and scan functions; and the rows' Segments (unit u of row k: `rows[k]`'s chunk)."""
    t = x if mlp.target == "hidden_states" else ctx.inputs_embeds
    layout = FlatLayout(len(rows), x.shape[1], mlp.chunk_size, _rows(ctx.valid, rows), None, None, x.device)
    seg = layout.seg
    xf, tf = layout.flatten(x[rows]), layout.flatten(t[rows])
    hf = layout.flatten(mlp.inner(x[rows]))
    kf = mlp.key(hf)
    a = mlp.ttt.targets(tf, xf, kf, seg, mlp.clip_update_norm)
    U = seg.num_units
    every = dataclasses.replace(seg, num_rows=U, rows=list(range(U)), read=[False] * U, write=[True] * U,
                                final=[True] * U, init_index=None)
    _, after = mlp.scan(kf, a, xf, every)
    return after, seg


def _read_states(mlp, h, valid, states, first_unit):
    """Fast-weight read of rows whose chunk c reads `states[first_unit[row] + c - 1]` (chunk 0 reads nothing)."""
    layout = FlatLayout(h.shape[0], h.shape[1], mlp.chunk_size, valid, None, None, h.device)
    seg = layout.seg
    chunk = [u - seg.rows.index(r) for u, r in enumerate(seg.rows)]  # chunk index of each unit in its row
    index = [first_unit[r] + c - 1 for r, c in zip(seg.rows, chunk)]
    U = seg.num_units
    reads = dataclasses.replace(seg, start_state=[ZERO if c == 0 else INIT for c in chunk], read=[c > 0 for c in chunk],
                                write=[False] * U, final=[False] * U, init_index=[max(i, 0) for i in index])
    hf = layout.flatten(h)
    out, _ = fast_weight_scan(mlp.key(hf), hf.new_zeros(hf.shape[0], states.shape[1]), reads, states)
    return layout.unflatten(out)


def _rows(valid, rows):
    return None if valid is None else valid[rows]
