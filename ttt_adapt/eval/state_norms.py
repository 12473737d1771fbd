"""The fast-weight state norms a model produces on held-out rows: what the export records as
`TTTConfig.state_norm_limit`, the reference of the shipped code's state-norm guard."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ttt_adapt._util import unwrap


@torch.no_grad()
def state_norms(model, rows: dict, batch_size: int) -> dict:
    """{"layers": TTT layer indices, "max": per layer the largest Frobenius norm of the fast-weight state after
    reading any row of `rows` (input_ids, attention_mask), fp32}. Read through the generation cache, which keeps
    each row's state after its last complete chunk."""
    lm = unwrap(model)
    layers = sorted(lm.config.ttt["layers"])
    largest = [0.0] * len(layers)
    device = next(lm.parameters()).device
    ids, mask = rows["input_ids"], rows["attention_mask"]
    for i in range(0, len(ids), batch_size):
        cache = DynamicCache(config=lm.config)
        lm.model(input_ids=ids[i : i + batch_size].to(device), attention_mask=mask[i : i + batch_size].long().to(device),
                 use_cache=True, cache=cache)  # the TTT model takes the cache under either name
        for k, layer in enumerate(layers):
            S = cache.layers[layer].ttt_state.S
            if S is not None:
                largest[k] = max(largest[k], float(torch.linalg.matrix_norm(S.float()).max()))
    return {"layers": layers, "max": largest}


__all__ = ["state_norms"]
