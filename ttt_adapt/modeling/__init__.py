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
