"""Loss by position past the training length: where a TTT model's fast weights have folded in more chunks than
training ever showed, and where a model that does not hold up falls behind its base.

Long held-out documents (`EvalSettings.long_corpus`: the eval corpus by default, a file, or "synthetic" documents
from `ttt_adapt.data.corpus`) are read up to `max_length` tokens (8 x the training length by default, as far as the
documents reach) by the base and by the adapted model with its own, a swapped and no fast-weight state. Bins:
0, L/8, L/2, L (the training length L), then doubling up to the end. `worse_than_base` is the one-line flag the
report, the plot, the model card and `scripts/evaluate.py` show when a bin past the training length is worse than
the base; `worse_within_training_length` the line they add when a bin of the long documents before it is.
"""

from __future__ import annotations

from ttt_adapt.data.corpus import RECALL_GAP, generate_documents
from ttt_adapt.eval.inputs import read_corpus
from ttt_adapt.eval.loss_by_position import (
    bin_means,
    blocked_attention,
    bootstrap_difference,
    predicted_positions,
    stateless_token_losses,
    swapped_token_losses,
    token_losses,
    tokenize_documents,
)
from ttt_adapt.eval.recall import markdown_recall_table, recall_by_distance
from ttt_adapt.eval.settings import EvalSettings
from ttt_adapt.eval.swapped_state import swap_partners

SYNTHETIC = "synthetic"
SYNTHETIC_STREAM = 4242  # seed stream of the synthetic long documents: never one of the shipped corpus's (0, 1)
CHARS_PER_TOKEN = 6  # generous: synthetic documents long enough to reach max_length tokens with any tokenizer


