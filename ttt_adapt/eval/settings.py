"""What an evaluation measures: `EvalSettings` (the keys of a recipe's `eval` section), its checks, `EvalError`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ttt_adapt.config import RecipeError


TASKS = ("niah_single", "niah_multikey", "kv_retrieval", "variable_tracking")


class EvalError(RecipeError):
    """Bad evaluation input (missing model or corpus, empty corpus, lengths beyond the model, bad settings).

    The message is one line."""


@dataclass
class EvalSettings:
    """What to evaluate; the keys of a recipe's `eval` section.

    Args:
        corpus: held-out documents, a .jsonl (one JSON object per line, text in `text_field`) or a .txt file (one
            document); from a recipe, default `data.eval_path`.
        seq_len: tokens per document for the loss by position; from a recipe, default `data.seq_len`.
        bin_edges: position bin edges, from 0 up to `seq_len`; default powers of two from 64 (0, 64, 128, ..., seq_len).
        lengths: prompt lengths (tokens) of the synthetic tasks.
        tasks: which synthetic tasks (`TASKS`); empty for none.
        num_samples: prompts per task and length.
        max_docs: held-out documents used for the loss (the first ones of the file); null for all.
        batch_size: rows per forward / generate call.
        max_new_tokens: greedy tokens generated per prompt.
        seed: the synthetic tasks' seed (the same seed gives the same prompts).
    """

    corpus: str | None = None
    text_field: str = "text"
    seq_len: int = 1024
    bin_edges: list[int] | None = None
    lengths: list[int] = field(default_factory=lambda: [512, 1024])
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    num_samples: int = 8
    max_docs: int | None = 32
    batch_size: int = 8
    max_new_tokens: int = 8
    seed: int = 0

    @classmethod
    def from_dict(cls, raw: dict, prefix: str = "eval") -> EvalSettings:
        """Build from a plain mapping (a recipe's `eval` section), checking keys and types; one-line EvalError."""
        if not isinstance(raw, dict):
            raise EvalError(f"{prefix}: must be a mapping of settings")
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in raw.items():
            if key not in known:
                raise EvalError(f"{prefix}.{key}: unknown key (known: {', '.join(known)})")
            kind = {"corpus": str, "text_field": str, "bin_edges": list, "lengths": list, "tasks": list}.get(key, int)
            if value is None and key in ("corpus", "bin_edges", "max_docs"):
                continue
            if isinstance(value, bool) or not isinstance(value, kind):
                expected = {int: "an integer", str: "a string", list: "a list"}[kind]
                raise EvalError(f"{prefix}.{key}: expected {expected}, got {value!r}")
        return cls(**raw).validate(prefix)

    def validate(self, prefix: str = "eval") -> EvalSettings:
        """Check values (not files or models); return self."""
        def positive(key, value, minimum=1):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise EvalError(f"{prefix}.{key}: must be an integer >= {minimum}, got {value!r}")

        positive("seq_len", self.seq_len, 2)
        for key in ("num_samples", "batch_size", "max_new_tokens"):
            positive(key, getattr(self, key))
        positive("seed", self.seed, 0)
        if self.max_docs is not None:
            positive("max_docs", self.max_docs)
        for length in self.lengths:
            positive("lengths", length, 16)
        if len(set(self.lengths)) != len(self.lengths):
            raise EvalError(f"{prefix}.lengths: repeats a length: {self.lengths}")
        for task in self.tasks:
            if task not in TASKS:
                raise EvalError(f"{prefix}.tasks: unknown task {task!r} (known: {', '.join(TASKS)})")
        if self.tasks and not self.lengths:
            raise EvalError(f"{prefix}.lengths: is empty; name at least one length for the tasks")
        if self.bin_edges is not None:
            edges = self.bin_edges
            if not all(isinstance(e, int) and not isinstance(e, bool) for e in edges) or len(edges) < 2 \
                    or edges[0] != 0 or edges[-1] != self.seq_len or any(a >= b for a, b in zip(edges, edges[1:])):
                raise EvalError(
                    f"{prefix}.bin_edges: must be increasing integers from 0 to seq_len={self.seq_len}, got {edges}"
                )
        return self

    @property
    def bins(self) -> list[int]:
        return self.bin_edges or position_bins(self.seq_len)


def position_bins(seq_len: int, first: int = 64) -> list[int]:
    """Bin edges 0, first, 2*first, 4*first, ... up to `seq_len` (the last bin ends at `seq_len`)."""
    edges, edge = [0], first
    while edge < seq_len:
        edges.append(edge)
        edge *= 2
    return edges + [seq_len]


def check_lengths(settings: EvalSettings, config, name: str) -> None:
    """EvalError if the loss length or a task length (plus generated tokens) exceeds the model's positions."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:
        return
    if settings.seq_len > limit:
        raise EvalError(f"seq_len {settings.seq_len} exceeds the max_position_embeddings of {name} ({limit})")
    for length in settings.lengths if settings.tasks else []:
        if length + settings.max_new_tokens > limit:
            raise EvalError(
                f"task length {length} (+{settings.max_new_tokens} generated tokens) exceeds the "
                f"max_position_embeddings of {name} ({limit})"
            )


def settings_from_recipe(recipe, model_config=None) -> EvalSettings:
    """The recipe's `eval` section as `EvalSettings` (corpus default `data.eval_path`, seq_len default
    `data.seq_len`), its corpus checked to exist, and its lengths checked against `model_config` if given."""
    raw = dict(recipe.eval or {})
    raw.setdefault("corpus", recipe.data.eval_path)
    raw.setdefault("seq_len", recipe.data.seq_len)
    settings = EvalSettings.from_dict(raw)
    if settings.corpus is None:
        raise EvalError("eval.corpus: not set, and the recipe has no data.eval_path to default to")
    if not Path(settings.corpus).is_file():
        raise EvalError(f"eval.corpus: no such file: {settings.corpus}")
    if model_config is not None:
        check_lengths(settings, model_config, recipe.model.name_or_path)
    return settings
