"""Attention over packed rows without an L x L mask: queries in blocks, each over the keys it can see.

With SDPA or eager attention and `position_ids` that restart, transformers builds a dense (B, 1, L, L) mask for
packed documents (16 GB of bools at 128k tokens). The `ttt_packed` attention implementation (training only; an
export keeps the recipe's own) instead reads the documents from `position_ids` (a document starts where the
position is not the previous one + 1, transformers' packing rule) and runs SDPA on blocks of queries, each
over the keys from the start of the earliest document still open at its first query (or the sliding window's
reach) up to its last query, with a block x keys mask. Calls transformers would give a padding or cache mask
to get exactly that mask and plain SDPA. Context parallelism (`ttt_adapt.distributed.context_parallel`) uses the same blocks over
its all-gathered keys.

FlashAttention-2/3 (`model.attn_implementation`) already isolate packed documents without a mask through their
variable-length path; training leaves them as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ttt_adapt._util import unwrap

ATTN_IMPLEMENTATION = "ttt_packed"
QUERY_BLOCK = 1024  # queries per SDPA call: the mask is QUERY_BLOCK x keys


def document_layout(position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(doc_id, doc_start_index), both (B, L) long: each token's document number in its row and the index of
    that document's first token. A document starts where the position is not the previous one + 1."""
    B, L = position_ids.shape
    start = torch.ones(B, L, dtype=torch.bool, device=position_ids.device)
    start[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    ar = torch.arange(L, device=position_ids.device).expand(B, L)
    doc_start_index = torch.cummax(torch.where(start, ar, torch.zeros_like(ar)), 1).values
    return torch.cumsum(start.long(), 1), doc_start_index


def query_blocks(doc_start_index, lo: int, length: int, block: int, sliding_window) -> list:
    """[(q_start, q_end, k_start, k_end)] for queries lo .. lo+length-1 of the rows in blocks of `block`: local
    query ranges (from lo) and global key ranges. A block's keys run from the earliest one any of its queries can
    see to its last query: causality and document starts skip the rest."""
    firsts = list(range(0, length, block))
    k_starts = doc_start_index[:, [lo + q for q in firsts]].min(0).values.tolist()  # one device sync
    blocks = []
    for qs, ks in zip(firsts, k_starts):
        if sliding_window is not None:
            ks = max(ks, lo + qs - sliding_window + 1)
        blocks.append((qs, min(qs + block, length), ks, lo + min(qs + block, length)))
    return blocks


def block_mask(doc_id, lo: int, block: tuple, sliding_window) -> torch.Tensor:
    """(B, 1, q, k) bool for one of `query_blocks`: same document, key <= query, within the window."""
    qs, qe, ks, ke = block
    q = torch.arange(lo + qs, lo + qe, device=doc_id.device)[:, None]
    k = torch.arange(ks, ke, device=doc_id.device)[None, :]
    allowed = k <= q
    if sliding_window is not None:
        allowed &= k > q - sliding_window
    same_doc = doc_id[:, lo + qs : lo + qe, None] == doc_id[:, None, ks:ke]
    return (allowed & same_doc).unsqueeze(1)


def blocked_sdpa(query, key, value, doc_id, lo: int, blocks: list, key_offset: int = 0, sliding_window=None,
                 scaling=None, dropout: float = 0.0) -> torch.Tensor:
    """SDPA of (B, heads, Lq, D) queries (global index lo + i) over keys/values (B, kv_heads, Lk, D) whose first
    one has global index `key_offset`, block by block; returns (B, Lq, heads, D) as transformers expects."""
    outs = []
    for block in blocks:
        qs, qe, ks, ke = block
        outs.append(F.scaled_dot_product_attention(
            query[:, :, qs:qe], key[:, :, ks - key_offset : ke - key_offset],
            value[:, :, ks - key_offset : ke - key_offset], attn_mask=block_mask(doc_id, lo, block, sliding_window),
            dropout_p=dropout, scale=scaling, enable_gqa=query.shape[1] != key.shape[1],  # no repeated K/V
        ))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).contiguous()


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                     position_ids=None, **kwargs):
    """transformers attention function `ttt_packed`: blocked SDPA where `packed_mask` left the mask to it,
    plain SDPA otherwise."""
    L = query.shape[2]
    if attention_mask is not None or key.shape[2] != L or position_ids is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, position_ids=position_ids, **kwargs)
    position_ids = position_ids.expand(query.shape[0], L)
    if kwargs.get("use_cache"):  # transformers isolates packed documents only without a cache
        position_ids = torch.arange(L, device=query.device).expand_as(position_ids)
    doc_id, doc_start_index = document_layout(position_ids)
    blocks = query_blocks(doc_start_index, 0, L, QUERY_BLOCK, sliding_window)
    return blocked_sdpa(query, key, value, doc_id, 0, blocks, sliding_window=sliding_window, scaling=scaling,
                        dropout=dropout), None


def packed_mask(*args, **kwargs):
    """Mask builder of `ttt_packed`: nothing for a call without padding mask or cached keys (the attention
    function builds its blocks' masks from `position_ids`), transformers' SDPA mask otherwise.

    transformers calls mask builders by keyword: `q_length`/`q_offset` from 5.x releases that have them,
    `cache_position` before (5.0); the arguments go on to `sdpa_mask` exactly as received.
    """
    q_length, q_offset = kwargs.get("q_length"), kwargs.get("q_offset", 0)
    if q_length is None and kwargs.get("cache_position") is not None:
        q_length, q_offset = kwargs["cache_position"].shape[0], kwargs["cache_position"][0]
    kv_length, kv_offset = kwargs.get("kv_length"), kwargs.get("kv_offset", 0)
    if (not args and kwargs.get("attention_mask") is None and q_length is not None and q_length == kv_length
            and not _nonzero(q_offset) and not _nonzero(kv_offset)):
        return None
    return sdpa_mask(*args, **kwargs)


def _nonzero(offset) -> bool:
    return bool(offset != 0)


def use_packed_attention(model) -> None:
    """Run the model's attention as `ttt_packed` (in place; peft-wrapped models too)."""
    register()
    base = unwrap(model)
    base.set_attn_implementation(ATTN_IMPLEMENTATION)


_REGISTERED = []


def register() -> None:
    if not _REGISTERED:
        AttentionInterface.register(ATTN_IMPLEMENTATION, packed_attention)
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, packed_mask)
        _REGISTERED.append(True)


__all__ = ["ATTN_IMPLEMENTATION", "packed_attention", "packed_mask", "use_packed_attention", "blocked_sdpa",
           "query_blocks", "block_mask", "document_layout"]
