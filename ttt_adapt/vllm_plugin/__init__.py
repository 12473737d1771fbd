"""vLLM plugin: serves In-Place TTT exports with vLLM's own model code and its hybrid-model state cache.

`register()` is the `vllm.general_plugins` entry point (pyproject.toml); vLLM calls it in every process it starts.
It registers each TTT architecture name an export writes (every family's: `TTTQwen3ForCausalLM`,
`TTTQwen2ForCausalLM`, `TTTLlamaForCausalLM`, `TTTMistralForCausalLM`, `TTTGemma3ForCausalLM`) with `ModelRegistry`,
the TTT configs with transformers' AutoConfig (so no `--trust-remote-code` is needed), and the TTT layer's op as a
graph-splitting op. The models live in `models.py`, the TTT MLP and its state in `ttt_mlp.py`.
Imports nothing from vLLM until vLLM calls it.
"""

# architecture name an export writes -> "module:class" of its vLLM model
ARCHITECTURES = {
    "TTTQwen3ForCausalLM": "ttt_adapt.vllm_plugin.models:TTTQwen3ForCausalLM",
    "TTTLlamaForCausalLM": "ttt_adapt.vllm_plugin.models:TTTLlamaForCausalLM",
    "TTTQwen2ForCausalLM": "ttt_adapt.vllm_plugin.models:TTTQwen2ForCausalLM",
    "TTTMistralForCausalLM": "ttt_adapt.vllm_plugin.models:TTTMistralForCausalLM",
    "TTTGemma3ForCausalLM": "ttt_adapt.vllm_plugin.models:TTTGemma3ForCausalLM",
}


def register() -> None:
    """Register the TTT architectures with vLLM (idempotent)."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from ttt_adapt.modeling.configuration_ttt import (
        TTTGemma3TextConfig,
        TTTLlamaConfig,
        TTTMistralConfig,
        TTTQwen2Config,
        TTTQwen3Config,
    )

    from .compat import patch_vllm

    for config in (TTTQwen3Config, TTTQwen2Config, TTTLlamaConfig, TTTMistralConfig, TTTGemma3TextConfig):
        AutoConfig.register(config.model_type, config, exist_ok=True)
    for name, target in ARCHITECTURES.items():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, target)
    patch_vllm(set(ARCHITECTURES))
