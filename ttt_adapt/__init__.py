"""ttt-adapt: turn Qwen3 / Qwen2 / Llama / Mistral / Gemma 3 checkpoints into In-Place Test-Time Training models.

    from ttt_adapt import TTTConfig, convert
    model = convert(AutoModelForCausalLM.from_pretrained(base), TTTConfig(layers=[0, 6, 12], chunk_size=1024))
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .convert import convert
from .modeling import FAMILIES, TTTConfig, set_ttt_training_step, ttt_learning_rates

for _lm in FAMILIES.values():
    AutoConfig.register(_lm.config_class.model_type, _lm.config_class, exist_ok=True)
    AutoModel.register(_lm.config_class, _lm.ttt_model, exist_ok=True)
    AutoModelForCausalLM.register(_lm.config_class, _lm, exist_ok=True)

__all__ = ["TTTConfig", "convert", "set_ttt_training_step", "ttt_learning_rates"]
