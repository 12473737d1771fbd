"""The evaluation report's outputs: its one markdown table (report.md and the model card), the plot, the files."""

from __future__ import annotations

import json
from pathlib import Path

from ttt_adapt.eval.long_context import markdown_long_table, warnings_of
from ttt_adapt.eval.recall import IN_LENGTH, markdown_recall_file, markdown_recall_table


LOSS_KEYS = {  # per-bin losses a report may hold -> row label (chat reports: `ttt_adapt.eval.chat`)
    "loss_by_position": "loss",
    "recall_loss_by_position": "recall-answer loss",
    "assistant_loss_by_position": "assistant-token loss",
}
MODELS = {  # report entry -> column / legend label, in table order
    "base": "base",
    "adapted": "adapted",
    "adapted_swapped_state": "adapted, swapped state",
    "adapted_no_state": "adapted, no state",
}


PLOT_TITLES = {"loss_by_position": "all tokens", "recall_loss_by_position": "answers of long-range queries",
               "assistant_loss_by_position": "assistant tokens"}


def markdown_table(report: dict) -> str:
    """The evaluation table (report.md and the model card): one row per position bin (all tokens, then recall
    answers) and per task and length; a column per model of `MODELS` in the report, adapted - base, and own -
    swapped with its bootstrap interval when the report has the swapped-state control."""
    edges = report["bins"]
    models = [m for m in MODELS if isinstance(report.get(m), dict)]
    control = report.get("own_minus_swapped")
    header = ["metric", *(MODELS[m] for m in models), "adapted - base"]
    if control:
        header.append(f"own - swapped ({control['confidence']:.0%} CI)")
    rows = []
    for key, label in LOSS_KEYS.items():
        if key not in report["base"]:
            continue
        for k, (a, b) in enumerate(zip(edges, edges[1:])):
            values = [(report[m].get(key) or [None] * len(edges))[k] for m in models]
            if all(v is None for v in values):
                continue  # no such tokens in this bin (e.g. no recall answer that early)
            interval = (control.get(key) or [None] * len(edges))[k] if control else None
            rows.append([f"{label}, positions {a}-{b}", values, interval])
    if "answer_accuracy" in report["base"]:
        answers = report["base"].get("answers")
        rows.append([f"answer accuracy (greedy reproduces the reference; {answers} answers)",
                     [report[m].get("answer_accuracy") for m in models], None])
        rows.append(["assistant-token accuracy (argmax = reference)",
                     [report[m].get("assistant_token_accuracy") for m in models], None])
    for task, by_length in report["base"].get("tasks", {}).items():
        for length in by_length:
            values = [report[m].get("tasks", {}).get(task, {}).get(length) for m in models]
            rows.append([f"{task} @ {length} tokens (accuracy)", values, None])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for metric, values, interval in rows:
        by = dict(zip(models, values))
        delta = _diff(by.get("adapted"), by.get("base"))
        cells = [metric, *map(_fmt, values), delta] + ([_interval(interval)] if control else [])
        lines.append("| " + " | ".join(cells) + " |")
    recall = report.get("recall_by_distance")
    recall_part = f"\nOn the {IN_LENGTH} (as above). {markdown_recall_table(recall)}" if recall else ""
    long_part = f"\n{markdown_long_table(report['long_context'])}" if report.get("long_context") else ""
    file_part = f"\n{markdown_recall_file(report['recall_file'])}" if report.get("recall_file") else ""
    return "\n".join(lines) + "\n" + recall_part + long_part + file_part + _notes(report)


def _notes(report: dict) -> str:
    notes = []
    converted = report.get("converted", {})
    if "equals_base" in converted:
        notes.append(f"Freshly converted model vs base: max |per-token loss difference| = "
                     f"{converted['max_abs_loss_diff']:.2g} ({'equal' if converted['equals_base'] else 'NOT equal'}).")
    control = report.get("own_minus_swapped")
    if control:
        notes.append(f"Swapped state: each of {control['documents']} documents read with the fast weights another "
                     "held-out document of its length writes, chunk for chunk (attention still sees the document "
                     "itself); no state: fast weights never written. own - swapped below 0, its interval too: the fast "
                     "weights carry what the document itself said; the gain that survives the swap is adaptation.")
    return "".join(f"\n{n}\n" for n in notes)


def _diff(a, b) -> str:
    return _fmt(a - b, "+") if a is not None and b is not None else ""


def _interval(d) -> str:
    return "" if d is None else f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"


def _fmt(v, sign: str = "") -> str:
    return "" if v is None else f"{v:{sign}.4f}"


