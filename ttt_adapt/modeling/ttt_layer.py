"""The In-Place TTT math: a gated MLP whose `down_proj` is a fast weight updated chunk by chunk.

With x the MLP input, h = act(gate(x)) * up(x) and t the target source (x, or the input embeddings):
    v = Conv1D(t) @ W_target^T        depthwise, centred, zero-padded at chunk edges (never crosses a chunk)
    a_i = lr_i * v_i                  lr: learned per layer, optionally gated per token
    dW_c = sum_{i in c} a_i h_i^T     (d x H), optionally clipped in Frobenius norm
    S_c = g * S_{c-1} + dW_{c-1}      S_0 = 0; g = `state_decay` (1 when unset: the published plain sum)
    y_j = (W_down + S_{c(j)}) h_j     within the document of token j

Tokens are handled in a flat layout: each row's real tokens (pads dropped) one after the other, cut into
"units" = chunks of one document. `Segments` describes the units; `fast_weight_scan` runs the causal
prefix sum over them with a custom autograd function that keeps one d x H state, never one per chunk.
Precision: `fast_weight_math` is the one boundary between autocast and the fast weights (see there).
This file ships inside every export: torch only.
"""

import copy
import functools
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

def fast_weight_math(fn):
    """The one boundary between autocast (CPU or CUDA) and the fast-weight math: `fn` runs with autocast off.

    Autocast would make `a^T h` a bf16 product and the state a bf16 sum (and in-place ops are not autocast at all,
    so a bf16 state then meets fp32 inputs). Inside `fn` every state, update and norm is computed in
    `torch.promote_types(dtype, float32)`; activations (h, the targets) come in as autocast made them and results go
    back in the dtype the caller's autocast would have produced. Used by the scan (forward and backward), the
    decode-time read, the chunk flush (through the scan), the clipping norm and the cross-rank scan of context
    parallelism (`ttt_adapt.distributed.context_parallel`).
    """

    @functools.wraps(fn)
    def run(*args, **kwargs):
        tensor = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if tensor is None or not torch.is_autocast_enabled(tensor.device.type):
            return fn(*args, **kwargs)
        with torch.autocast(tensor.device.type, enabled=False):
            return fn(*args, **kwargs)

    return run


