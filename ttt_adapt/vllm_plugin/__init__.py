"""vLLM plugin: serves In-Place TTT exports with vLLM's own model code and its hybrid-model state cache.

`register()` is the `vllm.general_plugins` entry point (pyproject.toml); vLLM calls it in every process it starts.
It registers each TTT architecture name an export writes (`TTTQwen3ForCausalLM`, `TTTLlamaForCausalLM`) with
`ModelRegistry`, the TTT configs with transformers' AutoConfig (so no `--trust-remote-code` is needed), and the TTT
layer's op as a graph-splitting op. The models live in `models.py`, the TTT MLP and its state in `ttt_mlp.py`.
Imports nothing from vLLM until vLLM calls it.
"""

# architecture name an export writes -> "module:class" of its vLLM model
ARCHITECTURES = {
    "TTTQwen3ForCausalLM": "ttt_adapt.vllm_plugin.models:TTTQwen3ForCausalLM",
    "TTTLlamaForCausalLM": "ttt_adapt.vllm_plugin.models:TTTLlamaForCausalLM",
}


def register() -> None:
    """Register the TTT architectures with vLLM (idempotent)."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from ttt_adapt.modeling.configuration_ttt import TTTLlamaConfig, TTTQwen3Config

    from .compat import patch_vllm

    for config in (TTTQwen3Config, TTTLlamaConfig):
        AutoConfig.register(config.model_type, config, exist_ok=True)
    for name, target in ARCHITECTURES.items():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, target)
    patch_vllm(set(ARCHITECTURES))
