"""Context parallelism for In-Place TTT models: one sequence split across ranks, exact.

Each row of a batch is cut into `cp_size` contiguous shards of whole chunks; rank r of a context-parallel
group holds tokens [r * L/cp, (r+1) * L/cp). Two things cross ranks:

* Attention: every rank all-gathers the keys/values of its group (differentiable) and attends with an explicit
  causal, same-document (and sliding-window) mask over global token indices.
* The TTT fast weights. Per row and rank, `g_r` is what the rank adds to the state of the document that is
  still open at its end, `m_r` whether that document was already open when the rank began (no document start
  on the rank). The state before the chunk a rank is in when it begins is an exclusive scan
      A_r = sum_{j<r} g_j * prod_{j<i<r} m_i * gamma^n_i,
  computed from an all-gather of the g_j as a masked sum (every rank keeps the collective in its autograd
  graph; slicing the gathered list would leave rank 0 without it and deadlock in backward). With
  `state_decay` gamma (1 when unset), n_i is the number of chunk updates rank i writes (chunks that end on it)
  and g_j weighs each of rank j's chunk updates by gamma^(updates rank j writes after it). A chunk that
  straddles ranks r-1 and r is finished by rank r: rank r-1 sends the open chunk's partial update b_{r-1}
  (a first all-gather), rank r adds its own part p_r (and clips the sum if asked), so the chunk's update is
  exactly the single-process one. The conv's two-token halo comes from the neighbours' edge tokens.

Every rank runs the same operations in the same order (only slice bounds differ), so the collectives that
autograd runs in backward line up across ranks. Labels and the loss are not this module's business: shift the
labels (`ttt_adapt.loss.shift_labels`) before sharding and sum the loss with `ttt_adapt.loss.loss_sum`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ttt_adapt._util import RecipeError, unwrap
from ttt_adapt.attention import blocked_sdpa, document_layout, packed_attention, packed_mask, query_blocks
from ttt_adapt.loss import IGNORE_INDEX
from ttt_adapt.modeling.ttt_layer import (CARRY, INIT, ZERO, Segments, TTTContext, chunk_conv, fast_weight_math,
                                         fast_weight_scan)

ATTN_IMPLEMENTATION = "ttt_cp"  # `ttt_packed` without a `cp_shard`; all-gather attention with one
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")


def check_cp_size(cp_size, num_processes: int) -> None:
    """`cp_size` must be an integer >= 1 that divides the process count (RecipeError, one line)."""
    if isinstance(cp_size, bool) or not isinstance(cp_size, int) or cp_size < 1:
        raise RecipeError(f"parallel.cp_size: must be an integer >= 1, got {cp_size!r}")
    if num_processes % cp_size:
        raise RecipeError(
            f"parallel.cp_size: {cp_size} does not divide the {num_processes} process(es); launch a multiple of "
            f"{cp_size} (accelerate launch --multi_gpu --num_processes {cp_size} ...; --multi_gpu on CPU-only machines too)"
        )


class ContextParallel:
    """A (dp, cp) device mesh over the default process group: rank = dp_rank * cp_size + cp_rank.

    Ranks of one context-parallel group read the same rows and each holds one shard of them; data-parallel
    groups read different rows. With `cp_size == 1` nothing is exchanged (and no process group is needed).
    """

    def __init__(self, cp_size: int, device_type: str = "cpu", query_block: int = 1024):
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        check_cp_size(cp_size, world)
        self.cp_size, self.dp_size = cp_size, world // cp_size
        self.query_block = query_block  # local queries per attention call (bounds the mask's memory)
        self.group, self.mesh = None, None
        if cp_size == 1:
            self.cp_rank, self.dp_rank = 0, rank
            return
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(device_type, (self.dp_size, cp_size), mesh_dim_names=("dp", "cp"))
        self.group = self.mesh.get_group("cp")
        self.cp_rank, self.dp_rank = self.mesh.get_local_rank("cp"), self.mesh.get_local_rank("dp")

    @property
    def enabled(self) -> bool:
        return self.cp_size > 1

    def shard(self, batch: dict, chunk_size: int) -> tuple[dict, CPShard]:
        """This rank's part of a batch of packed rows: `input_ids`, optional `position_ids`, and any other (B, L)
        field (`labels`, already shifted: `ttt_adapt.loss.shift_labels`; `attention_mask`, ...).

        Rows whose length is not a multiple of `cp_size * chunk_size` get a separate, unlabelled, masked document
        at the end. Returns the local batch and the `CPShard` to pass to the model as `cp_shard`.
        """
        if not self.enabled:
            raise ValueError("ContextParallel.shard needs cp_size > 1: a single rank holds the whole rows")
        ids = batch["input_ids"]
        B, L = ids.shape
        out = dict(batch)
        if out.get("position_ids") is None:
            out["position_ids"] = torch.arange(L, device=ids.device).expand(B, L)
        pad = -L % (self.cp_size * chunk_size)
        if pad:
            fill = {"labels": IGNORE_INDEX}
            for k, v in out.items():
                tail = torch.arange(pad, device=v.device).expand(B, pad) if k == "position_ids" \
                    else v.new_full((B, pad), fill.get(k, 0))
                out[k] = torch.cat([v, tail], 1)
        shard = CPShard(self.group, self.cp_rank, self.cp_size, out["position_ids"], self.query_block)
        return {k: v[:, shard.lo : shard.hi] for k, v in out.items()}, shard


def prepare_model(model) -> None:
    """Make a TTT model run context-parallel when called with `cp_shard=...` (in place); refuse what can't be exact.

    Sets the attention implementation to `ttt_cp`, which is plain SDPA for calls without a shard.
    """
    base = unwrap(model)
    if not hasattr(base, "ttt_modules"):
        raise ValueError(
            f"context parallelism needs an In-Place TTT model (made by ttt_adapt.convert), got {type(base).__name__}"
        )
    config = base.config
    for i, kind in enumerate(getattr(config, "layer_types", None) or ["full_attention"]):
        if kind not in ATTENTION_LAYER_TYPES:
            raise ValueError(f"context parallelism cannot split layer {i} of type {kind!r} exactly")
    if getattr(config, "attention_dropout", 0.0):
        raise ValueError(
            f"context parallelism needs attention_dropout 0 (got {config.attention_dropout}): "
            "dropout masks would differ from a single process"
        )
    _register()
    base.set_attn_implementation(ATTN_IMPLEMENTATION)


# ------------------------------------------------------------------------------------------------ one shard


class CPShard:
    """One rank's view of a sharded batch: which global tokens it holds and where documents start.

    Passed to the model as `cp_shard`; the attention function and the TTT layers read it.
    """

    def __init__(self, group, rank, size, position_ids, query_block=1024):
        B, L = position_ids.shape
        self.query_block = query_block
        self.group, self.rank, self.size = group, rank, size
        self.batch_size, self.length = B, L
        self.local_length = L // size
        self.lo, self.hi = rank * self.local_length, (rank + 1) * self.local_length
        # the packing rule of TTTContext and transformers: a document starts where positions do not go on by 1
        self._doc_id, self._doc_start_index = document_layout(position_ids.cpu())
        self.doc_start = self._doc_start_index == torch.arange(L)
        self._blocks, self._doc_ids = {}, {}
        self._plans = {}

    def check_call(self, attention_mask=None, cache=None, use_cache=False, **_):
        """Refuse model calls the context-parallel layers cannot run exactly."""
        if attention_mask is not None:
            raise ValueError("context parallelism takes no attention_mask: documents come from restarting position_ids")
        if use_cache or cache is not None:
            raise ValueError("context parallelism is for training and scoring: call the model with use_cache=False")

    def attention_blocks(self, sliding_window) -> list:
        """Local queries in blocks of `query_block` (`ttt_adapt.attention.query_blocks`, global key ranges)."""
        if sliding_window not in self._blocks:
            self._blocks[sliding_window] = query_blocks(self._doc_start_index, self.lo, self.local_length,
                                                        self.query_block, sliding_window)
        return self._blocks[sliding_window]

    def doc_ids(self, device) -> torch.Tensor:
        """(B, L) document number of every global token, on `device`."""
        if str(device) not in self._doc_ids:
            self._doc_ids[str(device)] = self._doc_id.to(device)
        return self._doc_ids[str(device)]

    def plan(self, chunk_size, kernel_size, decay=None) -> _TTTPlan:
        key = (chunk_size, kernel_size, decay)
        if key not in self._plans:
            self._plans[key] = _TTTPlan.build(self, chunk_size, kernel_size, decay)
        return self._plans[key]

    def ttt_forward(self, mlp, x, h, t):
        """The TTT MLP's output on this rank's tokens, with the fast-weight state carried across ranks."""
        if mlp.key_norm or mlp.write_rule != "sum":
            return _ttt_forward_prefix(self, mlp, x, t)
        return _ttt_forward(self, mlp, x, h, t)


@dataclass
class _TTTPlan:
    """Where one rank's units, head (end of a chunk begun on the previous rank) and open tail lie, per row."""

    seg: Segments
    head: list  # per row: (start, end) flat range of the head, empty if none
    tail: list  # per row: flat range of an open last chunk (continued by the next rank), empty if none
    carried: list  # per row: flat range of the complete units this rank adds to the state it passes on
    straddles: torch.Tensor  # (B,) the row begins inside a chunk begun on the previous rank
    continues: torch.Tensor  # (B,) no document starts in the row on this rank (the state passes through)
    scan_weights: torch.Tensor  # (cp, B): weight of rank j's g_j in this rank's A_r
    decay: float  # `state_decay` (1.0 when unset)
    carried_weights: torch.Tensor | None  # (B*Ls,) decay^(updates written after the token's unit) in `carried`
    straddle_weights: torch.Tensor | None  # (B,) decay^(units in `carried`): the straddling chunk's update in g_r
    ext_index: torch.Tensor  # conv input rows (local tokens and valid halo tokens), into [local; left; right]
    ext_units: torch.Tensor  # unit of each conv input row
    local_in_ext: torch.Tensor  # where the local tokens are among the conv input rows
    halo: int  # edge tokens exchanged with each neighbour

    @classmethod
    def build(cls, shard: CPShard, C: int, kernel_size: int, decay=None) -> _TTTPlan:
        B, L, Ls, r, cp = shard.batch_size, shard.length, shard.local_length, shard.rank, shard.size
        lo, hi = shard.lo, shard.hi
        if Ls % C:  # a chunk could then span three ranks, which the exchange below does not cover
            raise ValueError(
                f"context parallelism: shards of {Ls} tokens are not whole {C}-token TTT chunks; "
                f"shard with ContextParallel.shard(batch, chunk_size={C})"
            )
        ds = shard.doc_start
        ar = torch.arange(L)
        last_ds = torch.cummax(torch.where(ds, ar, torch.zeros_like(ar)), 1).values
        boundary = ds | ((ar - last_ds) % C == 0)
        unit_id = torch.cumsum(boundary.long(), 1)  # global unit of every token, per row
        e = min(kernel_size // 2, Ls)
        starts, ends, rows, state, init_index, write = [], [], [], [], [], []
        head, tail, carried, halos, carried_units = [], [], [], [], []
        straddles = torch.zeros(B, dtype=torch.bool)
        continues = torch.zeros(B, dtype=torch.bool)
        for b in range(B):
            off = b * Ls
            local_starts = [0] + torch.nonzero(boundary[b, lo + 1 : hi]).flatten().add(1).tolist()
            k0 = 0 if boundary[b, lo] else local_starts[1]  # the first chunk that starts on this rank
            straddle = not bool(ds[b, lo]) and k0 > 0
            open_tail = hi < L and bool(unit_id[b, hi - 1] == unit_id[b, hi])
            local_ds = torch.nonzero(ds[b, lo:hi]).flatten().tolist()
            straddles[b], continues[b] = straddle, not local_ds
            for i, s in enumerate(local_starts):
                starts.append(off + s)
                ends.append(off + (local_starts[i + 1] if i + 1 < len(local_starts) else Ls))
                rows.append(b)
                if ds[b, lo + s]:
                    state.append(ZERO)
                elif s == 0 or (straddle and s == k0):
                    state.append(INIT)
                else:
                    state.append(CARRY)
                init_index.append(B + b if straddle and s == k0 else b)
                is_head = straddle and s == 0
                is_open = open_tail and i == len(local_starts) - 1
                write.append(not is_head and not is_open)  # complete chunks only (they get clipped here)
            s_last = local_starts[-1]
            head.append((off, off + (k0 if straddle else 0)))
            tail.append((off + s_last, off + Ls) if open_tail else (off + Ls, off + Ls))
            first = k0 if not local_ds else local_ds[-1]
            carried.append((off + first, off + (s_last if open_tail else Ls)))
            # the complete units in `carried` (each one written): [start, end) flat ranges
            bounds = local_starts + [Ls]
            carried_units.append([(off + bounds[i], off + bounds[i + 1]) for i in range(len(local_starts))
                                  if first <= bounds[i] < (s_last if open_tail else Ls)])
            # valid halo tokens: those in the same chunk as the first / last local token
            n_left = sum(1 for q in range(1, e + 1) if lo - q >= 0 and unit_id[b, lo - q] == unit_id[b, lo])
            n_right = sum(1 for q in range(e) if hi + q < L and unit_id[b, hi + q] == unit_id[b, hi - 1])
            halos.append((n_left, n_right))
        n = len(starts)
        unit_of_token = torch.repeat_interleave(torch.arange(n), torch.tensor(ends) - torch.tensor(starts))
        seg = Segments(B, B * Ls, starts, ends, rows, state, [k != ZERO for k in state], write, [False] * n,
                       unit_of_token, init_index)
        # conv input rows: per row its valid left halo, its tokens, its valid right halo, indexing the
        # concatenation [local tokens (B*Ls); left edges (B*e); right edges (B*e)]
        ext_index, ext_units, local_in_ext, n_ext = [], [], [], 0
        for b, (n_left, n_right) in enumerate(halos):
            units = unit_of_token[b * Ls : (b + 1) * Ls]
            local_in_ext.append(torch.arange(n_ext + n_left, n_ext + n_left + Ls))
            n_ext += n_left + Ls + n_right
            ext_index.append(torch.cat([
                B * Ls + b * e + torch.arange(e - n_left, e), torch.arange(b * Ls, (b + 1) * Ls),
                B * Ls + B * e + b * e + torch.arange(n_right),
            ]))
            ext_units.append(torch.cat([units[:1].repeat(n_left), units, units[-1:].repeat(n_right)]))
        # m_j: no document starts in the row on rank j; A_r = sum_{j<r} g_j prod_{j<i<r} m_i decay^n_i, with n_i
        # the chunk updates rank i writes: the chunks whose last token it holds
        m = torch.stack([~ds[:, j * Ls : (j + 1) * Ls].any(1) for j in range(cp)]).double()
        decay = 1.0 if decay is None else float(decay)
        carried_weights = straddle_weights = None
        if decay != 1.0:
            last_of_unit = torch.cat([boundary[:, 1:], torch.ones(B, 1, dtype=torch.bool)], 1)
            m = m * decay ** last_of_unit.view(B, cp, Ls).sum(2).T.double()
            carried_weights = torch.zeros(B * Ls, dtype=torch.float64)
            for units in carried_units:
                for i, (s, end) in enumerate(units):
                    carried_weights[s:end] = decay ** (len(units) - 1 - i)
            straddle_weights = decay ** torch.tensor([len(units) for units in carried_units], dtype=torch.float64)
        weights = torch.zeros(cp, B, dtype=torch.float64)
        for j in range(r):
            weights[j] = m[j + 1 : r].prod(0)  # the empty product (j = r-1) is 1
        return cls(seg, head, tail, carried, straddles, continues, weights, decay, carried_weights, straddle_weights,
                   torch.cat(ext_index), torch.cat(ext_units), torch.cat(local_in_ext), e)

    def to(self, device) -> _TTTPlan:
        if self.ext_index.device == torch.device(device):
            return self
        self.seg.unit_of_token = self.seg.unit_of_token.to(device)
        self.seg.write_of_token = self.seg.write_of_token.to(device)
        for name in ("ext_index", "ext_units", "local_in_ext"):
            setattr(self, name, getattr(self, name).to(device))
        return self


class _AllGather(torch.autograd.Function):
    """All-gather along a new first dim; backward reduce-scatters (sums each rank's slice over the group).

    torch.distributed.nn's all_gather backward breaks on gloo subgroups (it scatters from group ranks as if they
    were global ranks), so the (dp, cp) mesh needs this one.
    """

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        world = dist.get_world_size(group)
        out = tensor.new_empty(world * tensor.numel())
        dist.all_gather_single(out, tensor.contiguous().flatten(), group=group)
        return out.view(world, *tensor.shape)

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty(grad.shape[1:])
        dist.reduce_scatter_single(out.view(-1), grad.contiguous().view(-1), group=ctx.group)
        return out, None


def _gathered(tensor, group) -> torch.Tensor:
    """Differentiable all-gather, stacked: (world, *tensor.shape)."""
    return _AllGather.apply(tensor, group)


def _partial_updates(a, h, ranges, acc) -> torch.Tensor:
    """(R, d, H): sum_i a_i h_i^T over each flat range (zeros for an empty one), in fp32 or wider."""
    return torch.stack([a[s:e].to(acc).T @ h[s:e].to(acc) for s, e in ranges])


def _ttt_forward(shard: CPShard, mlp, x, h, t):
    ttt = mlp.ttt
    plan = shard.plan(mlp.chunk_size, ttt.conv.kernel_size[0], mlp.state_decay).to(x.device)
    seg, group, r, cp = plan.seg, shard.group, shard.rank, shard.size
    Ls, e = x.shape[1], plan.halo
    xf, hf, tf = x.reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1]), t.reshape(-1, t.shape[-1])

    # Conv with the neighbours' edge tokens as halo (all ranks exchange both edges; invalid ones are not read).
    edges = _gathered(torch.stack([t[:, :e], t[:, Ls - e :]]), group)  # (cp, 2, B, e, d)
    left, right = edges[(r - 1) % cp, 1], edges[(r + 1) % cp, 0]
    src = torch.cat([tf, left.reshape(-1, tf.shape[-1]), right.reshape(-1, tf.shape[-1])])
    conv = chunk_conv(src.index_select(0, plan.ext_index), ttt.conv.weight, plan.ext_units)
    a = ttt.scale_targets(conv.index_select(0, plan.local_in_ext), xf, hf, seg, mlp.clip_update_norm)
    init_state = _initial_states(shard, plan, a, hf, mlp.clip_update_norm)

    fused = type(mlp.down_proj) is torch.nn.Linear
    out, _ = fast_weight_scan(hf, a, seg, init_state, mlp.down_proj.weight if fused else None, plan.decay)
    if fused:
        y = out.view(*x.shape[:-1], -1)
        return y if mlp.down_proj.bias is None else y + mlp.down_proj.bias
    y = mlp.down_proj(h)
    return y + out.view(*x.shape[:-1], -1).to(y.dtype)