def autocast_dtype(t):
    """The dtype autocast computes products in on `t`'s device, or None where autocast is off."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


# How the fast-weight state looks when a unit starts.
ZERO, INIT, CARRY = 0, 1, 2  # new document / an initial state (cache, earlier ranks) / carried from the previous unit


@dataclass
class Segments:
    """Units (chunks of one document) of a flat token layout, in order.

    `start_state[u]` says where unit u's state comes from (ZERO, INIT, CARRY); an INIT unit starts from
    `init_state[init_index[u]]` (by default its row's); `read[u]`: its tokens read the state; `write[u]`: its update
    is added to the state; `final[u]`: the state after it is its row's final state.
    """

    num_rows: int
    num_tokens: int
    starts: list
    ends: list
    rows: list
    start_state: list
    read: list
    write: list
    final: list
    unit_of_token: torch.Tensor  # (num_tokens,) long, on the model's device
    init_index: list = None  # per unit: the initial state an INIT unit starts from (None: its row's)

    def __post_init__(self):
        if self.init_index is None:
            self.init_index = list(self.rows)
        # What the compiled code sees: tensors only, so a new layout (documents elsewhere) is new data, not a new
        # graph. `table` (U, 8) long on CPU: the unit lists, read inside the custom ops; `write_of_token` (N,) bool.
        columns = (self.starts, self.ends, self.rows, self.start_state, self.read, self.write, self.final,
                   self.init_index)
        self.table = torch.tensor(list(zip(*columns)), dtype=torch.long).reshape(len(self.starts), len(columns))
        dynamo = sys.modules.get("torch._dynamo")  # loaded once anything was compiled; never imported here
        if dynamo is not None and not torch.compiler.is_compiling():  # compiled layers take any number of units
            dynamo.maybe_mark_dynamic(self.table, 0)
        self.keeps_final = any(self.final)
        write = torch.tensor(self.write, dtype=torch.bool)
        self.write_of_token = write[self.unit_of_token.cpu()].to(self.unit_of_token.device) if len(write) \
            else torch.zeros(0, dtype=torch.bool, device=self.unit_of_token.device)

    @property
    def num_units(self) -> int:
        return len(self.starts)

    @classmethod
    def build(cls, row_lengths, first_is_doc_start, doc_start, prefix_lengths, chunk_size, keep_final, device):
        """Cut rows of a flat layout into units.

        Args:
            row_lengths: (R,) tokens per row in the flat layout (buffered prefix + new real tokens).
            first_is_doc_start: (R,) bool, the row's first token starts a document (else it continues the row's
                initial state, with `prefix_lengths` buffered tokens of an unfinished chunk before the new ones).
            doc_start: (N,) bool, tokens that start a document (packed sequences), or None.
            keep_final: return each row's final state (a generation cache): the update of a row's last unit is
                then written when that unit is a full chunk, and buffered by the caller otherwise.
        """
        row_lengths = row_lengths.long().cpu()
        R, N = row_lengths.numel(), int(row_lengths.sum())
        ar = torch.arange(N)
        row_of = torch.repeat_interleave(torch.arange(R), row_lengths)
        row_off = torch.cumsum(row_lengths, 0) - row_lengths
        idx_in_row = ar - row_off[row_of]
        starts_doc = torch.zeros(N, dtype=torch.bool) if doc_start is None else doc_start.cpu().clone()
        starts_doc &= idx_in_row >= prefix_lengths.cpu()[row_of]  # a buffered prefix never starts a document
        starts_doc |= (idx_in_row == 0) & first_is_doc_start.cpu()[row_of]
        anchor = starts_doc | (idx_in_row == 0)
        last_anchor = torch.cummax(torch.where(anchor, ar, torch.zeros_like(ar)), 0).values
        unit_start = ((ar - last_anchor) % chunk_size) == 0
        starts = torch.nonzero(unit_start).flatten()
        ends = torch.cat([starts[1:], torch.tensor([N])]) if N else starts
        rows = row_of[starts]
        state = torch.full_like(starts, CARRY)
        state[idx_in_row[starts] == 0] = INIT
        state[starts_doc[starts]] = ZERO
        row_last = torch.ones_like(starts, dtype=torch.bool)
        row_last[:-1] = rows[1:] != rows[:-1]
        next_carries = torch.zeros_like(row_last)
        next_carries[:-1] = state[1:] == CARRY
        write = next_carries | (row_last & ((ends - starts) == chunk_size) & keep_final)
        final = row_last & keep_final
        unit_of_token = (torch.cumsum(unit_start.long(), 0) - 1).to(device)
        return cls(
            R, N, starts.tolist(), ends.tolist(), rows.tolist(), state.tolist(), (state != ZERO).tolist(),
            write.tolist(), final.tolist(), unit_of_token,
        )


class _Units:
    """The unit lists of a `Segments.table`, as the custom ops below read them (only tensors reach an op)."""

    def __init__(self, table, num_rows, num_tokens):
        columns = table.T.tolist() if table.numel() else [[] for _ in range(table.shape[1])]
        self.starts, self.ends, self.rows, self.start_state, self.read, self.write, self.final, self.init_index = columns
        self.num_rows, self.num_tokens, self.num_units = num_rows, num_tokens, len(self.starts)


@fast_weight_math
def _scan_forward(h, a, weight, init_state, seg, keep_final, amp, decay=1.0, guard=None):
    """out_u = h_u (W + S_u)^T and S_{u+1} = decay * S_u + a_u^T h_u over units (see `fast_weight_scan`).

    With `weight` (W_down) given, the base product is part of the scan: `F.linear(h, W)` exactly as the stock
    down_proj computes it (under autocast: in `amp`, as autocast would, so a converted model still equals its base at
    step 0). States and updates are fp32 (or wider), autocast or not (`fast_weight_math`).
    """
    acc = torch.promote_types(h.dtype, torch.float32)
    if weight is None:
        out = torch.zeros(seg.num_tokens, a.shape[1], dtype=acc, device=h.device)
    else:
        compute = amp or h.dtype
        out = F.linear(h.to(compute), weight.to(compute))
    final = torch.zeros(seg.num_rows if keep_final else 0, a.shape[1], h.shape[1], dtype=acc, device=h.device)
    S = None
    for u, (s, e, r) in enumerate(zip(seg.starts, seg.ends, seg.rows)):
        S = _start_state(seg.start_state[u], S, init_state, seg.init_index[u], acc)
        hu = h[s:e].to(acc)
        if seg.read[u] and S is not None:
            if out.dtype == acc:
                out[s:e].addmm_(hu, S.T)
            else:
                out[s:e] += (hu @ S.T).to(out.dtype)
        if seg.write[u] and (seg.final[u] or _next_carries(seg, u)):  # else nobody reads the update here
            S = _add_update(S, a[s:e].to(acc), hu, decay)
            if guard is not None:
                guard.check(S)
        if seg.final[u] and S is not None:
            final[r] = S
    return out, final


@fast_weight_math
def _scan_backward(go, gfinal, h, a, weight, init_state, seg, weight_grad, init_grad, decay=1.0):
    """Gradients of `_scan_forward`: the state is recomputed (memory does not grow with the number of chunks); one
    product per unit gives dh = g (W + S_u) while the per-unit g^T h products serve both dW and the state's gradient."""
    acc = torch.promote_types(h.dtype, torch.float32)
    go = None if go is None else go.to(acc)
    W = None if weight is None else weight.to(acc)
    dh = torch.zeros(h.shape, dtype=acc, device=h.device)
    da = torch.zeros(a.shape, dtype=acc, device=a.device)
    dW = torch.zeros(W.shape, dtype=acc, device=h.device) if W is not None and weight_grad else None
    dinit = torch.zeros_like(init_state) if init_state is not None and init_grad else None
    # Pass 1, forward: dh = go (W + S_u) with the state each unit read.
    S = None
    for u, (s, e, r) in enumerate(zip(seg.starts, seg.ends, seg.rows)):
        S = _start_state(seg.start_state[u], S, init_state, seg.init_index[u], acc)
        if go is not None:
            reads = seg.read[u] and S is not None
            if reads or W is not None:
                M = (S if W is None else W + S) if reads else W
                torch.mm(go[s:e], M, out=dh[s:e])
        if seg.write[u] and _next_carries(seg, u):
            S = _add_update(S, a[s:e].to(acc), h[s:e].to(acc), decay)
    # Pass 2, reverse: G = dL/d(state after unit u), carried back through the prefix sum.
    G_before_next = None
    for u in reversed(range(seg.num_units)):
        s, e, r = seg.starts[u], seg.ends[u], seg.rows[u]
        if seg.final[u]:
            G = None if gfinal is None or not gfinal.numel() else gfinal[r].to(acc, copy=True)
        elif _next_carries(seg, u):
            G = G_before_next
        else:
            G = None
        hu = h[s:e].to(acc)
        if seg.write[u] and G is not None:
            torch.mm(hu, G.T, out=da[s:e])
            dh[s:e].addmm_(a[s:e].to(acc), G)
            if decay != 1.0:  # the state before the write entered it times decay
                G = G.mul_(decay)
        if go is not None and (seg.read[u] or dW is not None):
            P = go[s:e].T @ hu
            if dW is not None:
                dW += P
            if seg.read[u]:
                G = P if G is None else G.add_(P)
        if seg.start_state[u] == INIT and dinit is not None and G is not None:
            dinit[seg.init_index[u]] += G
        G_before_next = G
    return dh.to(h.dtype), da.to(a.dtype), None if dW is None else dW.to(weight.dtype), dinit


