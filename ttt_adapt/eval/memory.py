"""What a fast-weight memory (`TTTState`) is worth: losses of text read starting from a state, against the same text
read from nothing, with a bootstrap interval over documents.

`memory_value` cuts held-out documents into a first part and a continuation and measures the loss on the
continuation (a) with the whole document in context, (b) starting from the first part's state alone (no attention to
it), (c) from nothing, (d) from another document's first-part state. `state_losses` measures documents read from one
saved state against the same documents read from nothing (`scripts/evaluate.py --state`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ttt_adapt._util import unwrap
from ttt_adapt.eval.loss_by_position import bootstrap_difference
from ttt_adapt.eval.settings import EvalError

MODES = {
    "full": "(a) whole document in context",
    "own_state": "(b) first part's state only",
    "nothing": "(c) nothing (no state)",
    "other_state": "(d) another document's state",
}


@torch.no_grad()
def continuation_losses(model, ids: torch.Tensor, state=None, context: torch.Tensor | None = None) -> torch.Tensor:
    """(L - 1,) losses of predicting ids[1:] from the tokens before them: read from `state` (positions from 0), or
    after `context` in the same forward (attention to it), or from nothing."""
    lm = unwrap(model)
    device = next(lm.parameters()).device
    ids = ids.to(device)
    if context is not None:
        full = torch.cat([context.to(device), ids])[None]
        logits = lm(full, use_cache=False).logits[0, len(context):-1]
    elif state is not None:
        logits = lm(ids[None], ttt_state=state, use_cache=True).logits[0, :-1]
    else:
        logits = lm(ids[None], use_cache=False).logits[0, :-1]
    return F.cross_entropy(logits.float(), ids[1:], reduction="none").cpu()


def memory_value(model, documents: list[torch.Tensor], first: int, continuation: int, log=None) -> dict:
    """The four losses of `MODES` on documents of at least `first + continuation` tokens (the longer ones cut), and
    (b) - (c), (b) - (a), (d) - (c) with bootstrap intervals over documents."""
    docs = [d[: first + continuation] for d in documents if len(d) >= first + continuation]
    if len(docs) < 2:
        raise EvalError(f"the memory measure needs 2 or more documents of {first + continuation}+ tokens, "
                        f"found {len(docs)}")
    lm = unwrap(model)
    states = [lm.read_state(d[:first]) for d in docs]
    losses = {mode: [] for mode in MODES}
    for i, d in enumerate(docs):
        head, tail = d[:first], d[first:]
        losses["full"].append(continuation_losses(lm, tail, context=head))
        losses["own_state"].append(continuation_losses(lm, tail, state=states[i]))
        losses["nothing"].append(continuation_losses(lm, tail))
        losses["other_state"].append(continuation_losses(lm, tail, state=states[(i + 1) % len(docs)]))
        if log is not None and (i + 1) % 10 == 0:
            log(f"memory: {i + 1}/{len(docs)} documents")
    table = {mode: torch.stack(v) for mode, v in losses.items()}
    weights = torch.ones_like(table["full"])
    edges = [0, table["full"].shape[1]]

    def diff(a, b):
        return bootstrap_difference(table[a], table[b], weights, edges)[0]

    return {
        "documents": len(docs), "first_tokens": first, "continuation_tokens": continuation,
        "loss": {mode: float(t.mean()) for mode, t in table.items()},
        "own_state_minus_nothing": diff("own_state", "nothing"),
        "own_state_minus_full": diff("own_state", "full"),
        "other_state_minus_nothing": diff("other_state", "nothing"),
        "state_mib": states[0].nbytes() / 2**20,
    }


def state_losses(model, documents: list[torch.Tensor], state) -> dict:
    """Mean loss of each document read starting from `state` against the same document read from nothing, and the
    difference's bootstrap interval over documents."""
    docs = [d for d in documents if len(d) >= 2]
    if not docs:
        raise EvalError("no evaluation document has 2 or more tokens")
    lm = unwrap(model)
    L = max(len(d) for d in docs) - 1
    table = {k: torch.zeros(len(docs), L) for k in ("state", "nothing")}
    weights = torch.zeros(len(docs), L)
    for i, d in enumerate(docs):
        table["state"][i, : len(d) - 1] = continuation_losses(lm, d, state=state)
        table["nothing"][i, : len(d) - 1] = continuation_losses(lm, d)
        weights[i, : len(d) - 1] = 1
    n = weights.sum()
    diff = bootstrap_difference(table["state"], table["nothing"], weights, [0, L])[0]
    return {"documents": len(docs), "tokens": int(n),
            "loss_from_state": float((table["state"] * weights).sum() / n),
            "loss_from_nothing": float((table["nothing"] * weights).sum() / n),
            "state_minus_nothing": diff, "state_tokens_read": state.tokens}
