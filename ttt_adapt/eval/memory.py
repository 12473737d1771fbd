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


def memory_horizon(after: dict) -> dict:
    """The memory horizon of `memory_after_reading`'s `after` ({F: {"minus_nothing": {mean, low, high}}}): the longest
    filler F up to which the own state still beats no state, i.e. at F and at every shorter F measured the upper end
    of the bootstrap interval of own state - nothing is below 0. `horizon`: that F, None when not even the shortest
    (F = 0: the state as read) beats nothing; `lost_at`: the first F where it no longer does (None if never)."""
    horizon = lost = None
    for filler in sorted(after, key=int):
        d = after[filler]["minus_nothing"]
        if d is None or d["high"] >= 0:
            lost = int(filler)
            break
        horizon = int(filler)
    return {"horizon": horizon, "lost_at": lost}


def memory_after_reading(model, documents: list[torch.Tensor], first: int, continuation: int, fillers: list[int],
                         log=None) -> dict:
    """What reading more does to a memory: for each count F in `fillers` (and F = 0, always), the loss on the
    continuation starting from the first part's state followed by F tokens of other documents (the next ones' text,
    in order), against (c) from nothing; with bootstrap intervals of the difference over documents; and the memory
    horizon (`memory_horizon`: the longest F at which the state still beats nothing)."""
    fillers = sorted({0, *fillers})
    index = [k for k, d in enumerate(documents) if len(d) >= first + continuation]
    docs = [documents[k][: first + continuation] for k in index]
    if len(docs) < 2:
        raise EvalError(f"the memory measure needs 2 or more documents of {first + continuation}+ tokens, "
                        f"found {len(docs)}")
    lm = unwrap(model)
    stream = torch.cat(list(documents))  # the filler: the corpus text after document i's own
    starts = torch.cumsum(torch.tensor([0] + [len(d) for d in documents]), 0)
    nothing = torch.stack([continuation_losses(lm, d[first:]) for d in docs])
    weights, edges = torch.ones_like(nothing), [0, nothing.shape[1]]
    out = {"documents": len(docs), "loss_nothing": float(nothing.mean()), "after": {}}
    for filler in fillers:
        rows = []
        for i, d in zip(index, docs):
            state = lm.read_state(d[:first])
            if filler:
                s = int(starts[i + 1]) % len(stream)
                text = torch.cat([stream, stream])[s : s + filler]  # wraps around a short corpus
                state = lm.read_state(text, state=state)
            rows.append(continuation_losses(lm, d[first:], state=state))
        table = torch.stack(rows)
        out["after"][str(filler)] = {"loss": float(table.mean()),
                                     "minus_nothing": bootstrap_difference(table, nothing, weights, edges)[0]}
        if log is not None:
            log(f"memory after {filler} more tokens: {out['after'][str(filler)]['loss']:.4f}")
    out.update(memory_horizon(out["after"]))
    return out


def horizon_line(result: dict) -> str:
    """One line for `memory_horizon`'s result, e.g. "512 tokens (the state beats no state after 512 more tokens of
    other text, not after 2048)" or "none (the state does not beat no state even as read, F = 0)"."""
    horizon, lost = result["horizon"], result["lost_at"]
    if horizon is None:
        return "none (the state does not beat no state even as read, F = 0)"
    held = "as read" if horizon == 0 else f"after {horizon} more tokens of other text"
    tail = f", not after {lost}" if lost is not None else ", the longest filler measured"
    return f"{horizon} tokens (the state beats no state {held}{tail})"


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
