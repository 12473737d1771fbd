"""Resuming with a changed recipe: what differs from the checkpoint's `recipe.yaml`, and whether it can be honoured.

Rerunning a run with other settings is the usual remedy after a loss spike (lower `train.lr`, turn on clipping,
train longer). The optimizer state restored from a checkpoint carries the learning rates and weight decay it was
saved with; the loop overwrites them with the recipe's (`ttt_adapt.training.optimizer.apply_recipe_to_optimizer`)
and recomputes the schedule from the recipe at every step, so every optimisation setting applies as given: learning
rates, weight decay, warmup, `max_steps`, `min_lr_ratio`, clipping, the TTT learning-rate warmup and update clipping
(read by the model built from the recipe), batch size, evaluation, export.

What cannot be honoured is refused (`RecipeError`, one line, before anything is built): another base model or
dtype, another TTT layout (layers, chunk size, kernel, projection, rate mode, target: the weights would not
fit), other trained parameters (`train.trainable`, `train.lora`: the optimizer state would not), other data or
data order (`data.*`, `train.seed`: the row cursor would point into other rows).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ttt_adapt._util import RecipeError

# Keys of the refused sections that a resumed run honours (their values are read afresh from the recipe).
HONOURED = {"model.attn_implementation", "ttt.lr_warmup_steps", "ttt.clip_update_norm", "ttt.lr_init",
            "data.cache_dir", "data.num_proc"}
REFUSED_SECTIONS = ("model.", "ttt.", "data.")
REFUSED_TRAIN = ("train.trainable", "train.lora.", "train.seed")
WHY = {"model": "the checkpoint's weights belong to that model", "ttt": "the checkpoint's weights have that TTT layout",
       "data": "the checkpoint's row cursor points into that data", "train.seed": "it sets the data order",
       "train.trainable": "the optimizer state holds those parameters",
       "train.lora": "the checkpoint holds those adapters"}
NO_EFFECT = {"ttt.lr_init": "no effect: the learned TTT learning rates come from the checkpoint"}


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict) and not (prefix == "eval" or prefix.startswith("eval.")):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def recipe_changes(checkpoint: Path, recipe) -> list[tuple[str, object, object]]:
    """(key, checkpoint's value, recipe's value) for every setting that differs from the checkpoint's recipe.
    Keys one side does not know (settings added or removed between versions) are not compared."""
    path = Path(checkpoint) / "recipe.yaml"
    if not path.is_file():
        return []
    try:
        old = _flatten(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as e:
        raise RecipeError(f"train.output_dir: {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    new = _flatten(recipe.to_dict())
    return [(k, old[k], new[k]) for k in new if k in old and old[k] != new[k]]


def refused(key: str) -> bool:
    if key in HONOURED:
        return False
    return key.startswith(REFUSED_SECTIONS) or key == "train.seed" or key.startswith(REFUSED_TRAIN)


def check_resume(recipe, checkpoint: Path | None) -> None:
    """Refuse (RecipeError, one line) resuming `checkpoint` with a recipe change that cannot be honoured."""
    if checkpoint is None:
        return
    for key, old, new in recipe_changes(checkpoint, recipe):
        if refused(key):
            why = WHY.get(key, WHY.get(key.split(".")[0], WHY.get(".".join(key.split(".")[:2]))))
            raise RecipeError(
                f"{key}: {checkpoint} was trained with {old!r}, the recipe says {new!r}; a resumed run cannot change "
                f"it ({why}): restore it, or choose another train.output_dir to start a new run"
            )


def describe_changes(checkpoint: Path, recipe) -> str | None:
    """One line naming every setting applied differently from the checkpoint's recipe (None: none)."""
    changes = [f"{k} {old!r} -> {new!r}" + (f" ({NO_EFFECT[k]})" if k in NO_EFFECT else "")
               for k, old, new in recipe_changes(checkpoint, recipe) if not refused(k)]
    return f"resuming {Path(checkpoint).name} with a changed recipe: {', '.join(changes)}" if changes else None


__all__ = ["recipe_changes", "check_resume", "describe_changes"]