def _ttt_forward_prefix(shard: CPShard, mlp, x, t):
    """The TTT MLP on this rank's tokens when the state does not add up across ranks (the delta rule, whose write
    depends on the state it writes into; normalised keys go the same way): rank r all-gathers the MLP inputs (and
    target sources) of the ranks before it and runs the single-process layer over the row's tokens up to its
    shard's end, keeping its own shard. Exact, but that layer's work and activations grow with the rank: the last
    rank runs it over the whole row."""
    group, r = shard.group, shard.rank
    xs = torch.cat(_gathered(x, group)[: r + 1].unbind(0), dim=1)  # (B, hi, d): the row up to this shard's end
    ts = xs if mlp.target == "hidden_states" else torch.cat(_gathered(t, group)[: r + 1].unbind(0), dim=1)
    # positions restart at every document start: the documents stay apart
    positions = (torch.arange(shard.hi) - shard._doc_start_index[:, : shard.hi]).to(x.device)
    outer = mlp.ttt_context
    mlp.ttt_context = TTTContext.from_inputs(None, positions, ts)
    try:
        y = mlp(xs)
    finally:
        mlp.ttt_context = outer
    return y[:, shard.lo : shard.hi]


@fast_weight_math
def _initial_states(shard: CPShard, plan: _TTTPlan, a, hf, clip_update_norm) -> torch.Tensor:
    """(2B, d, H) the states this rank's INIT units start from (`plan.seg.init_index`): per row the state before
    its first chunk, then that (times the decay) plus the straddling chunk's update; fp32 or wider under autocast
    too."""
    group, r, cp, device = shard.group, shard.rank, shard.size, a.device
    acc = torch.promote_types(hf.dtype, torch.float32)
    # Phase 1: the open chunk's partial update goes to the next rank, which finishes (and clips) that chunk.
    open_part = _partial_updates(a, hf, plan.tail, acc)
    previous = _gathered(open_part, group)[(r - 1) % cp]
    straddles = plan.straddles.to(device=device, dtype=acc)[:, None, None]
    chunk = previous + _partial_updates(a, hf, plan.head, acc)
    if clip_update_norm is not None:
        norm = torch.linalg.matrix_norm(chunk)
        chunk = chunk * torch.clamp(clip_update_norm / (norm + 1e-6), max=1.0)[:, None, None]
    straddle_update = chunk * straddles
    # Phase 2: exclusive scan of what each rank adds to the state it passes on.
    continues = plan.continues.to(device=device, dtype=acc)
    if plan.decay == 1.0:
        passed_on = continues[:, None, None] * straddle_update + _partial_updates(a, hf, plan.carried, acc)
    else:  # each update decays once for every update this rank writes after it
        straddle_weights = (continues * plan.straddle_weights.to(device=device, dtype=acc))[:, None, None]
        weighted = a.to(acc) * plan.carried_weights.to(device=device, dtype=acc)[:, None]
        passed_on = straddle_weights * straddle_update + _partial_updates(weighted, hf, plan.carried, acc)
    weights = plan.scan_weights.to(device=device, dtype=acc)[:, :, None, None]
    before = (weights * _gathered(passed_on, group)).sum(0)  # A_r: the state before this rank's first chunk
    after = before if plan.decay == 1.0 else plan.decay * before  # the straddling chunk's write decays it
    return torch.cat([before, after + straddle_update])