def long_bins(train_length: int, length: int) -> list[int]:
    """Bin edges 0, L/8, L/2, L, 2L, 4L, ... with L = `train_length`, the last bin ending at `length`."""
    edges = sorted({0, max(1, train_length // 8), max(1, train_length // 2), train_length})
    edges = [e for e in edges if e < length]
    edge = train_length * 2
    while edge < length:
        edges.append(edge)
        edge *= 2
    return edges + [length]


def long_documents(settings: EvalSettings, eval_docs: list[str]) -> list[str]:
    """The candidates for the long-context measurement: the eval corpus's documents, `long_corpus`'s, or synthetic
    ones (seeded by `settings.seed`); the `long_docs` longest (by characters) are kept."""
    if settings.long_corpus == SYNTHETIC:
        chars = max(settings.resolved_max_length * CHARS_PER_TOKEN, RECALL_GAP)
        docs = generate_documents(settings.long_docs, SYNTHETIC_STREAM + settings.seed, chars, chars + 4000)
    elif settings.long_corpus is not None:
        docs = read_corpus(settings.long_corpus, settings.text_field)
    else:
        docs = eval_docs
    order = sorted(range(len(docs)), key=lambda i: (-len(docs[i]), i))[: settings.long_docs]
    return [docs[i] for i in sorted(order)]


def measure_long_context(base_model, adapted_model, tokenizer, docs: list[str], settings: EvalSettings,
                         log=print) -> dict:
    """The `long_context` part of the report: per bin the loss of the base and of the adapted model (own, swapped
    and no fast-weight state), adapted vs base in % with a bootstrap interval of adapted - base over documents,
    own - swapped likewise, token counts, and `flag` (`worse_than_base`)."""
    train_length, max_length = settings.seq_len, settings.resolved_max_length
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = tokenize_documents(tokenizer, docs, max_length, pad_id)
    lengths = rows["attention_mask"].sum(1)
    reach = int(lengths.max())
    section = {"train_length": train_length, "max_length": max_length, "documents": len(lengths),
               "document_tokens": lengths.tolist()}
    if reach <= train_length:
        section["skipped"] = (f"no held-out document is longer than the training length ({train_length} tokens; the "
                              f"longest has {reach}): set eval.long_corpus to longer documents")
        log(f"evaluate: WARNING: {section['skipped']}")
        return section
    rows = {k: v[:, :reach] for k, v in rows.items()}
    edges = long_bins(train_length, reach)
    weights = predicted_positions(rows)
    # as many tokens per forward as the in-length measurement: fewer, longer rows
    batch = max(1, settings.batch_size * train_length // reach)
    log(f"evaluate: past the training length: {len(lengths)} documents of <= {reach} tokens (trained on "
        f"{train_length}), base and adapted with own, swapped and no fast-weight state")
    partners = swap_partners(lengths.tolist())
    paired = [i for i, p in enumerate(partners) if p is not None]
    with blocked_attention(base_model), blocked_attention(adapted_model):
        base = token_losses(base_model, rows, batch)
        own = token_losses(adapted_model, rows, batch)
        swapped = swapped_token_losses(adapted_model, rows, partners, batch)
        none = stateless_token_losses(adapted_model, rows, batch)
    means = {name: bin_means(losses, weights, edges) for name, losses in
             (("base", base), ("adapted", own), ("adapted_no_state", none))}
    means["adapted_swapped_state"] = bin_means(swapped[paired], weights[paired], edges)
    change = [None if a is None or b is None else 100 * (a / b - 1) for a, b in zip(means["adapted"], means["base"])]
    section.update(
        bins=edges,
        tokens_per_bin=[int(weights[:, a:b].sum()) for a, b in zip(edges, edges[1:])],
        **means,
        change_vs_base_percent=change,
        adapted_minus_base=bootstrap_difference(own, base, weights, edges, seed=settings.seed),
        own_minus_swapped=bootstrap_difference(own[paired], swapped[paired], weights[paired], edges,
                                               seed=settings.seed),
    )
    section["recall_by_distance"] = recall_by_distance(
        {"base": base, "adapted": own, "adapted_swapped_state": swapped[paired], "adapted_no_state": none},
        rows, train_length, paired, seed=settings.seed)
    section["flag"] = worse_than_base(section)
    section["worse_within_training_length"] = worse_within_training_length(section)
    for line in warnings_of(section):
        log(f"evaluate: WARNING: {line}")
    return section


def warnings_of(section: dict) -> list[str]:
    """The section's one-line warnings: the flag past the training length first, then the bins within it, then the
    answers that the fast weights do not recall (`no_recall`)."""
    recall = section.get("recall_by_distance") or {}
    return [line for line in (section.get("flag"), section.get("worse_within_training_length"), recall.get("flag"))
            if line]


def worse_than_base(section: dict) -> str | None:
    """One line naming where, past the training length, the adapted model is worse than its base (None if no bin
    there is), e.g. "worse than the base past 2048 tokens: +34.0 % (positions 2048-4096; trained on 1024-token
    rows)". Bins within the training length are `worse_within_training_length`'s."""
    return _worse(section, past=True)


def worse_within_training_length(section: dict) -> str | None:
    """One line naming the bins of the long documents within the training length where the adapted model is worse
    than its base (None if none is)."""
    return _worse(section, past=False)


def _worse(section: dict, past: bool) -> str | None:
    edges, train_length = section.get("bins") or [], section.get("train_length")
    worse = [(k, c) for k, c in enumerate(section.get("change_vs_base_percent") or [])
             if c is not None and c > 0 and (edges[k] >= train_length) == past]
    if not worse:
        return None
    k, c = max(worse, key=lambda kc: kc[1])
    where = f"past {edges[worse[0][0]]} tokens" if past else "within the training length on the long documents"
    return (f"worse than the base {where}: {c:+.1f} % (positions {edges[k]}-{edges[k + 1]}; trained on "
            f"{train_length}-token rows)")


def markdown_long_table(section: dict) -> str:
    """The table of the `long_context` section: a row per bin, bins past the training length marked."""
    if "skipped" in section:
        return f"Past the training length: not measured ({section['skipped']}).\n"
    edges, train_length = section["bins"], section["train_length"]
    names = [("base", "base"), ("adapted", "adapted"), ("adapted_swapped_state", "adapted, swapped state"),
             ("adapted_no_state", "adapted, no state")]
    header = ["positions", *(label for _, label in names), "adapted vs base", "adapted - base (95% CI)",
              "own - swapped (95% CI)"]
    lines = [f"Loss by position on {section['documents']} held-out documents of up to {edges[-1]} tokens "
             f"(trained on {train_length}-token rows; * past the training length):", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for k, (a, b) in enumerate(zip(edges, edges[1:])):
        change = section["change_vs_base_percent"][k]
        cells = [f"{a}-{b}" + (" *" if a >= train_length else ""),
                 *(_fmt(section[name][k]) for name, _ in names),
                 "" if change is None else f"{change:+.1f} %",
                 _interval(section["adapted_minus_base"][k]), _interval(section["own_minus_swapped"][k])]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    # the recall flag stands under its own table (`markdown_recall_table`)
    lines += [f"**WARNING: {line}**" for line in (section.get("flag"), section.get("worse_within_training_length"))
              if line]
    if not section.get("flag"):
        lines.append(f"Past the training length the adapted model is at least as good as its base in every bin, up to "
                     f"{edges[-1]} tokens.")
    recall = f"\n{markdown_recall_table(section['recall_by_distance'])}" if section.get("recall_by_distance") else ""
    return "\n".join(lines) + "\n" + recall


def _fmt(v) -> str:
    return "" if v is None else f"{v:.4f}"


def _interval(d) -> str:
    return "" if d is None else f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"


__all__ = ["SYNTHETIC", "long_bins", "long_documents", "measure_long_context", "worse_than_base",
           "worse_within_training_length", "warnings_of", "markdown_long_table"]
