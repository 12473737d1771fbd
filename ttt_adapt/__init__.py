"""ttt-adapt: turn Qwen3 / Llama checkpoints into In-Place Test-Time Training models.

    from ttt_adapt import TTTConfig, convert
    model = convert(AutoModelForCausalLM.from_pretrained(base), TTTConfig(layers=[0, 6, 12], chunk_size=1024))
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .convert import convert
from .modeling import (
    TTTConfig,
    TTTLlamaConfig,
    TTTLlamaForCausalLM,
    TTTLlamaModel,
    TTTQwen3Config,
    TTTQwen3ForCausalLM,
    TTTQwen3Model,
    set_ttt_training_step,
    ttt_learning_rates,
)

for _config, _model, _lm in (
    (TTTQwen3Config, TTTQwen3Model, TTTQwen3ForCausalLM),
    (TTTLlamaConfig, TTTLlamaModel, TTTLlamaForCausalLM),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoModelForCausalLM.register(_config, _lm, exist_ok=True)

__all__ = ["TTTConfig", "convert", "set_ttt_training_step", "ttt_learning_rates"]
