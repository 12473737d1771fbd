"""What an evaluation measures: the `eval` section's schema (`EvalSettings`, `EvalError`, `TASKS`, `position_bins`,
defined with the rest of the recipe in `ttt_adapt.recipe.sections`) and the check that needs the model's config."""

from __future__ import annotations

from ttt_adapt.recipe.sections import TASKS, EvalError, EvalSettings, position_bins


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


__all__ = ["TASKS", "EvalError", "EvalSettings", "check_lengths", "position_bins"]
