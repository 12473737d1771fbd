"""`load_recipe(path, overrides)`: a recipe file read, its overrides applied, each section built and checked.

The sections and their value checks are `ttt_adapt.recipe.sections`; the YAML reading and the typed building they
share, `ttt_adapt.recipe.typed`. Anything wrong raises `RecipeError` (`EvalError` in the eval section), one line.
"""

from __future__ import annotations

import os

from ttt_adapt._util import RecipeError
from ttt_adapt.data.text import DataConfig
from ttt_adapt.modeling.configuration_ttt import TTTConfig
from ttt_adapt.recipe.sections import (
    CHOICES,
    EvalSettings,
    ExportConfig,
    ModelConfig,
    ParallelConfig,
    Recipe,
    TrainConfig,
    validate_ttt,
)
from ttt_adapt.recipe.typed import apply_override, build_dataclass, read_recipe_file, unknown_key_message

SECTIONS = {"model", "ttt", "data", "train", "parallel", "export", "eval"}


def load_recipe(path: str | os.PathLike, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe; raise `RecipeError` (one line) for anything wrong."""
    path = str(path)
    raw = read_recipe_file(path, SECTIONS)
    for item in overrides:
        apply_override(raw, item)
    recipe = build_recipe(raw)
    recipe.path = path
    return recipe


def build_recipe(raw: dict) -> Recipe:
    """Turn a raw recipe dict into a validated `Recipe`."""
    unknown = sorted(set(raw) - SECTIONS, key=str)
    if unknown:
        raise RecipeError(unknown_key_message(str(unknown[0]), str(unknown[0]), SECTIONS))
    for section in ("model", "data", "train"):
        if raw.get(section) is None:
            raise RecipeError(f"{section}: missing section")
    if raw.get("eval") is not None and not isinstance(raw["eval"], dict):
        raise RecipeError("eval: must be a mapping of evaluation settings")
    parts = {}
    for section, cls in (("model", ModelConfig), ("ttt", TTTConfig), ("data", DataConfig), ("train", TrainConfig),
                         ("parallel", ParallelConfig), ("export", ExportConfig)):
        if raw.get(section) is not None:
            parts[section] = build_dataclass(cls, raw[section], section, CHOICES)
    recipe = Recipe(**parts)
    recipe.model.validate()
    validate_ttt(recipe.ttt)
    recipe.data.validate()
    recipe.train.validate()
    recipe.parallel.validate()
    recipe.export.validate()
    if raw.get("eval") is not None:
        defaults = {"corpus": recipe.data.eval_path, "seq_len": recipe.data.seq_len}
        recipe.eval = EvalSettings.from_dict({**defaults, **raw["eval"]})
    return recipe


__all__ = ["SECTIONS", "load_recipe", "build_recipe", "apply_override"]