def _start_state(kind, S, init_state, index, acc):
    if kind == ZERO:
        return None
    if kind == INIT:
        return None if init_state is None else init_state[index].to(acc, copy=True)
    return S


def _next_carries(seg, u):
    return u + 1 < seg.num_units and seg.start_state[u + 1] == CARRY


def _add_update(S, a, h, decay=1.0):
    if S is None:
        return a.T @ h
    if decay != 1.0:
        S.mul_(decay)
    return S.addmm_(a.T, h)


GUARD_FACTOR = 2.0  # the state-norm guard speaks up when a state's norm passes this many times what training produced


class StateNormGuard:
    """The inference-time check of one TTT layer's fast-weight state against the largest norm training produced
    (`TTTConfig.state_norm_limit`, recorded at export): one warning per layer when a state's Frobenius norm passes
    `GUARD_FACTOR` x that; with `clamp`, every state above the limit is scaled back to it (inference only: a forward
    that needs gradients is never clamped)."""

    warned = set()  # (module name, layer): each layer warns once per process

    def __init__(self, limit: float, clamp: bool, layer: int):
        self.limit, self.clamp, self.layer = float(limit), clamp, layer

    def check(self, S):
        norm = float(torch.linalg.matrix_norm(S))
        if norm > GUARD_FACTOR * self.limit and (__name__, self.layer) not in self.warned:
            self.warned.add((__name__, self.layer))
            action = "clamped to it" if self.clamp else "outputs may degrade; ttt.state_norm_guard='clamp' bounds it"
            warnings.warn(
                f"In-Place TTT layer {self.layer}: the fast-weight state's norm reached {norm:.4g}, "
                f"{norm / self.limit:.1f}x the largest training produced ({self.limit:.4g}): {action}",
                RuntimeWarning, stacklevel=2)
        if self.clamp and norm > self.limit:
            S.mul_(self.limit / norm)


# The scan and the clipping norm are registered custom ops: torch.compile sees one opaque call with its own backward
# and shapes (no graph break, no recompilation when the documents move), eager runs them as plain calls. The
# namespace is this module's name, so each copy of this file (the package, every loaded export) has its own ops.
_NAMESPACE = "".join(c if c.isalnum() else "_" for c in __name__)


def _empty(t):
    return t.new_empty(0) if t is not None else torch.empty(0)


