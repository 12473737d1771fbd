"""The TTT MLP as a vLLM state layer: the stock MLP's projections plus the fast weight, kept per request.

Each request's state lives in vLLM's state cache for hybrid models (the one Mamba layers use): vLLM allocates a
slot when a request starts, frees it when it ends, and hands each forward the slot of every request in the batch.
A slot holds, in fp32 and of fixed size (p = conv_kernel_size // 2, K = `pending_rows(chunk_size)`):
    S  (d, H)       the fast weight: the updates of the request's completed chunks
    U  (d, H)       the update of the open chunk, from its first K * floor(r / K) tokens whose target is known
    T  (2p + K, d)  the last 2p MLP inputs of the open chunk (zeros before its start), then the targets
                    lr * W_target Conv1D(t) of the r % K later known tokens, row j % K for chunk position j
    Hp (p + K, H)   the last p down_proj inputs of the open chunk, then the down_proj inputs of those r % K tokens
A token's target needs p tokens after it (or its chunk's close: zero padding at the chunk's end, as in training),
so r = max(c - p, 0) of a chunk's first c tokens have one. Known targets join U K at a time, as one rank-K
product (so a decode step writes U once every K tokens, not every token), and all at the chunk's close, which
adds U, clipped, to S (after multiplying S by `ttt.state_decay` where the export sets one). The position of a
request's first new token (vLLM's positions) says where in its chunk it is: position 0 starts a fresh state (a
reused slot, or recomputation after preemption, starts clean), and tokens of a request's first chunk read no fast
weight (S is zero there). The arithmetic is `ttt_adapt.modeling`'s: the same dtypes at the same steps.
"""

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.utils.torch_utils import direct_register_custom_op
from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum
from vllm.v1.attention.backends.short_conv_attn import (
    ShortConvAttentionBackend,
    ShortConvAttentionMetadata,
    ShortConvAttentionMetadataBuilder,
)


class TTTStateMetadataBuilder(ShortConvAttentionMetadataBuilder):
    """The state-slot metadata of mamba-like layers; never inside a full CUDA graph (the op is eager)."""

    _cudagraph_support = AttentionCGSupport.NEVER


