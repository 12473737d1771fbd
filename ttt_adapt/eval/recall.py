"""Memory measured directly: the loss of answer tokens binned by how far back their fact was last written.

A TTT model is for what attention no longer sees. Loss by position mixes two things: the document's vocabulary
(which any state, even a blur of the document, helps with) and its facts (which only a memory that returns the
right value for the right key can predict). The answers of the synthetic corpus's query lines
(`ttt_adapt.data.corpus.recall_spans`) or of a user's recall file are facts: each answer token's `recall_distance`
(`tokenize_documents`) is the number of tokens back to the answer's last mention. Bins of that distance
(`distance_bins`: 0, L/8, L/2, L, 2L, ... with L the training length) hold the answers a memory must reach that far
for. `no_recall` is the one-line flag when, in some bin, the adapted model's answers are not below the base's.

Measured on the held-out documents of the training length (`report["recall_by_distance"]`), on the long documents
(`report["long_context"]["recall_by_distance"]`) and on a user's recall file (`eval.recall_file`,
`report["recall_file"]`: rows {"document", "question", "answer"}, each read as document + "\n\n" + question + " " +
answer, the answer's distance counted back to its last verbatim mention in the document; `read_recall_file`,
`tokenize_recall_rows`, `measure_recall_file`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ttt_adapt._util import unwrap
from ttt_adapt.eval.loss_by_position import (
    CONFIDENCE,
    RESAMPLES,
    answer_distances,
    blocked_attention,
    bootstrap_bins,
    stateless_token_losses,
    token_losses,
)
from ttt_adapt.eval.settings import EvalError

NAMES = ("base", "adapted", "adapted_swapped_state", "adapted_no_state")
IN_LENGTH = "held-out documents of the training length"  # where a flag was raised, in the report's `warnings`
FIELDS = ("document", "question", "answer")  # a recall file's row


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
    d = (a - b).double()
    bins = (((d * m).sum(1), m.double().sum(1)) for m in masks)
    # answers of one document: no interval over documents
    return bootstrap_bins(bins, a.shape[0], resamples, confidence, seed, min_documents=2)


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
    intervals = [(key, label) for key, label in (("adapted_minus_base", "adapted - base (95% CI)"),
                                                 ("own_minus_swapped", "own - swapped (95% CI)"),
                                                 ("own_minus_no_state", "own - no state (95% CI)"))
                 if key in section]  # a recall file has no swapped state
    header = ["fact last written (tokens back)", "answer tokens", *(label for _, label in names), "adapted vs base",
              *(label for _, label in intervals)]
    train_length = section["train_length"]
    lines = [f"Answer-token loss by distance back to the fact (memory; * past the training length of {train_length}):",
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for k, (a, b) in enumerate(section["bins"]):
        change = section["change_vs_base_percent"][k]
        cells = [f"{a}-{b}" + (" *" if a >= train_length else ""), str(section["answer_tokens_per_bin"][k]),
                 *(_fmt(section[n][k]) for n, _ in names), "" if change is None else f"{change:+.1f} %",
                 *(_interval(section[key][k]) for key, _ in intervals)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"**WARNING: {section['flag']}**" if section.get("flag") else
                 "The adapted model's answers are below the base's at every distance measured: the fast weights recall.")
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    return "" if v is None else f"{v:.4f}"


def _interval(d) -> str:
    return "" if d is None else f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"


def read_recall_file(path) -> list[dict]:
    """The rows of a recall file: .jsonl, one {"document", "question", "answer"} object (strings; the answer not
    empty) a line, blank lines skipped. A missing file, a line that is not a JSON object, a missing or non-string
    field: EvalError naming the file and the line."""
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"eval.recall_file: no such file: {path}")
    rows = []
    with open(p, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"eval.recall_file {path}, line {n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise EvalError(f"{where}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{where}: not JSON ({e.msg}); expected one object with document, question, answer "
                                "a line") from None
            if not isinstance(row, dict):
                raise EvalError(f"{where}: expected a JSON object with document, question, answer, got "
                                f"{type(row).__name__}")
            for key in FIELDS:
                if key not in row:
                    raise EvalError(f"{where}: missing field {key!r} (a row holds document, question, answer)")
                if not isinstance(row[key], str):
                    raise EvalError(f"{where}: field {key!r} must be a string, got {type(row[key]).__name__}")
            if not row["answer"].strip():
                raise EvalError(f"{where}: field 'answer' is empty")
            rows.append({k: row[k] for k in FIELDS})
    if not rows:
        raise EvalError(f"eval.recall_file {path}: holds no rows")
    return rows


def tokenize_recall_rows(tokenizer, records: list[dict], max_tokens: int, pad_id: int) -> tuple[dict, dict]:
    """Rows as `tokenize_documents` makes them (input_ids, attention_mask, recall, recall_distance) from recall-file
    records, each read as document + "\n\n" + question + " " + answer, and the counts: `truncated` (rows longer than
    `max_tokens`, whose document was cut from the front so question and answer stay), `answer_not_in_document` (rows
    whose answer the document never states verbatim) and `answer_cut_off` (rows whose only mentions were cut off);
    these are left out of the bins (their answers are not marked)."""
    if not getattr(tokenizer, "is_fast", False):
        raise EvalError("eval.recall_file needs a fast tokenizer (its character offsets mark the answer tokens)")
    texts = [r["document"] + "\n\n" + r["question"] + " " + r["answer"] for r in records]
    enc = tokenizer(texts, return_offsets_mapping=True)
    kept = []
    counts = {"truncated": 0, "answer_not_in_document": 0, "answer_cut_off": 0}
    for text, r, ids, offsets in zip(texts, records, enc["input_ids"], enc["offset_mapping"]):
        offsets = [tuple(o) for o in offsets]
        real = [j for j, (s, e) in enumerate(offsets) if e > s]
        head = list(range(real[0])) if real else []  # special tokens before the text (BOS): kept
        body = list(range(real[0], real[-1] + 1)) if real else []  # special tokens after it (EOS): dropped
        if len(head) + len(body) > max_tokens:
            counts["truncated"] += 1
            body = body[len(body) - (max_tokens - len(head)):]
        keep = head + body
        ids, offsets = [ids[j] for j in keep], [offsets[j] for j in keep]
        start = offsets[len(head)][0] if body else len(text)  # the first character the row still holds
        a, b = len(text) - len(r["answer"]), len(text)
        found = answer_distances(text, offsets, [(a, b)], within=(start, len(r["document"])))
        if text.rfind(r["answer"], 0, len(r["document"])) < 0:
            counts["answer_not_in_document"] += 1
        elif not found or found[0][1] < 0:
            counts["answer_cut_off"] += 1
        kept.append((ids, [(j, d) for j, d in found if d >= 0]))
    width = max(len(ids) for ids, _ in kept)
    n = len(kept)
    rows = {"input_ids": torch.full((n, width), pad_id, dtype=torch.long),
            "attention_mask": torch.zeros(n, width, dtype=torch.bool),
            "recall": torch.zeros(n, width, dtype=torch.bool),
            "recall_distance": torch.full((n, width), -1, dtype=torch.long)}
    for i, (ids, found) in enumerate(kept):
        rows["input_ids"][i, : len(ids)] = torch.tensor(ids)
        rows["attention_mask"][i, : len(ids)] = True
        for j, d in found:
            rows["recall"][i, j], rows["recall_distance"][i, j] = True, d
    return rows, counts


def measure_recall_file(base_model, adapted_model, tokenizer, records: list[dict], settings, log=print) -> dict:
    """The `recall_file` part of the report: the rows of `settings.recall_file` (already read: `records`) read by the
    base and the adapted model (own state and no state), at most `max_length` tokens a row (`eval.max_length`, else
    `seq_len`; never past the model's positions), and their `recall_by_distance`."""
    lm = unwrap(adapted_model)
    cap = settings.resolved_max_length or settings.seq_len
    limit = getattr(getattr(lm, "config", None), "max_position_embeddings", None)
    cap = min(cap, limit) if isinstance(limit, int) else cap
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows, counts = tokenize_recall_rows(tokenizer, records, cap, pad_id)
    section = {"file": str(settings.recall_file), "rows": len(records), "max_tokens": cap, **counts}
    measured = len(records) - counts["answer_not_in_document"] - counts["answer_cut_off"]
    section["rows_measured"] = measured
    log(f"evaluate: recall file {settings.recall_file}: {len(records)} rows ({counts['answer_not_in_document']} "
        f"answer not in the document, {counts['answer_cut_off']} cut off), base and adapted with own and no state")
    if not measured:
        section["skipped"] = (f"no row of {settings.recall_file} states its answer verbatim in the document it reads "
                              "(answer not in the document)")
        log(f"evaluate: WARNING: {section['skipped']}")
        return section
    batch = max(1, settings.batch_size * settings.seq_len // rows["input_ids"].shape[1])
    with blocked_attention(base_model), blocked_attention(adapted_model):  # rows without padding: skip what no
        losses = {"base": token_losses(base_model, rows, batch),       # query sees (as the long documents do)
                  "adapted": token_losses(adapted_model, rows, batch),
                  "adapted_no_state": stateless_token_losses(adapted_model, rows, batch)}
    section["recall_by_distance"] = recall_by_distance(losses, rows, settings.seq_len, seed=settings.seed)
    flag = section["recall_by_distance"]["flag"]
    if flag:
        log(f"evaluate: WARNING: {flag} (recall file {settings.recall_file})")
    return section


def markdown_recall_file(section: dict) -> str:
    """The recall file's part of report.md: what was read, left out, and its `markdown_recall_table`."""
    lines = [f"Recall file {Path(section['file']).name}: {section['rows']} rows, {section['rows_measured']} measured "
             f"({section['answer_not_in_document']} answer not in the document, {section['answer_cut_off']} answer "
             f"cut off with the document's front; {section['truncated']} rows cut to {section['max_tokens']} tokens)."]
    if "skipped" in section:
        lines.append(f"\n**WARNING: {section['skipped']}**")
    text = "\n".join(lines) + "\n"
    if section.get("recall_by_distance"):
        text += "\n" + markdown_recall_table(section["recall_by_distance"])
    return text


__all__ = ["distance_bins", "recall_by_distance", "no_recall", "markdown_recall_table", "bootstrap_masked",
           "read_recall_file", "tokenize_recall_rows", "measure_recall_file", "markdown_recall_file",
           "IN_LENGTH"]
