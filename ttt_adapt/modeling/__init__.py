"""Modeling code that ships inside every export (torch + transformers only)."""

from .configuration_ttt import TTTConfig, TTTLlamaConfig, TTTQwen3Config
from .modeling_ttt import (
    TTTLlamaForCausalLM,
    TTTLlamaModel,
    TTTQwen3ForCausalLM,
    TTTQwen3Model,
    set_ttt_training_step,
    ttt_learning_rates,
)

# (model, causal LM) of every family; the config class names the `ttt_*` model_type (to register, to refresh exports).
MODEL_CLASSES = ((TTTQwen3Model, TTTQwen3ForCausalLM), (TTTLlamaModel, TTTLlamaForCausalLM))
# The files of this package that ship inside every export (what `save_pretrained` copies for the auto_map).
SHIPPED_FILES = ("configuration_ttt.py", "modeling_ttt.py", "ttt_layer.py")
