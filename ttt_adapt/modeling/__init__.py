"""Modeling code that ships inside every export (torch + transformers only)."""

from .configuration_ttt import TTTConfig
from .modeling_ttt import FAMILIES, set_ttt_training_step, ttt_learning_rates

# FAMILIES is the one family registry: stock model_type (what `convert` takes) -> TTT causal LM class, whose
# `config_class.model_type` is the `ttt_*` one it makes, `ttt_model` its TTT model and `__bases__[-1]` the stock
# causal LM it subclasses.
# The files of this package that ship inside every export (what `save_pretrained` copies for the auto_map).
SHIPPED_FILES = ("configuration_ttt.py", "modeling_ttt.py", "ttt_layer.py", "ttt_state.py")