def _define_ops():
    if hasattr(getattr(torch.ops, _NAMESPACE), "scan"):  # this module imported again: the ops exist
        return getattr(torch.ops, _NAMESPACE)
    lib = torch.library

    @lib.custom_op(f"{_NAMESPACE}::scan", mutates_args=())
    def scan(h: torch.Tensor, a: torch.Tensor, weight: torch.Tensor | None, init_state: torch.Tensor | None,
             table: torch.Tensor, num_rows: int, keep_final: bool, amp: torch.dtype | None, decay: float,
             norm_limit: float, clamp: bool, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        guard = StateNormGuard(norm_limit, clamp, layer) if norm_limit > 0 else None
        return _scan_forward(h, a, weight, init_state, _Units(table, num_rows, h.shape[0]), keep_final, amp, decay,
                             guard)

    @scan.register_fake
    def _(h, a, weight, init_state, table, num_rows, keep_final, amp, decay, norm_limit, clamp, layer):
        acc = torch.promote_types(h.dtype, torch.float32)
        out = h.new_empty(h.shape[0], a.shape[1], dtype=acc if weight is None else (amp or h.dtype))
        return out, h.new_empty(num_rows if keep_final else 0, a.shape[1], h.shape[1], dtype=acc)

    @lib.custom_op(f"{_NAMESPACE}::scan_backward", mutates_args=())
    def scan_backward(go: torch.Tensor | None, gfinal: torch.Tensor | None, h: torch.Tensor, a: torch.Tensor,
                      weight: torch.Tensor | None, init_state: torch.Tensor | None, table: torch.Tensor,
                      num_rows: int, weight_grad: bool, init_grad: bool, decay: float) -> list[torch.Tensor]:
        seg = _Units(table, num_rows, h.shape[0])
        dh, da, dW, dinit = _scan_backward(go, gfinal, h, a, weight, init_state, seg, weight_grad, init_grad, decay)
        return [dh, da, _empty(h) if dW is None else dW, _empty(h) if dinit is None else dinit]

    @scan_backward.register_fake
    def _(go, gfinal, h, a, weight, init_state, table, num_rows, weight_grad, init_grad, decay):
        dW = torch.empty_like(weight) if weight is not None and weight_grad else h.new_empty(0)
        dinit = torch.empty_like(init_state) if init_state is not None and init_grad else h.new_empty(0)
        return [torch.empty_like(h), torch.empty_like(a), dW, dinit]

    def setup_scan(ctx, inputs, output):
        h, a, weight, init_state, table, num_rows, _, _, decay, _, _, _ = inputs
        ctx.save_for_backward(h, a, weight, init_state, table)
        ctx.num_rows, ctx.decay = num_rows, decay

    def backward_scan(ctx, go, gfinal):
        h, a, weight, init_state, table = ctx.saved_tensors
        need = ctx.needs_input_grad
        dh, da, dW, dinit = scan_backward(go, gfinal, h, a, weight, init_state, table, ctx.num_rows,
                                          bool(need[2]), bool(need[3]), ctx.decay)
        return (dh, da, dW if need[2] and weight is not None else None,
                dinit if need[3] and init_state is not None else None, None, None, None, None, None, None, None, None)

    scan.register_autograd(backward_scan, setup_context=setup_scan)

    @lib.custom_op(f"{_NAMESPACE}::update_norms", mutates_args=())
    def update_norms(a: torch.Tensor, h: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return _update_norms(a, h, _Units(table, 0, h.shape[0]))

    @update_norms.register_fake
    def _(a, h, table):
        return a.new_empty(a.shape[0], dtype=torch.promote_types(a.dtype, torch.float32))

    @lib.custom_op(f"{_NAMESPACE}::update_norms_backward", mutates_args=())
    def update_norms_backward(g: torch.Tensor, a: torch.Tensor, h: torch.Tensor, table: torch.Tensor
                              ) -> list[torch.Tensor]:
        return list(_update_norms_backward(g, a, h, _Units(table, 0, h.shape[0])))

    @update_norms_backward.register_fake
    def _(g, a, h, table):
        return [torch.empty_like(a), torch.empty_like(h)]

    def setup_norms(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward_norms(ctx, g):
        a, h, table = ctx.saved_tensors
        da, dh = update_norms_backward(g, a, h, table)
        return da, dh, None

    update_norms.register_autograd(backward_norms, setup_context=setup_norms)
    return getattr(torch.ops, _NAMESPACE)


@fast_weight_math
def _delta_scan(h, a, lr, seg: Segments, init_state, weight, decay, guard, amp):
    """The delta rule over units, differentiable by autograd. Unit u reads `h_u S_u^T`; its tokens then write one
    after another, as DeltaNet does: from S = decay * S_u, token t writes u_t = a_t - lr_t S k_t (its target minus
    what the state already returns for its key, so the key's old value is replaced) and S += u_t k_t^T. The
    sequential writes of a unit are one lower-triangular solve (the WY form): (I + diag(lr) tril(K K^T, -1)) U =
    A - diag(lr) K S^T, then S_{u+1} = S + U^T K. The state a unit writes depends on the state it read, so units
    cannot be summed independently; autograd keeps each unit's state for the backward (memory grows with the number
    of chunks: one d x H state per chunk and TTT layer)."""
    acc = torch.promote_types(h.dtype, torch.float32)
    pieces, finals, S = [], {}, None
    for u, (s, e, r) in enumerate(zip(seg.starts, seg.ends, seg.rows)):
        kind = seg.start_state[u]
        if kind == ZERO:
            S = None
        elif kind == INIT:
            S = None if init_state is None else init_state[seg.init_index[u]].to(acc)
        hu = h[s:e].to(acc)
        read = seg.read[u] and S is not None
        pieces.append(hu @ S.T if read else hu.new_zeros(e - s, a.shape[1]))
        if seg.write[u] and (seg.final[u] or _next_carries(seg, u)):
            beta = lr[s:e, None].to(acc)
            rhs = a[s:e].to(acc)
            if S is not None:
                S = S * decay if decay != 1.0 else S
                rhs = rhs - beta * (hu @ S.T)
            L = torch.tril(beta * (hu @ hu.T), diagonal=-1) + torch.eye(e - s, dtype=acc, device=h.device)
            U = torch.linalg.solve_triangular(L, rhs, upper=False, unitriangular=True)
            S = U.T @ hu if S is None else S + U.T @ hu
            if guard is not None:
                guard.check(S)  # its clamp is off where gradients are needed (`fast_weight_scan`)
        if seg.final[u] and S is not None:
            finals[r] = S
    out = torch.cat(pieces) if pieces else h.new_zeros(0, a.shape[1], dtype=acc)
    if weight is not None:
        compute = amp or h.dtype
        out = F.linear(h.to(compute), weight.to(compute)) + out.to(compute)
    final = torch.stack([finals[r] if r in finals else h.new_zeros(a.shape[1], h.shape[1], dtype=acc)
                         for r in range(seg.num_rows)]) if seg.keeps_final else \
        h.new_zeros(0, a.shape[1], h.shape[1], dtype=acc)
    return out, final


def fast_weight_scan(h, a, seg: Segments, init_state=None, weight=None, decay=None, guard=None, lr=None):
    """Chunk-causal fast-weight read-out over a flat layout.

    Args:
        h: (N, H) down_proj inputs; a: (N, d) learning-rate-scaled targets (zero where nothing may be written).
        init_state: optional (K, d, H) initial states, read by INIT units (`seg.init_index`; by default one per row).
        weight: optional (d, H) W_down; then the base product is included and the result has h's dtype.
        decay: `TTTConfig.state_decay`: each written unit's state is `decay * S + a^T h` (None: the plain sum).
        guard: optional (limit, clamp, layer) of the state-norm guard (`StateNormGuard`); its clamp is skipped when
            gradients are needed.
        lr: optional (N,) per-token learning rates: the delta rule (`TTTConfig.write_rule="delta"`). The tokens of
            a written unit then write one after another `a_t - lr_t S k_t` (what the state already returns for a key
            is subtracted from its target before it is written; `_delta_scan`).
    Returns:
        out: (N, d) `h W^T + o` with `weight` (in the dtype autocast, or else h, computes the base product in),
            else the fast-weight part `o` alone (fp32 or wider);
        final: (R, d, H) state after each row's last unit (empty unless `seg` keeps final states), fp32 or wider.
    """
    limit, clamp, layer = guard if guard is not None else (0.0, False, -1)
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, a, weight, init_state, lr))
    if lr is not None:
        check = StateNormGuard(limit, bool(clamp) and not grads, int(layer)) if limit > 0 else None
        if list(seg.starts) != [0, *seg.ends[:-1]] or (seg.ends and seg.ends[-1] != seg.num_tokens):
            raise RuntimeError("the delta-rule scan needs units that tile the tokens in order")
        return _delta_scan(h, a, lr, seg, init_state, weight, 1.0 if decay is None else float(decay), check,
                           autocast_dtype(h))
    return _OPS.scan(h, a, weight, init_state, seg.table, seg.num_rows, seg.keeps_final, autocast_dtype(h),
                     1.0 if decay is None else float(decay), float(limit), bool(clamp) and not grads, int(layer))


def chunk_conv(t, weight, unit_of_token):
    """Depthwise, centred Conv1D applied per unit: zero padding at each unit's edges, so it never crosses one.

    `unit_of_token` (N,) numbers the units of the N rows of `t` in order (0, 0, 1, 1, 1, 2, ...). Written as one
    shifted product per kernel tap, masked where the tap reaches into another unit: nothing depends on the number
    of units (a compiled layer does not recompile when the documents move). Its backward recomputes the taps from
    `t`, so nothing but `t` (the MLP input, kept anyway) is saved: no N x d tensor per tap.
    """
    return _ChunkConv.apply(t, weight[:, 0, :].to(t.dtype), unit_of_token)


def _tap_masks(unit_of_token, k):
    """(shift, mask) per kernel tap but the centre: mask (N - |shift|, 1) says where the tap stays in its unit."""
    N, p = unit_of_token.shape[0], k // 2
    for m in range(k):
        shift = m - p
        if shift == 0 or abs(shift) >= N:
            continue
        if shift > 0:  # token i reads token i + shift
            yield m, shift, (unit_of_token[shift:] == unit_of_token[:-shift]).unsqueeze(-1)
        else:
            yield m, shift, (unit_of_token[:shift] == unit_of_token[-shift:]).unsqueeze(-1)


class _ChunkConv(torch.autograd.Function):
    """out[i] = sum_m w[:, m] * t[i + m - p], taps that leave token i's unit left out (see `chunk_conv`)."""

    @staticmethod
    def forward(ctx, t, w, unit_of_token):
        ctx.save_for_backward(t, w, unit_of_token)
        p = w.shape[1] // 2
        out = t * w[:, p]
        for m, shift, same in _tap_masks(unit_of_token, w.shape[1]):
            if shift > 0:
                tap = F.pad(t[shift:] * same * w[:, m], (0, 0, 0, shift))
            else:
                tap = F.pad(t[:shift] * same * w[:, m], (0, 0, -shift, 0))
            out = out + tap
        return out

    @staticmethod
    def backward(ctx, g):
        t, w, unit_of_token = ctx.saved_tensors
        p = w.shape[1] // 2
        gt = g * w[:, p] if ctx.needs_input_grad[0] else None
        gw = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        if gw is not None:
            gw[:, p] = (g * t).sum(0)
        for m, shift, same in _tap_masks(unit_of_token, w.shape[1]):
            n = t.shape[0] - abs(shift)
            g_out, t_in = (g[:n], t[shift:]) if shift > 0 else (g[-shift:], t[:n])  # out rows, the rows they read
            if gw is not None:
                gw[:, m] = (g_out * same * t_in).sum(0)
            if gt is not None:
                if shift > 0:
                    gt[shift:] += g_out * same * w[:, m]
                else:
                    gt[:n] += g_out * same * w[:, m]
        return gt, gw, None


def clip_scales(a, h, seg: Segments, max_norm: float):
    """Per-token factor that scales each written unit's update a^T h to Frobenius norm <= max_norm (fp32 or wider:
    multiplying `a` by it promotes `a` too, so the clipped update is not rounded back to bf16); 1 elsewhere."""
    norms = _OPS.update_norms(a, h, seg.table)
    scales = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
    return torch.where(seg.write_of_token, scales, torch.ones_like(scales)).unsqueeze(-1)


@fast_weight_math
def _update_norms(a, h, seg):
    """(N,) the Frobenius norm of the update a_u^T h_u of each token's unit, fp32 or wider (0 for unwritten units)."""
    acc = torch.promote_types(a.dtype, torch.float32)
    norms = torch.zeros(a.shape[0], dtype=acc, device=a.device)
    for s, e, w in zip(seg.starts, seg.ends, seg.write):
        if w:
            norms[s:e] = torch.linalg.matrix_norm(a[s:e].to(acc).T @ h[s:e].to(acc))
    return norms


@fast_weight_math
def _update_norms_backward(g, a, h, seg):
    """Gradients of `_update_norms`: with M = a_u^T h_u and G the unit's summed gradient, dM = G M / |M|."""
    acc = torch.promote_types(a.dtype, torch.float32)
    da, dh = torch.zeros(a.shape, dtype=acc, device=a.device), torch.zeros(h.shape, dtype=acc, device=h.device)
    for s, e, w in zip(seg.starts, seg.ends, seg.write):
        if not w:
            continue
        au, hu = a[s:e].to(acc), h[s:e].to(acc)
        M = au.T @ hu  # recomputed: one d x H at a time
        norm = torch.linalg.matrix_norm(M)
        if norm > 0:
            dM = M * (g[s:e].to(acc).sum() / norm)
            da[s:e] = hu @ dM.T
            dh[s:e] = au @ dM
    return da.to(a.dtype), dh.to(h.dtype)


class TTTParams(nn.Module):
    """The new parameters of one TTT layer: conv, target projection, learning rate (+ per-token gate)."""

    def __init__(self, hidden_size, ttt_config):
        super().__init__()
        k = ttt_config.conv_kernel_size
        self.conv = nn.Conv1d(hidden_size, hidden_size, k, padding=k // 2, groups=hidden_size, bias=False)
        self.target_proj = nn.Linear(hidden_size, hidden_size, bias=False) if ttt_config.use_proj else None
        lr = torch.full((1,), float(ttt_config.lr_init))
        if getattr(ttt_config, "lr_learned", True):
            self.lr = nn.Parameter(lr)
        else:  # fixed, as published: saved with the weights, never trained
            self.register_buffer("lr", lr)
        self.lr_gate = nn.Linear(hidden_size, 1) if ttt_config.lr_mode == "token" else None
        # Warmup factor of the TTT learning rate, set by the training loop; 1 at inference.
        self.register_buffer("lr_scale", torch.ones(1), persistent=False)

    @torch.no_grad()
    def reset_parameters(self, lr_init, std=0.02):
        """Step-0 init: conv zero (so the model equals its base), W_target diagonal N(0, std^2) as published.

        Uses transformers' guarded init functions, so weights loaded from a checkpoint are never overwritten.
        """
        init.zeros_(self.conv.weight)
        if self.target_proj is not None:
            w = self.target_proj.weight
            init.copy_(w, torch.diag(torch.randn(w.shape[0], device=w.device, dtype=torch.float32) * std).to(w.dtype))
        init.constant_(self.lr, lr_init)
        if self.lr_gate is not None:
            init.zeros_(self.lr_gate.weight)
            init.zeros_(self.lr_gate.bias)
        init.ones_(self.lr_scale)

    def targets(self, t, x, h, seg, clip_update_norm=None):
        """a = lr * (Conv1D(t) @ W_target^T) on a flat layout, clipped per unit if asked."""
        conv = chunk_conv(t, self.conv.weight, seg.unit_of_token)
        return self.scale_targets(conv, x, h, seg, clip_update_norm)

    def token_lr(self, x):
        """The TTT learning rate of each token of `x` (..., d): (1,) for the scalar mode, (..., 1) with the gate."""
        lr = self.lr * self.lr_scale
        if self.lr_gate is not None:
            lr = lr * 2 * torch.sigmoid(self.lr_gate(x))
        return lr

    def scale_targets(self, v, x, h, seg, clip_update_norm=None):
        """`targets` from the conv output `v`: the projection, the learning rate and the per-unit clip."""
        if self.target_proj is not None:
            v = self.target_proj(v)
        lr = self.token_lr(x)
        a = v * lr.to(v.dtype)
        if clip_update_norm is not None:
            a = a * clip_scales(a, h, seg, clip_update_norm)
        return a


class TTTLayerState:
    """Decode-time state of one TTT layer for a batch: fast weight, the unfinished chunk, its length per row."""

    def __init__(self):
        self.S = None  # (B, d, H) accumulated updates, fp32
        self.buf_x = None  # (B, C, d) MLP inputs of the unfinished chunk
        self.buf_t = None  # (B, C, d) target sources of the unfinished chunk (target="input_embed" only)
        self.n = None  # (B,) long on CPU: tokens in the unfinished chunk
        # positions (pads included) this layer has read: what its attention cache must hold (a tensor, so a compiled
        # forward does not specialize on it and recompile at every decoded token)
        self.seen = torch.zeros((), dtype=torch.long)

    @property
    def started(self) -> bool:
        return self.S is not None

    def _map(self, fn):
        for name in ("S", "buf_x", "buf_t"):
            if getattr(self, name) is not None:
                setattr(self, name, fn(getattr(self, name)))
        if self.n is not None:
            self.n = fn(self.n)

    def index_select(self, idx):
        self._map(lambda x: x.index_select(0, idx.to(x.device)))

    def repeat_interleave(self, repeats):
        self._map(lambda x: x.repeat_interleave(repeats, dim=0))

    def reset(self):
        self.S = self.buf_x = self.buf_t = self.n = None
        self.seen = torch.zeros((), dtype=torch.long)


class TTTMLP(nn.Module):
    """A gated MLP whose down_proj is a fast weight; called as `mlp(x)` like the module it replaces.

    It reuses the original MLP's projections (no copies) and adds `ttt` (`TTTParams`). Context a plain call cannot
    carry (padding, packed documents, the generation cache, input embeddings) comes in `ttt_context`, set by the
    decoder layer right before each call.
    """

    def __init__(self, mlp, ttt_config, layer_idx):
        super().__init__()
        for name in ("gate_proj", "up_proj", "down_proj"):
            if not isinstance(getattr(mlp, name, None), nn.Module):
                raise ValueError(f"{type(mlp).__name__} is not a gated MLP (needs gate_proj, up_proj, down_proj)")
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn
        self.hidden_size = self.down_proj.out_features
        self.layer_idx = layer_idx
        self.chunk_size = ttt_config.chunk_size
        self.target = ttt_config.target
        self.clip_update_norm = ttt_config.clip_update_norm
        self.state_decay = ttt_config.state_decay
        self.key_norm = ttt_config.key_norm
        self.write_rule = ttt_config.write_rule
        limits, guard = ttt_config.state_norm_limit, ttt_config.state_norm_guard
        self.guard = None  # (limit, clamp, layer) for the scan, from the norms recorded at export
        if limits is not None and guard != "off":
            self.guard = (limits[ttt_config.layers.index(layer_idx)], guard == "clamp", layer_idx)
        self.ttt_warmup_steps = ttt_config.lr_warmup_steps
        self.ttt = TTTParams(self.hidden_size, ttt_config)
        self.ttt_context = None

    def inner(self, x):
        return self.act_fn(self.gate_proj(x)) * self.up_proj(x)

    def key(self, h):
        """The fast weight's key of down_proj inputs `h`: h itself (published) or h / ||h|| (`key_norm`)."""
        return F.normalize(h, dim=-1, eps=1e-6) if self.key_norm else h

    def scan(self, k, a, x, seg, init_state=None, weight=None, guard=None):
        """`fast_weight_scan` of this layer over keys `k` (`key`), with its state decay and write rule (the delta
        rule's per-token rates from the MLP inputs `x`); `weight` (W_down) reads `k`: pass it with the published key
        only."""
        lr = None
        if self.write_rule == "delta":
            lr = self.ttt.token_lr(x).expand(x.shape[0], 1)[:, 0]
        return fast_weight_scan(k, a, seg, init_state, weight, self.state_decay, guard, lr=lr)

    def forward(self, x):
        h = self.inner(x)
        ctx = self.ttt_context if self.ttt_context is not None else TTTContext()
        t = x if self.target == "hidden_states" else ctx.inputs_embeds
        if t is None:
            raise ValueError("target='input_embed' needs the input embeddings: call the TTT model, not the MLP alone")
        if ctx.parallel is not None:  # context parallelism (distributed.context_parallel): the state crosses ranks
            return ctx.parallel.ttt_forward(self, x, h, t)
        state = ctx.layer_state(self.layer_idx)
        if state is not None:
            state.seen += x.shape[1]
        if state is not None and state.started and x.shape[1] == 1:
            y = self.down_proj(h)
            return y + self._decode_step(x, h, t, state, ctx).to(y.dtype)
        return self._chunked(x, h, t, state, ctx)

    def _chunked(self, x, h, t, state, ctx):
        layout = ctx.layout(x.shape[0], x.shape[1], self.chunk_size, state, x.device)
        prefix_x = prefix_t = prefix_h = None
        if layout.has_prefix:
            prefix_x = state.buf_x[layout.prefix_rows, layout.prefix_slots]
            prefix_t = prefix_x if state.buf_t is None else state.buf_t[layout.prefix_rows, layout.prefix_slots]
            prefix_h = self.inner(prefix_x)
        xf, hf, tf = layout.flatten(x, prefix_x), layout.flatten(h, prefix_h), layout.flatten(t, prefix_t)
        seg = layout.seg
        kf = self.key(hf)
        a = self.ttt.targets(tf, xf, kf, seg, self.clip_update_norm)
        init = state.S if state is not None and state.started else None
        # Every token real and no buffered prefix (training, plain inference): W_down joins the scan.
        fused = type(self.down_proj) is nn.Linear and layout.all_valid and not layout.has_prefix and not self.key_norm
        out, final = self.scan(kf, a, xf, seg, init, self.down_proj.weight if fused else None, self.guard)
        if state is not None:
            self._keep_state(state, layout, xf, tf if self.target == "input_embed" else None, final)
        if fused:
            y = out.view(*x.shape[:-1], -1)
            return y if self.down_proj.bias is None else y + self.down_proj.bias
        y = self.down_proj(h)
        return y + layout.unflatten(out).to(y.dtype)

    @torch.no_grad()
    def _keep_state(self, state, layout, xf, tf, final):
        seg, B, C = layout.seg, layout.batch_size, self.chunk_size
        if not state.started:
            state.S = final.new_zeros(final.shape)
            state.buf_x = xf.new_zeros(B, C, xf.shape[1])
            state.buf_t = None if tf is None else tf.new_zeros(B, C, tf.shape[1])
            state.n = torch.zeros(B, dtype=torch.long)
        for u in range(seg.num_units):
            if not seg.final[u]:
                continue
            r, s, e = seg.rows[u], seg.starts[u], seg.ends[u]
            state.S[r] = final[r]
            if seg.write[u]:  # the row ends on a full chunk: already in S
                state.n[r] = 0
            else:
                state.buf_x[r, : e - s] = xf[s:e]
                if tf is not None:
                    state.buf_t[r, : e - s] = tf[s:e]
                state.n[r] = e - s

    def _decode_step(self, x, h, t, state, ctx):
        o = _read_state(self.key(h), state.S)  # (B, 1, d)
        with torch.no_grad():
            valid = ctx.valid_last_token(x.shape[0])
            rows = torch.nonzero(valid).flatten()
            slots = state.n[rows]
            state.buf_x[rows.to(x.device), slots.to(x.device)] = x[rows.to(x.device), 0]
            if state.buf_t is not None:
                state.buf_t[rows.to(x.device), slots.to(x.device)] = t[rows.to(x.device), 0]
            state.n[rows] += 1
            full = torch.nonzero(state.n == self.chunk_size).flatten()
            if full.numel():
                self._flush(state, full)
        return o

    @torch.no_grad()
    def _flush(self, state, rows):
        """Apply the update of each finished chunk in `rows` (exactly as the full forward would)."""
        dev_rows = rows.to(state.buf_x.device)
        C = self.chunk_size
        xb = state.buf_x[dev_rows].reshape(-1, state.buf_x.shape[-1])
        tb = xb if state.buf_t is None else state.buf_t[dev_rows].reshape(-1, state.buf_t.shape[-1])
        hb = self.inner(xb)
        n = rows.numel()
        seg = Segments.build(
            torch.full((n,), C), torch.zeros(n, dtype=torch.bool), None, torch.zeros(n, dtype=torch.long),
            C, True, xb.device,
        )
        kb = self.key(hb)
        a = self.ttt.targets(tb, xb, kb, seg, self.clip_update_norm)
        _, final = self.scan(kb, a, xb, seg, state.S[dev_rows], guard=self.guard)
        state.S[dev_rows] = final
        state.n[rows] = 0


@fast_weight_math
def _read_state(h, S):
    """(B, 1, d) fast-weight part of one decoded token per row: h (W + S)^T minus the base part, in S's dtype."""
    return torch.bmm(h.to(S.dtype), S.transpose(1, 2))


class FlatLayout:
    """Maps (B, L) tensors to the flat layout of `Segments` and back: real tokens only, after any buffered prefix."""

    def __init__(self, B, L, chunk_size, valid, doc_start, state, device):
        self.batch_size, self.length = B, L
        continuing = state is not None and state.started
        prefix = state.n.clone() if continuing else torch.zeros(B, dtype=torch.long)
        valid_cpu = torch.ones(B, L, dtype=torch.bool) if valid is None else valid.cpu()
        n_new = valid_cpu.sum(1)
        row_len = prefix + n_new
        row_off = torch.cumsum(row_len, 0) - row_len
        self.all_valid = bool(valid_cpu.all())
        self.has_prefix = bool(prefix.any())
        # flat position of every real new token, in row-major order
        new_pos = (row_off + prefix).unsqueeze(1) + torch.cumsum(valid_cpu.long(), 1) - 1
        new_pos = new_pos[valid_cpu]
        self.new_index = None if self.all_valid else torch.nonzero(valid_cpu.flatten()).flatten().to(device)
        self.new_pos = new_pos.to(device) if self.has_prefix else None
        flat_doc_start = None
        if doc_start is not None:
            flat_doc_start = torch.zeros(int(row_len.sum()), dtype=torch.bool)
            flat_doc_start[new_pos] = doc_start.cpu()[valid_cpu]
        if self.has_prefix:
            rows = torch.repeat_interleave(torch.arange(B), prefix)
            slots = torch.arange(int(prefix.sum())) - torch.repeat_interleave(torch.cumsum(prefix, 0) - prefix, prefix)
            self.prefix_rows, self.prefix_slots = rows.to(device), slots.to(device)
            self.prefix_pos = (row_off[rows] + slots).to(device)
        first_is_doc_start = torch.full((B,), not continuing)
        self.seg = Segments.build(row_len, first_is_doc_start, flat_doc_start, prefix, chunk_size, state is not None, device)

    def flatten(self, x, prefix_values=None):
        flat = x.reshape(-1, x.shape[-1])
        if self.new_index is not None:
            flat = flat.index_select(0, self.new_index)
        if not self.has_prefix:
            return flat
        out = flat.new_zeros(self.seg.num_tokens, flat.shape[-1])
        out = out.index_copy(0, self.new_pos, flat)
        return out.index_copy(0, self.prefix_pos, prefix_values.to(flat.dtype))

    def unflatten(self, o):
        if self.has_prefix:
            o = o.index_select(0, self.new_pos)
        if self.new_index is not None:
            o = o.new_zeros(self.batch_size * self.length, o.shape[-1]).index_copy(0, self.new_index, o)
        return o.view(self.batch_size, self.length, -1)


class TTTContext:
    """What the TTT layers of one forward call share: real-token mask, document starts, embeddings, cache.

    `parallel`, when set, is the context-parallel shard of this call (a `ttt_adapt.distributed.context_parallel.CPShard`): the TTT
    layers then hand their tokens to its `ttt_forward`, which carries the fast weights across ranks.
    """

    def __init__(self, valid=None, doc_start=None, inputs_embeds=None, layer_states=None, parallel=None):
        self.valid = valid  # (B, L) bool or None (all real)
        self.doc_start = doc_start  # (B, L) bool or None (no packed documents)
        self.inputs_embeds = inputs_embeds
        self.layer_states = layer_states  # {layer_idx: TTTLayerState} when generating with a cache
        self.parallel = parallel
        self._layouts = {}

    @classmethod
    def from_inputs(cls, attention_mask, position_ids, inputs_embeds, layer_states=None, explicit_positions=True):
        """Real tokens from a 2-D attention mask; document starts where explicit position_ids do not step by 1."""
        B, L = inputs_embeds.shape[:2]
        valid = None
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            m = attention_mask[:, -L:].bool()
            valid = None if bool(m.all()) else m
        doc_start = None
        if explicit_positions and position_ids is not None and L > 1:
            pos = position_ids.expand(B, L)
            ds = torch.zeros(B, L, dtype=torch.bool, device=pos.device)
            ds[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
            if valid is not None:  # a pad's position says nothing: a row's first real token starts or continues
                ds[:, 1:] &= valid[:, 1:] & valid[:, :-1]  # as the row does (a TTT state it starts from goes on)
                ds[:, 0] = False
            doc_start = ds if bool(ds.any()) else None
        return cls(valid, doc_start, inputs_embeds, layer_states)

    def with_inputs_embeds(self, inputs_embeds) -> "TTTContext":
        """This context with other input embeddings (the same tensor as a checkpointed layer's argument); the layouts
        built so far are shared."""
        ctx = copy.copy(self)
        ctx.inputs_embeds = inputs_embeds
        return ctx

    def layer_state(self, layer_idx):
        return None if self.layer_states is None else self.layer_states.get(layer_idx)

    def prepare(self, chunk_size, state):
        """Build the layout this forward's TTT layers share before any of them runs (`state`: a TTT layer's
        generation state, all alike): its host-side work and device syncs stay outside the layers, so a compiled
        decoder layer has no graph break."""
        B, L = self.inputs_embeds.shape[:2]
        if self.parallel is None and not (state is not None and state.started and L == 1):  # a decode step reads none
            self.layout(B, L, chunk_size, state, self.inputs_embeds.device)

    def layout(self, B, L, chunk_size, state, device) -> FlatLayout:
        key = (chunk_size, state is not None)
        if key not in self._layouts:  # every TTT layer sees the same tokens: build once per forward
            self._layouts[key] = FlatLayout(B, L, chunk_size, self.valid, self.doc_start, state, device)
        return self._layouts[key]

    def valid_last_token(self, B):
        if self.valid is None:
            return torch.ones(B, dtype=torch.bool)
        return self.valid[:, -1].cpu()


_OPS = _define_ops()

__all__ = [
    "TTTMLP", "TTTParams", "TTTContext", "TTTLayerState", "Segments", "fast_weight_scan", "chunk_conv",
    "fast_weight_math",
]
