"""Modeling code that ships inside every export (torch + transformers only)."""

from .configuration_ttt import TTTConfig
from .modeling_ttt import FAMILIES, set_ttt_training_step, ttt_learning_rates

# (model, causal LM) of every family; the config class names the `ttt_*` model_type (to register, to refresh exports).
MODEL_CLASSES = tuple(FAMILIES)
# The stock model_types `convert` takes, and the TTT ones it makes (the `ttt_` prefix keeps them apart).
BASE_MODEL_TYPES = tuple(lm.config_class.model_type.removeprefix("ttt_") for _, lm in MODEL_CLASSES)
# The causal LM class of each `ttt_*` model_type.
CAUSAL_LM_BY_TYPE = {lm.config_class.model_type: lm for _, lm in MODEL_CLASSES}
TTT_MODEL_TYPES = tuple(CAUSAL_LM_BY_TYPE)
# The files of this package that ship inside every export (what `save_pretrained` copies for the auto_map).
SHIPPED_FILES = ("configuration_ttt.py", "modeling_ttt.py", "ttt_layer.py")
