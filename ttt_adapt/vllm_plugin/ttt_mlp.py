"""The TTT MLP as a vLLM state layer: the stock MLP's projections plus the fast weight, kept per request.

Each request's state lives in vLLM's state cache for hybrid models (the one Mamba layers use): vLLM allocates a
slot when a request starts, frees it when it ends, and hands each forward the slot of every request in the batch.
A slot holds, in fp32 and of fixed size:
    S    (d, H)   the fast weight: the updates of the request's completed chunks
    U    (d, H)   the update of the open chunk, from the tokens whose target is known
    T    (2p, d)  the last 2p MLP inputs of the open chunk (zeros before its start), p = conv_kernel_size // 2
    Hp   (p, H)   the last p down_proj inputs of the open chunk (their targets still wait for look-ahead)
A token's target needs p tokens after it, so its update joins U p tokens later, or when its chunk closes (zero
padding at the chunk's end, as in training). The position of a request's first new token (vLLM's positions)
says where in its chunk it is; position 0 starts a fresh state, so a reused slot and recomputation after
preemption start clean. The arithmetic is `ttt_adapt.modeling`'s: the same dtypes at the same steps.
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


def state_shapes(hidden_size: int, intermediate_size: int, conv_kernel_size: int) -> tuple:
    """Shapes of one TTT layer's per-request state (S, U, T, Hp); see the module docstring."""
    p = conv_kernel_size // 2
    d, H = hidden_size, intermediate_size
    return (d, H), (d, H), (max(2 * p, 1), d), (max(p, 1), H)


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
        self.hidden_size, self.intermediate_size = config.hidden_size, config.intermediate_size
        self.chunk_size = ttt["chunk_size"]
        self.pad = ttt["conv_kernel_size"] // 2
        self.clip_update_norm = ttt["clip_update_norm"]
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
        return state_shapes(self.hidden_size, self.intermediate_size, 2 * self.pad + 1)

    def get_state_dtype(self):
        return (torch.float32,) * 4

    @property
    def mamba_type(self):
        return MambaAttentionBackendEnum.TTT_MLP

    # ------------------------------------------------------------------ forward
    def forward(self, x, positions):
        output = torch.empty_like(x)
        torch.ops.vllm.ttt_mlp(x, positions, output, self.prefix)
        return output

    def forward_impl(self, x, positions, output):
        gate_up, _ = self.gate_up_proj(x)
        h = self.act_fn(gate_up)
        y, _ = self.down_proj(h)
        metadata = get_forward_context().attn_metadata
        metadata = metadata.get(self.prefix) if isinstance(metadata, dict) else None
        if metadata is None:  # profiling / dummy run: no state
            output.copy_(y)
            return
        assert isinstance(metadata, ShortConvAttentionMetadata)
        n_dec, n_pre = metadata.num_decode_tokens, metadata.num_prefill_tokens
        n = n_dec + n_pre
        spans, slots = [], []
        if n_dec:
            spans += [(i, i + 1) for i in range(n_dec)]
            slots += metadata.state_indices_tensor_d[:n_dec, 0].tolist()
        if metadata.num_prefills:
            loc = (metadata.query_start_loc_p[: metadata.num_prefills + 1] + n_dec).tolist()
            spans += list(zip(loc[:-1], loc[1:]))
            slots += metadata.state_indices_tensor_p[: metadata.num_prefills].tolist()
        starts = positions[[s for s, _ in spans]].tolist() if spans else []
        o = torch.zeros(n, self.hidden_size, dtype=torch.float32, device=x.device)
        C, p = self.chunk_size, self.pad
        # decode steps that neither start a sequence nor close a chunk: one batched step (the common case)
        steady = [i for i in range(n_dec) if starts[i] > 0 and starts[i] % C != C - 1] if p else []
        if steady:
            rows = torch.tensor(steady, device=x.device)
            o[rows] = self._decode_steady(
                torch.tensor([slots[i] for i in steady], device=x.device),
                torch.tensor([starts[i] % C >= p for i in steady], device=x.device), x[rows], h[rows])
        done = set(steady)
        for i, ((s, e), slot, pos) in enumerate(zip(spans, slots, starts)):
            if e > s and i not in done:
                o[s:e] = self._advance(slot, pos, x[s:e], h[s:e])
        output[:n] = y[:n] + o.to(y.dtype)
        output[n:] = y[n:]

    @torch.no_grad()
    def _advance(self, slot, pos, x, h):
        """Read-out of one request's new tokens (fp32) and its state moved past them."""
        S, U, T, Hp = (state[slot] for state in self.kv_cache)
        C, p = self.chunk_size, self.pad
        if pos == 0:  # a new sequence (or one recomputed after preemption) in a slot that may hold another's state
            for t in (S, U, T, Hp):
                t.zero_()
        out = torch.empty(x.shape[0], self.hidden_size, dtype=torch.float32, device=x.device)
        c0, i = pos % C, 0
        while i < x.shape[0]:
            take = min(x.shape[0] - i, C - c0)
            xs, hs = x[i : i + take], h[i : i + take]
            out[i : i + take] = hs.float() @ S.T  # tokens of a chunk read the updates of the chunks before it
            closes = c0 + take == C
            q, r = min(c0, 2 * p), min(c0, p)  # buffered inputs / down_proj inputs before the new tokens
            ext_x = torch.cat([T[T.shape[0] - q :][: q], xs.float()]) if q else xs.float()
            ext_h = torch.cat([Hp[Hp.shape[0] - r :][: r], hs.float()]) if r else hs.float()
            lo = c0 - r  # chunk positions [lo, hi) get their targets now
            hi = c0 + take if closes else max(c0 + take - p, lo)
            if hi > lo:
                a = self._targets(ext_x.to(x.dtype), c0 - q, lo, hi)
                U.addmm_(a.float().T, ext_h[lo - (c0 - r) : hi - (c0 - r)])
            if closes:
                update = U if self.clip_update_norm is None else U * self._clip_scale(U)
                S.add_(update)
                for t in (U, T, Hp):
                    t.zero_()
                c0 = 0
            else:
                if p:
                    T.copy_(_last_rows(ext_x, T.shape[0]))
                    Hp.copy_(_last_rows(ext_h, Hp.shape[0]))
                c0 += take
            i += take
        return out

    @torch.no_grad()
    def _decode_steady(self, slots, finalize, x, h):
        """`_advance` of one new token for a batch of requests whose chunk neither starts nor closes with it: each
        reads its S, and the token p places back gets its target (where the chunk has one there: `finalize`)."""
        S, T, Hp = (self.kv_cache[i][slots] for i in (0, 2, 3))
        out = torch.bmm(h.float().unsqueeze(1), S.transpose(1, 2)).squeeze(1)
        window = torch.cat([T, x.float().unsqueeze(1)], 1).to(x.dtype)  # (B, 2p + 1, d): centred on the token p back
        v = torch.einsum("bkd,dk->bd", window, self.ttt.conv.weight[:, 0, :].to(x.dtype))
        if self.ttt.target_proj is not None:
            v = self.ttt.target_proj(v)
        lr = self.ttt.lr.float()
        if self.ttt.lr_gate is not None:
            lr = lr * 2 * torch.sigmoid(self.ttt.lr_gate(window[:, self.pad]))
        a = (v * lr.to(v.dtype)).float() * finalize.unsqueeze(1)
        self.kv_cache[1].index_add_(0, slots, torch.bmm(a.unsqueeze(2), Hp[:, 0].unsqueeze(1)))
        self.kv_cache[2][slots] = torch.cat([T[:, 1:], x.float().unsqueeze(1)], 1)
        self.kv_cache[3][slots] = torch.cat([Hp[:, 1:], h.float().unsqueeze(1)], 1)
        return out

    def _targets(self, ext, first, lo, hi):
        """a = lr * W_target Conv1D(t) for chunk positions [lo, hi); `ext` holds the inputs from chunk position
        `first` on (zero padding before the chunk's start and after its end, as `chunk_conv`)."""
        w = self.ttt.conv.weight
        v = F.conv1d(ext.T.unsqueeze(0), w.to(ext.dtype), padding=self.pad, groups=ext.shape[1])[0].T
        v = v[lo - first : hi - first]
        xs = ext[lo - first : hi - first]
        if self.ttt.target_proj is not None:
            v = self.ttt.target_proj(v)
        lr = self.ttt.lr.float()
        if self.ttt.lr_gate is not None:
            lr = lr * 2 * torch.sigmoid(self.ttt.lr_gate(xs))
        return v * lr.to(v.dtype)

    def _clip_scale(self, U):
        return torch.clamp(self.clip_update_norm / (torch.linalg.matrix_norm(U) + 1e-6), max=1.0)


def _last_rows(t, k):
    """The last k rows of t, zero rows first where t has fewer."""
    if t.shape[0] >= k:
        return t[t.shape[0] - k :]
    return torch.cat([t.new_zeros(k - t.shape[0], t.shape[1]), t])


def ttt_mlp(x: torch.Tensor, positions: torch.Tensor, output: torch.Tensor, layer_name: str) -> None:
    get_forward_context().no_compile_layers[layer_name].forward_impl(x, positions, output)


def ttt_mlp_fake(x: torch.Tensor, positions: torch.Tensor, output: torch.Tensor, layer_name: str) -> None:
    return


direct_register_custom_op(op_name="ttt_mlp", op_func=ttt_mlp, mutates_args=["output"], fake_impl=ttt_mlp_fake)
