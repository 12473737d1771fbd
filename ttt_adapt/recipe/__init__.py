"""The recipe: one YAML file that says what to convert, how to train it and where to export it.

`sections`: each section a typed dataclass and its value checks, and `Recipe`, the whole; `loading`: `load_recipe`
(the file read, the dotted overrides applied, each section built and checked); `typed`: the YAML reading and the
typed building they share. `from ttt_adapt.recipe import load_recipe, Recipe, ...` gives the names below.
"""

from ttt_adapt.recipe.loading import apply_override, build_recipe, load_recipe
from ttt_adapt.recipe.sections import (
    DataConfig,
    EvalError,
    EvalSettings,
    ExportConfig,
    LoraSettings,
    ModelConfig,
    ParallelConfig,
    Recipe,
    RecipeError,
    TrainConfig,
    TTTConfig,
    position_bins,
    validate_ttt,
)

__all__ = [
    "RecipeError", "EvalError", "Recipe", "EvalSettings", "position_bins", "validate_ttt", "ModelConfig",
    "LoraSettings", "TrainConfig", "ParallelConfig", "ExportConfig", "TTTConfig", "DataConfig", "load_recipe",
    "apply_override", "build_recipe",
]