class TTTStateBackend(ShortConvAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "TTT_MLP"

    @staticmethod
    def get_builder_cls():
        return TTTStateMetadataBuilder


PENDING_ROWS = 64  # at most this many known targets buffered per request before they join U (rank-K product)


def pending_rows(chunk_size: int) -> int:
    """K: how many known targets a request buffers before adding them to its open-chunk update U (64 for real
    chunks; a third of a small chunk, so that small test chunks add to U in the middle of a chunk too)."""
    return max(1, min(PENDING_ROWS, chunk_size // 3))


def state_shapes(config) -> tuple:
    """Shapes of one TTT layer's per-request state (S, U, T, Hp) for an export's config; see the module docstring."""
    ttt = config.ttt
    p, K = ttt["conv_kernel_size"] // 2, pending_rows(ttt["chunk_size"])
    d, H = config.hidden_size, config.intermediate_size
    return (d, H), (d, H), (2 * p + K, d), (p + K, H)


class TTTParams(nn.Module):
    """The TTT parameters, named as in the export (`mlp.ttt.*`)."""

    def __init__(self, hidden_size, ttt):
        super().__init__()
        k = ttt["conv_kernel_size"]
        self.conv = nn.Conv1d(hidden_size, hidden_size, k, padding=k // 2, groups=hidden_size, bias=False)
        self.target_proj = nn.Linear(hidden_size, hidden_size, bias=False) if ttt["use_proj"] else None
        self.lr = nn.Parameter(torch.empty(1))
        self.lr_gate = nn.Linear(hidden_size, 1) if ttt["lr_mode"] == "token" else None


class TTTMLP(nn.Module, MambaBase):
    """vLLM's gated MLP (`gate_up_proj`, `act_fn`, `down_proj`, reused) whose down_proj carries a fast weight."""

    def __init__(self, mlp, config, layer_idx, prefix):
        super().__init__()
        self.gate_up_proj, self.down_proj, self.act_fn = mlp.gate_up_proj, mlp.down_proj, mlp.act_fn
        ttt = config.ttt
        if ttt.get("key_norm") or ttt.get("write_rule", "sum") != "sum":
            raise ValueError("the ttt-adapt vLLM plugin serves the published fast weight only (ttt.key_norm false, "
                             "ttt.write_rule sum); serve this export with transformers' generate()")
        self.hidden_size = config.hidden_size
        self.chunk_size = ttt["chunk_size"]
        self.pad = ttt["conv_kernel_size"] // 2
        self.clip_update_norm = ttt["clip_update_norm"]
        decay = ttt.get("state_decay")  # exports from before the option have no key: the plain sum
        self.state_decay = None if decay is None or float(decay) == 1.0 else float(decay)
        self.pending = pending_rows(self.chunk_size)
        self.state_shapes = state_shapes(config)
        self.ttt = TTTParams(config.hidden_size, ttt)
        self.layer_idx, self.prefix = layer_idx, prefix
        vllm_config = get_current_vllm_config()
        forward_layers = vllm_config.compilation_config.static_forward_context
        if prefix in forward_layers:
            raise ValueError(f"Duplicate layer name: {prefix}")
        forward_layers[prefix] = self
        self.kv_cache = (torch.tensor([]),)

    # ------------------------------------------------------------------ vLLM's state-layer interface
    def get_state_shape(self):
        return self.state_shapes

    def get_state_dtype(self):
        return (torch.float32,) * 4

    @property
    def mamba_type(self):
        return MambaAttentionBackendEnum.TTT_MLP

    # ------------------------------------------------------------------ forward
    def forward(self, x, positions):
        gate_up, _ = self.gate_up_proj(x)  # the stock MLP, compiled with the rest of the model
        h = self.act_fn(gate_up)
        y, _ = self.down_proj(h)
        output = torch.empty_like(y)
        torch.ops.vllm.ttt_mlp(x, h, y, positions, output, self.prefix)
        return output

    def forward_impl(self, x, h, y, positions, output):
        """output = y + each token's read-out of its request's fast weight; the requests' states move past the
        batch's tokens (eager, between compiled graph pieces, as vLLM's Mamba ops)."""
        metadata = get_forward_context().attn_metadata
        metadata = metadata.get(self.prefix) if isinstance(metadata, dict) else None
        if metadata is None:  # profiling / dummy run: no state
            output.copy_(y)
            return
        assert isinstance(metadata, ShortConvAttentionMetadata)
        plan = _batch_plan(metadata, positions, self.chunk_size, self.pad)
        n = plan.tokens
        o = torch.zeros(n, self.hidden_size, dtype=torch.float32, device=x.device)
        if plan.steady:
            self._decode_steady(plan, x, h, o)
        for (s, e), slot, pos in plan.general:
            o[s:e] = self._advance(slot, pos, x[s:e], h[s:e])
        output[:n] = y[:n] + o.to(y.dtype)
        output[n:] = y[n:]

    @torch.no_grad()
    def _advance(self, slot, pos, x, h):
        """Read-out of one request's new tokens (fp32) and its state moved past them."""
        S, U, T, Hp = (state[slot] for state in self.kv_cache)
        C, p, K = self.chunk_size, self.pad, self.pending
        X, A, Hw, Hk = T[: 2 * p], T[2 * p :], Hp[:p], Hp[p:]
        if pos == 0:  # a new sequence (or one recomputed after preemption) in a slot that may hold another's state
            for t in (S, U, T, Hp):
                t.zero_()
        out = torch.zeros(x.shape[0], self.hidden_size, dtype=torch.float32, device=x.device)
        c0, i = pos % C, 0
        while i < x.shape[0]:
            take = min(x.shape[0] - i, C - c0)
            xs, hs = x[i : i + take].float(), h[i : i + take].float()
            if pos + i >= C:  # tokens of a chunk read the updates of the chunks before it (none in the first)
                out[i : i + take] = hs @ S.T
            closes = c0 + take == C
            q, r = min(c0, 2 * p), min(c0, p)  # buffered inputs / down_proj inputs before the new tokens
            ext_x = torch.cat([X[2 * p - q :], xs])  # MLP inputs from chunk position c0 - q on
            ext_h = torch.cat([Hw[p - r :], hs])  # down_proj inputs from chunk position c0 - r on
            lo = c0 - r  # chunk positions [lo, hi) get their targets now; [f, lo) wait in A / Hk
            hi = c0 + take if closes else max(c0 + take - p, lo)
            f = K * (lo // K)
            known_a = torch.cat([A[: lo - f], self._targets(ext_x.to(x.dtype), c0 - q, lo, hi).float()])
            known_h = torch.cat([Hk[: lo - f], ext_h[: hi - lo]])  # ext_h starts at lo
            g = hi if closes else K * (hi // K)  # [f, g) join U now, [g, hi) wait
            if g > f:
                U.addmm_(known_a[: g - f].T, known_h[: g - f])
            if closes:
                if self.state_decay is not None:  # the state decays before each chunk's update, as in training
                    S.mul_(self.state_decay)
                S.add_(U if self.clip_update_norm is None else U * self._clip_scale(U))
                for t in (U, T, Hp):
                    t.zero_()
                c0 = 0
            else:
                A[: hi - g] = known_a[g - f :]
                Hk[: hi - g] = known_h[g - f :]
                X.copy_(_last_rows(ext_x, 2 * p))
                Hw.copy_(_last_rows(ext_h, p))
                c0 += take
            i += take
        return out

    @torch.no_grad()
    def _decode_steady(self, plan, x, h, o):
        """`_advance` of one new token for a batch of requests whose chunk neither starts a sequence nor closes with
        it: each past its first chunk reads its S, the token p places back gets its target (where the chunk has one
        there), and a request whose buffer of known targets fills adds it to U."""
        S, U, T, Hp = self.kv_cache
        p, K = self.pad, self.pending
        rows, slots = plan.steady_rows, plan.steady_slots
        xf, hf = x[rows].float(), h[rows].float()
        for row, b, slot in plan.steady_reads:  # each request's own S, read in place
            o[row] = S[slot] @ hf[b]
        X, Hw = T[:, : 2 * p][slots], Hp[:, :p][slots]  # (B, 2p, d), (B, p, H)
        if plan.known:
            k = plan.known_index  # the requests whose token p places back gets its target now
            window = torch.cat([X[k], xf[k].unsqueeze(1)], 1).to(x.dtype)  # (k, 2p + 1, d): centred on it
            v = torch.einsum("bkd,dk->bd", window, self.ttt.conv.weight[:, 0, :].to(x.dtype))
            known_slots, row = slots[k], plan.known_row
            T[known_slots, 2 * p + row] = self._scaled_targets(v, window[:, p]).float()
            Hp[known_slots, p + row] = Hw[k, 0] if p else hf[k]
            for slot in plan.flush:  # K known targets: one rank-K product into U
                U[slot].addmm_(T[slot, 2 * p :].T, Hp[slot, p:])
        if p:
            T[:, : 2 * p][slots] = torch.cat([X[:, 1:], xf.unsqueeze(1)], 1)
            Hp[:, :p][slots] = torch.cat([Hw[:, 1:], hf.unsqueeze(1)], 1)

    def _targets(self, ext, first, lo, hi):
        """a = lr * W_target Conv1D(t) for chunk positions [lo, hi); `ext` holds the inputs from chunk position
        `first` on (zero padding before the chunk's start and after its end, as `chunk_conv`)."""
        w = self.ttt.conv.weight
        v = F.conv1d(ext.T.unsqueeze(0), w.to(ext.dtype), padding=self.pad, groups=ext.shape[1])[0].T
        return self._scaled_targets(v[lo - first : hi - first], ext[lo - first : hi - first])

    def _scaled_targets(self, v, centre):
        """lr * W_target v for conv outputs v, each centred on the MLP input in the same row of `centre`."""
        if self.ttt.target_proj is not None:
            v = self.ttt.target_proj(v)
        lr = self.ttt.lr.float()
        if self.ttt.lr_gate is not None:
            lr = lr * 2 * torch.sigmoid(self.ttt.lr_gate(centre))
        return v * lr.to(v.dtype)

    def _clip_scale(self, U):
        return torch.clamp(self.clip_update_norm / (torch.linalg.matrix_norm(U) + 1e-6), max=1.0)


def _last_rows(t, k):
    """The last k rows of t, zero rows first where t has fewer."""
    if t.shape[0] >= k:
        return t[t.shape[0] - k :]
    return torch.cat([t.new_zeros(k - t.shape[0], t.shape[1]), t])


class _BatchPlan:
    """Where each request's new tokens sit in a batch and which take the batched decode step; built once per
    forward (one host sync) and shared by the TTT layers, which all see the same requests at the same positions."""

    def __init__(self, metadata, positions, chunk_size, pad, pending):
        n_dec = metadata.num_decode_tokens
        self.tokens = n_dec + metadata.num_prefill_tokens
        spans, slots = [(i, i + 1) for i in range(n_dec)], []
        if n_dec:
            slots += metadata.state_indices_tensor_d[:n_dec, 0].tolist()
        if metadata.num_prefills:
            loc = (metadata.query_start_loc_p[: metadata.num_prefills + 1] + n_dec).tolist()
            spans += [(s, e) for s, e in zip(loc[:-1], loc[1:])]
            slots += metadata.state_indices_tensor_p[: metadata.num_prefills].tolist()
        starts = positions[[s for s, _ in spans]].tolist() if spans else []
        C, p, K = chunk_size, pad, pending
        # decode steps that neither start a sequence nor close a chunk: one batched step (the common case)
        steady = [i for i in range(n_dec) if starts[i] > 0 and starts[i] % C != C - 1]
        in_steady = set(steady)
        self.general = [(span, slots[i], starts[i]) for i, span in enumerate(spans)
                        if span[1] > span[0] and i not in in_steady]
        self.steady = bool(steady)
        if not steady:
            return
        device = positions.device
        self.steady_rows = torch.tensor(steady, device=device)
        self.steady_slots = torch.tensor([slots[i] for i in steady], device=device)
        self.steady_reads = [(i, b, slots[i]) for b, i in enumerate(steady) if starts[i] >= C]  # past chunk 1
        known = [(b, (starts[i] % C - p) % K, slots[i]) for b, i in enumerate(steady) if starts[i] % C >= p]
        self.known = bool(known)
        self.known_index = torch.tensor([b for b, _, _ in known], device=device)
        self.known_row = torch.tensor([row for _, row, _ in known], device=device)
        self.flush = [slot for _, row, slot in known if row == K - 1]


def _batch_plan(metadata, positions, chunk_size, pad):
    """The forward's `_BatchPlan` for this metadata (cached on vLLM's forward context, which lives for one forward)."""
    context = get_forward_context()
    plans = getattr(context, "_ttt_plans", None)
    if plans is None:
        plans = context._ttt_plans = {}
    key = (id(metadata), chunk_size, pad)
    if key not in plans:
        plans[key] = _BatchPlan(metadata, positions, chunk_size, pad, pending_rows(chunk_size))
    return plans[key]


def ttt_mlp(x: torch.Tensor, h: torch.Tensor, y: torch.Tensor, positions: torch.Tensor, output: torch.Tensor,
            layer_name: str) -> None:
    get_forward_context().no_compile_layers[layer_name].forward_impl(x, h, y, positions, output)


def ttt_mlp_fake(x: torch.Tensor, h: torch.Tensor, y: torch.Tensor, positions: torch.Tensor, output: torch.Tensor,
                 layer_name: str) -> None:
    return


direct_register_custom_op(op_name="ttt_mlp", op_func=ttt_mlp, mutates_args=["output"], fake_impl=ttt_mlp_fake)