# ------------------------------------------------------------------------------------------------ attention


def cp_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                 cp_shard=None, **kwargs):
    """transformers attention function `ttt_cp`: blocked SDPA over keys/values all-gathered across the CP group;
    without a `cp_shard`, `ttt_adapt.attention.packed_attention`."""
    if cp_shard is None:
        return packed_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                sliding_window=sliding_window, **kwargs)
    if dropout:
        raise ValueError("context parallelism cannot apply attention dropout exactly: set attention_dropout to 0")
    if kwargs.get("softcap") is not None:  # no family passes one today (SDPA has no softcapping either)
        raise ValueError("context parallelism cannot apply attention logit softcapping")
    blocks = cp_shard.attention_blocks(sliding_window)
    kv = _gathered(torch.stack([key, value]), cp_shard.group)  # (cp, 2, B, kv_heads, L/cp, D)
    # only the shards holding keys some local query can see, up to this rank's own
    Ls = cp_shard.local_length
    first_shard = min(ks for _, _, ks, _ in blocks) // Ls
    kv = torch.cat(kv.unbind(0)[first_shard : cp_shard.rank + 1], dim=3)
    out = blocked_sdpa(query, kv[0], kv[1], cp_shard.doc_ids(query.device), cp_shard.lo, blocks,
                       key_offset=first_shard * Ls, sliding_window=sliding_window, scaling=scaling)
    return out, None


_REGISTERED = False


def _register():
    global _REGISTERED
    if not _REGISTERED:
        AttentionInterface.register(ATTN_IMPLEMENTATION, cp_attention)
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, packed_mask)  # no L x L mask, local or global
        _REGISTERED = True


__all__ = ["ContextParallel", "CPShard", "check_cp_size", "prepare_model", "cp_attention", "ATTN_IMPLEMENTATION"]
