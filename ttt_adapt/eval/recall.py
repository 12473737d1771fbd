"""Memory measured directly: the loss of answer tokens binned by how far back their fact was last written.

A TTT model is for what attention no longer sees. Loss by position mixes two things: the document's vocabulary
(which any state, even a blur of the document, helps with) and its facts (which only a memory that returns the
right value for the right key can predict). The answers of the synthetic corpus's query lines
(`ttt_adapt.data.corpus.recall_spans`) or of a user's recall file are facts: each answer token's `recall_distance`
(`tokenize_documents`) is the number of tokens back to the answer's last mention. Bins of that distance
(`distance_bins`: 0, L/8, L/2, L, 2L, ... with L the training length) hold the answers a memory must reach that far
for. `no_recall` is the one-line flag when, in some bin, the adapted model's answers are not below the base's.
"""

from __future__ import annotations

import torch

from ttt_adapt.eval.loss_by_position import CONFIDENCE, RESAMPLES

NAMES = ("base", "adapted", "adapted_swapped_state", "adapted_no_state")


def distance_bins(train_length: int, longest: int) -> list[int]:
    """Edges 0, L/8, L/2, L, 2L, 4L, ... (L = `train_length`), the last one past `longest`."""
    edges = sorted({0, max(1, train_length // 8), max(1, train_length // 2), train_length})
    while edges[-1] <= longest:
        edges.append(edges[-1] * 2)
    return edges


def distance_masks(rows: dict, edges: list[int]) -> list[torch.Tensor]:
    """Per distance bin [edges[k], edges[k+1]): the (N, L) mask of the answer tokens whose fact lies that far back."""
    d = rows["recall_distance"]
    ok = rows["attention_mask"].clone()
    ok[:, 0] = False
    return [ok & rows["recall"] & (d >= a) & (d < b) for a, b in zip(edges, edges[1:])]


def masked_means(losses: torch.Tensor, masks: list[torch.Tensor]) -> list[float | None]:
    out = []
    for m in masks:
        n = int(m.sum())
        out.append(float(losses.double()[m].sum() / n) if n else None)
    return out


def bootstrap_masked(a: torch.Tensor, b: torch.Tensor, masks: list[torch.Tensor], resamples: int = RESAMPLES,
                     confidence: float = CONFIDENCE, seed: int = 0) -> list[dict | None]:
    """Per mask: the token-weighted mean of `a - b` over the masked tokens and its percentile bootstrap interval,
    documents (rows) resampled with replacement; None when fewer than 2 documents have masked tokens."""
    n = a.shape[0]
    draws = torch.randint(n, (resamples, n), generator=torch.Generator().manual_seed(seed)) if n else None
    quantiles = torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=torch.float64)
    out = []
    for m in masks:
        w = m.double()
        sums, counts = ((a - b).double() * w).sum(1), w.sum(1)
        if int((counts > 0).sum()) < 2:  # answers of one document: no interval over documents
            out.append(None)
            continue
        boot = sums[draws].sum(1) / counts[draws].sum(1)
        low, high = torch.nanquantile(boot, quantiles).tolist()
        out.append({"mean": float(sums.sum() / counts.sum()), "low": low, "high": high})
    return out


def recall_by_distance(losses: dict, rows: dict, train_length: int, paired: list[int] | None = None,
                       seed: int = 0) -> dict | None:
    """The answer-token loss per distance bin for each model of `losses` (name -> (N, L) per-token losses; the
    swapped-state one over the rows in `paired` only), adapted vs base in %, adapted - base, own - swapped and own -
    no state with bootstrap intervals, the token count per bin and `flag` (`no_recall`). None when the documents
    have no marked answers."""
    if "recall_distance" not in rows or not bool((rows["recall"] & (rows["recall_distance"] >= 0)).any()):
        return None
    edges = distance_bins(train_length, int(rows["recall_distance"].max()))
    masks = distance_masks(rows, edges)
    keep = [k for k, m in enumerate(masks) if m.any()]  # only the bins that hold answers
    edges_kept = [(edges[k], edges[k + 1]) for k in keep]
    masks = [masks[k] for k in keep]
    section = {"train_length": train_length, "bins": [list(e) for e in edges_kept],
               "answer_tokens_per_bin": [int(m.sum()) for m in masks],
               "documents_per_bin": [int(m.any(1).sum()) for m in masks]}
    paired = list(range(rows["input_ids"].shape[0])) if paired is None else paired
    for name in NAMES:
        if name not in losses:
            continue
        rows_of = paired if name == "adapted_swapped_state" else slice(None)
        section[name] = masked_means(losses[name], [m[rows_of] for m in masks])
    section["change_vs_base_percent"] = [None if a is None or b is None else 100 * (a / b - 1)
                                         for a, b in zip(section["adapted"], section["base"])]
    section["adapted_minus_base"] = bootstrap_masked(losses["adapted"], losses["base"], masks, seed=seed)
    if "adapted_swapped_state" in losses:
        section["own_minus_swapped"] = bootstrap_masked(losses["adapted"][paired], losses["adapted_swapped_state"],
                                                        [m[paired] for m in masks], seed=seed)
    if "adapted_no_state" in losses:
        section["own_minus_no_state"] = bootstrap_masked(losses["adapted"], losses["adapted_no_state"], masks,
                                                         seed=seed)
    section["flag"] = no_recall(section)
    return section


def no_recall(section: dict) -> str | None:
    """One line naming the distance bins where the adapted model's answers are not below the base's (the upper end
    of the adapted - base interval at or above 0), e.g. "no recall through the fast weights: answers +1.6 % vs base
    at distances 512-1024, +2.3 % at 1024-2048 tokens"; None when every bin with answers is below the base."""
    bad = []
    for (a, b), change, d in zip(section["bins"], section["change_vs_base_percent"], section["adapted_minus_base"]):
        if change is not None and d is not None and d["high"] >= 0:  # a bin of one document: no verdict
            bad.append(f"{change:+.1f} % at {a}-{b}")
    if not bad:
        return None
    return f"no recall through the fast weights: answers {bad[0]}" + "".join(f", {x}" for x in bad[1:]) + \
        " tokens back vs base"


def markdown_recall_table(section: dict) -> str:
    """The table of a `recall_by_distance` section: a row per distance bin, bins past the training length marked."""
    names = [(n, label) for n, label in (("base", "base"), ("adapted", "adapted"),
                                         ("adapted_swapped_state", "adapted, swapped state"),
                                         ("adapted_no_state", "adapted, no state")) if n in section]
    header = ["fact last written (tokens back)", "answer tokens", *(label for _, label in names), "adapted vs base",
              "adapted - base (95% CI)", "own - swapped (95% CI)", "own - no state (95% CI)"]
    train_length = section["train_length"]
    lines = [f"Answer-token loss by distance back to the fact (memory; * past the training length of {train_length}):",
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for k, (a, b) in enumerate(section["bins"]):
        change = section["change_vs_base_percent"][k]
        cells = [f"{a}-{b}" + (" *" if a >= train_length else ""), str(section["answer_tokens_per_bin"][k]),
                 *(_fmt(section[n][k]) for n, _ in names), "" if change is None else f"{change:+.1f} %",
                 *(_interval((section.get(key) or [None] * len(section["bins"]))[k])
                   for key in ("adapted_minus_base", "own_minus_swapped", "own_minus_no_state"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"**WARNING: {section['flag']}**" if section.get("flag") else
                 "The adapted model's answers are below the base's at every distance measured: the fast weights recall.")
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    return "" if v is None else f"{v:.4f}"


def _interval(d) -> str:
    return "" if d is None else f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"


__all__ = ["distance_bins", "recall_by_distance", "no_recall", "markdown_recall_table", "bootstrap_masked"]
