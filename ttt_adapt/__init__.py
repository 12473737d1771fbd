"""ttt-adapt: turn Qwen3 / Qwen2 / Llama / Mistral / Gemma 3 checkpoints into In-Place Test-Time Training models.

    from ttt_adapt import TTTConfig, convert
    model = convert(AutoModelForCausalLM.from_pretrained(base), TTTConfig(layers=[0, 6, 12], chunk_size=1024))
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .convert import convert
from .modeling import MODEL_CLASSES, TTTConfig, set_ttt_training_step, ttt_learning_rates

for _model, _lm in MODEL_CLASSES:
    AutoConfig.register(_model.config_class.model_type, _model.config_class, exist_ok=True)
    AutoModel.register(_model.config_class, _model, exist_ok=True)
    AutoModelForCausalLM.register(_model.config_class, _lm, exist_ok=True)

__all__ = ["TTTConfig", "convert", "set_ttt_training_step", "ttt_learning_rates"]