def write_report(out_dir, report: dict, samples: list[dict], generations: dict) -> Path:
    """Write report.json, report.md (`markdown_table`), loss_by_position.png (and loss_past_training_length.png when
    the report measured long documents, recall_by_distance.png when it measured answers by distance) and samples.jsonl (every prompt's answers and each model's generation) into
    `out_dir` (created); return the report.json path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown_table(report))
    plot_loss_by_position(report, out / "loss_by_position.png")
    if report.get("long_context", {}).get("bins"):
        plot_long_context(report["long_context"], out / "loss_past_training_length.png")
    if recall_sections(report):
        plot_recall_by_distance(report, out / "recall_by_distance.png")
    with open(out / "samples.jsonl", "w") as f:
        for i, s in enumerate(samples):
            record = {k: s[k] for k in ("task", "length", "answers", "needles", "min_distance")}
            record.update({f"{m}_generation": generations[m][i] for m in generations})
            f.write(json.dumps(record) + "\n")
    return out / "report.json"


def plot_loss_by_position(report: dict, path) -> None:
    """PNG: loss per position bin (and recall-answer loss, when measured) for base, converted, adapted and the
    adapted model's state controls; then own - swapped with its interval, when measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = report["bins"]
    x = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
    keys = [k for k in LOSS_KEYS if k in report["base"]]
    control = report.get("own_minus_swapped")
    fig, axes = plt.subplots(1, len(keys) + bool(control), figsize=(6 * (len(keys) + bool(control)), 4), squeeze=False)
    styles = {"base": "o-", "converted": "x:", "adapted": "s-", "adapted_swapped_state": "d--", "adapted_no_state": "^:"}
    for ax, key in zip(axes[0], keys):
        for name, style in styles.items():
            values = report.get(name, {}).get(key)
            if values:
                ax.plot(*_points(x, values), style, label=MODELS.get(name, name))
        _axes(ax, x, edges, "loss (nats/token)", PLOT_TITLES[key])
    if control:
        ax = axes[0][-1]
        for key, style in (("loss_by_position", "s-"), ("recall_loss_by_position", "d--"),
                           ("assistant_loss_by_position", "o-")):
            intervals = [(xi, d) for xi, d in zip(x, control.get(key) or []) if d is not None]
            if intervals:
                mean = [d["mean"] for _, d in intervals]
                err = [[m - d["low"] for m, (_, d) in zip(mean, intervals)],
                       [d["high"] - m for m, (_, d) in zip(mean, intervals)]]
                ax.errorbar([xi for xi, _ in intervals], mean, yerr=err, fmt=style, capsize=3,
                            label=PLOT_TITLES[key])
        ax.axhline(0, color="grey", lw=0.8)
        _axes(ax, x, edges, "own - swapped loss (nats/token)", f"own - swapped state ({control['confidence']:.0%} CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_long_context(section: dict, path) -> None:
    """PNG: loss by position on the long documents (base, adapted, its state controls), the training length marked;
    the title carries the `worse_than_base` flag when there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = section["bins"]
    x = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, style in (("base", "o-"), ("adapted", "s-"), ("adapted_swapped_state", "d--"), ("adapted_no_state", "^:")):
        if section.get(name):
            ax.plot(*_points(x, section[name]), style, label=MODELS[name])
    ax.axvline(section["train_length"], color="grey", ls="--", lw=1, label="training length")
    flag = section.get("flag")
    _axes(ax, x, edges, "loss (nats/token)", f"WARNING: {flag}" if flag else "past the training length")
    if flag:
        ax.title.set_color("red")
        ax.title.set_fontsize(8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def recall_sections(report: dict) -> list[tuple[str, dict]]:
    """(title, `recall_by_distance` section) of each place the report measured answers by distance: the documents of
    the training length, the long documents, the recall file."""
    out = [(f"{IN_LENGTH}", report.get("recall_by_distance")),
           ("long documents (past the training length)", (report.get("long_context") or {}).get("recall_by_distance")),
           ("recall file", (report.get("recall_file") or {}).get("recall_by_distance"))]
    return [(title, section) for title, section in out if section]


def plot_recall_by_distance(report: dict, path) -> None:
    """PNG, one panel per `recall_sections`: answer-token loss per bin of distance back to the fact for base,
    adapted, swapped and no state, the training length marked; a panel's title is its `no_recall` flag, in red,
    when it has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = recall_sections(report)
    fig, axes = plt.subplots(1, len(sections), figsize=(7 * len(sections), 4.5), squeeze=False)
    for ax, (title, section) in zip(axes[0], sections):
        bins = section["bins"]
        x = [(max(a, 1) * b) ** 0.5 for a, b in bins]  # the middle of a bin on the log axis
        for name, style in (("base", "o-"), ("adapted", "s-"), ("adapted_swapped_state", "d--"),
                            ("adapted_no_state", "^:")):
            if section.get(name):
                ax.plot(*_points(x, section[name]), style, label=MODELS[name])
        ax.axvline(section["train_length"], color="grey", ls="--", lw=1, label="training length")
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [f"{a}-{b}" for a, b in bins], rotation=30, fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel("distance back to the fact (tokens)")
        ax.set_ylabel("answer-token loss (nats/token)")
        flag = section.get("flag")
        ax.set_title(f"{title}\nWARNING: {flag}" if flag else f"{title}: answers by distance", fontsize=8 if flag else 10,
                     color="red" if flag else "black", wrap=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _points(x, values):
    return [xi for xi, v in zip(x, values) if v is not None], [v for v in values if v is not None]


def _axes(ax, x, edges, ylabel, title):
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [f"{a}-{b}" for a, b in zip(edges, edges[1:])], rotation=30, fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("position in document (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()


def report_warnings(report: dict) -> list[str]:
    """Every one-line warning of a report, each saying where it was raised: the no-recall flag on the documents of
    the training length, the long-context lines (`warnings_of`, its no-recall flag named as such) and the recall
    file's flag."""
    out = []
    flag = (report.get("recall_by_distance") or {}).get("flag")
    if flag:
        out.append(f"{flag} ({IN_LENGTH})")
    long = report.get("long_context") or {}
    long_flag = (long.get("recall_by_distance") or {}).get("flag")
    for line in warnings_of(long):
        out.append(f"{line} (long documents, to {long['bins'][-1]} tokens)" if line == long_flag else line)
    recall_file = report.get("recall_file") or {}
    flag = (recall_file.get("recall_by_distance") or {}).get("flag")
    for line in (flag and f"{flag} (recall file {recall_file['file']})", recall_file.get("skipped")):
        if line:
            out.append(line)
    return out
