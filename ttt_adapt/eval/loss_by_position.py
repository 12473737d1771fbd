"""Loss by position: held-out documents tokenised, per-token losses (with the model's own fast weights, another
document's, or none), their means per position bin, and the bootstrap interval of a difference."""

from __future__ import annotations

import bisect
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ttt_adapt.data.corpus import recall_spans
from ttt_adapt._util import unwrap
from ttt_adapt.eval.settings import EvalError
from ttt_adapt.eval.swapped_state import fast_weight_sources


LOGIT_SLICE = 1024  # positions whose logits exist at once: (batch, 1024, vocab), not (batch, seq_len, vocab)


RESAMPLES, CONFIDENCE = 1000, 0.95  # the bootstrap interval of own - swapped, over documents


def tokenize_documents(tokenizer, docs: list[str], seq_len: int, pad_id: int) -> dict:
    """The first `seq_len` tokens of each document, right-padded: input_ids, attention_mask, `recall` (the tokens
    that overlap a query answer of `ttt_adapt.data.corpus.recall_spans`; all False for other corpora) and
    `recall_distance` (for those tokens, how many tokens back the answer was last written: `answer_distances`; -1
    elsewhere)."""
    fast = getattr(tokenizer, "is_fast", False)
    enc = tokenizer(docs, return_offsets_mapping=fast, truncation=True, max_length=seq_len)
    ids = torch.full((len(docs), seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros(len(docs), seq_len, dtype=torch.bool)
    recall = torch.zeros(len(docs), seq_len, dtype=torch.bool)
    distance = torch.full((len(docs), seq_len), -1, dtype=torch.long)
    for i, doc in enumerate(docs):
        row = enc["input_ids"][i]
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = True
        if fast:
            offsets = enc["offset_mapping"][i]
            for j, d in answer_distances(doc, offsets, recall_spans(doc)):
                recall[i, j], distance[i, j] = True, d
    keep = mask.sum(1) >= 2  # a 1-token document has nothing to predict
    if not keep.any():
        raise EvalError("no held-out document has 2 or more tokens")
    return {"input_ids": ids[keep], "attention_mask": mask[keep], "recall": recall[keep],
            "recall_distance": distance[keep]}


def answer_distances(text: str, offsets, spans, within: tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """(token index, distance) for every token overlapping an answer span (character spans into `text`; tokens by
    their character `offsets`): the distance is how many tokens back the answer's text last appeared (the token
    holding that mention's last character), i.e. how far a memory has to reach for it; -1 when it never did.
    Mentions are searched in `text[:a]` (a: the answer's start), or only in the character range `within` (a user
    recall file's document, without its question)."""
    ends = [e for _, e in offsets]
    out = []
    for a, b in spans:
        tokens = [j for j, (s, e) in enumerate(offsets) if e > s and s < b and e > a]
        if not tokens:
            continue
        mention = text.rfind(text[a:b], *(within or (0, a)))
        last = bisect.bisect_left(ends, mention + (b - a)) if mention >= 0 else None
        out += [(j, tokens[0] - last if last is not None else -1) for j in tokens]
    return out


@torch.no_grad()
def token_losses(model, rows: dict, batch_size: int) -> torch.Tensor:
    """(N, L) loss of predicting token j from tokens < j (column 0 and padding: 0)."""
    lm = unwrap(model)  # peft injects LoRA in place: the unwrapped modules still apply it
    ids, mask = rows["input_ids"], rows["attention_mask"]
    return torch.cat([_batch_losses(lm, ids[i : i + batch_size], mask[i : i + batch_size])
                      for i in range(0, len(ids), batch_size)])


@torch.no_grad()
def swapped_token_losses(model, rows: dict, partners: list[int | None], batch_size: int) -> torch.Tensor:
    """`token_losses` of each document read with the fast weights its partner (`swap_partners`) writes, chunk for
    chunk; documents without a partner: 0. Each forward holds the documents and their partners (cut to the
    documents' lengths), about `batch_size` rows."""
    lm = unwrap(model)
    ids, mask = rows["input_ids"], rows["attention_mask"]
    out = torch.zeros(ids.shape)
    docs = [i for i, p in enumerate(partners) if p is not None]
    step = max(1, batch_size // 2)
    for k in range(0, len(docs), step):
        batch = docs[k : k + step]
        donors = [partners[i] for i in batch]
        n = len(batch)
        with fast_weight_sources(lm, [n + i for i in range(n)] * 2):  # rows i read row n + i; those their own
            losses = _batch_losses(lm, torch.cat([ids[batch], ids[donors]]), torch.cat([mask[batch], mask[batch]]))
        out[batch] = losses[:n]
    return out


@torch.no_grad()
def stateless_token_losses(model, rows: dict, batch_size: int) -> torch.Tensor:
    """`token_losses` with the fast weights never written: every TTT MLP computes `down_proj(h)` alone."""
    with fast_weight_sources(model, None):
        return token_losses(model, rows, batch_size)


@contextmanager
def blocked_attention(model):
    """Inside, `model` attends with `ttt_adapt.attention`'s `ttt_packed` (queries in blocks over the keys they can
    see: causality and sliding windows skip the rest, where SDPA with a mask computes all L x L scores; the same
    values); its own implementation is restored after. Rows without padding only: padded ones fall back to SDPA."""
    from ttt_adapt.attention import use_packed_attention

    lm = unwrap(model)
    before = lm.config._attn_implementation
    use_packed_attention(lm)
    try:
        yield
    finally:
        lm.set_attn_implementation(before)


def _batch_losses(lm, x, m):
    """Runs the decoder (`lm.model`) once and the LM head on `LOGIT_SLICE` positions at a time: a 150k vocabulary
    at 32k positions would not fit as one logits tensor."""
    device = next(lm.parameters()).device
    x, m = x.to(device), m.to(device)
    if bool(m.all()):  # no padding: no mask, so an attention that skips what it cannot see (`ttt_packed`) may
        positions = torch.arange(x.shape[1], device=device).expand(x.shape)
        hidden = lm.model(input_ids=x, position_ids=positions, use_cache=False).last_hidden_state
    else:
        hidden = lm.model(input_ids=x, attention_mask=m.long(), use_cache=False).last_hidden_state
    loss = torch.zeros(x.shape, dtype=torch.float32, device=device)
    for s in range(0, x.shape[1] - 1, LOGIT_SLICE):
        e = min(s + LOGIT_SLICE, x.shape[1] - 1)
        logits = lm.lm_head(hidden[:, s:e]).float()
        loss[:, s + 1 : e + 1] = F.cross_entropy(logits.transpose(1, 2), x[:, s + 1 : e + 1], reduction="none")
    return (loss * m).cpu()


def bin_means(losses: torch.Tensor, weights: torch.Tensor, edges: list[int]) -> list[float | None]:
    """Mean of `losses` where `weights` is set, per position bin [edges[k], edges[k+1]); None for an empty bin."""
    means = []
    for a, b in zip(edges, edges[1:]):
        w = weights[:, a:b].double()
        n = float(w.sum())
        means.append(float((losses[:, a:b].double() * w).sum() / n) if n else None)
    return means


def bootstrap_difference(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor, edges: list[int],
                         resamples: int = RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0) -> list[dict | None]:
    """Per position bin: the token-weighted mean of `a - b` (N documents x L positions, where `weights` is set) and
    its percentile bootstrap interval, documents resampled with replacement; None for an empty bin or < 2 documents.
    """
    d = (a - b).double()
    bins = (((d[:, lo:hi] * weights[:, lo:hi]).sum(1), weights[:, lo:hi].double().sum(1))
            for lo, hi in zip(edges, edges[1:]))
    return bootstrap_bins(bins, a.shape[0], resamples, confidence, seed)


def bootstrap_bins(bins, n: int, resamples: int = RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0,
                   min_documents: int = 1) -> list[dict | None]:
    """The token-weighted mean and percentile bootstrap interval (documents resampled with replacement) of each bin
    of `bins`: (sums, counts) per bin, each (n,) over the documents; None for a bin whose tokens lie in fewer than
    `min_documents` documents, or when there are fewer than 2 documents."""
    draws = torch.randint(n, (resamples, n), generator=torch.Generator().manual_seed(seed)) if n else None
    quantiles = torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=torch.float64)
    out = []
    for sums, counts in bins:
        if n < 2 or int((counts > 0).sum()) < min_documents or not counts.sum():
            out.append(None)
            continue
        boot = sums[draws].sum(1) / counts[draws].sum(1)  # a resample without tokens in the bin: nan, left out
        low, high = torch.nanquantile(boot, quantiles).tolist()
        out.append({"mean": float(sums.sum() / counts.sum()), "low": low, "high": high})
    return out


def predicted_positions(rows: dict) -> torch.Tensor:
    """Positions whose token is predicted: real tokens except each row's first."""
    t = rows["attention_mask"].clone()
    t[:, 0] = False
    return t


def by_position(losses: torch.Tensor, weights: dict, edges: list[int]) -> dict:
    """`loss_by_position` (all predicted tokens) and, when the corpus has query answers, `recall_loss_by_position`."""
    result = {"loss_by_position": bin_means(losses, weights["all"], edges)}
    if weights["recall"].any():
        result["recall_loss_by_position"] = bin_means(losses, weights["recall"], edges)
    return result
