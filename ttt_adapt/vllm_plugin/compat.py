"""The few places where vLLM must be told that a TTT model is a hybrid model, and what it refuses.

vLLM treats a model as hybrid (attention plus per-request state layers) only when its config's `layer_types`
names a non-attention layer; a TTT layer is both an attention layer and a state layer, so the TTT architectures
are declared hybrid here. Prefix caching is off by default for them and refused when asked for: a cached prefix
would need the fast-weight state at the cached block's end, which this plugin does not keep. Family settings
that vLLM's stock models would serve differently from transformers are refused too (`check_family`).
"""

import vllm

TESTED_VLLM = ("0.32.0", "0.32.0")
TTT_OP = "vllm::ttt_mlp"
BACKEND = "TTT_MLP"


class ServingError(ValueError):
    """A setting the TTT models cannot serve exactly (one line)."""


def patch_vllm(architectures: set) -> None:
    """Declare `architectures` hybrid, default prefix caching off for them, and check settings (idempotent)."""
    from vllm.config.compilation import CompilationConfig
    from vllm.config.model import ModelConfig
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

    needed = {"ModelConfig.is_hybrid": isinstance(getattr(ModelConfig, "is_hybrid", None), property),
              "ModelConfig.is_prefix_caching_supported":
                  isinstance(getattr(ModelConfig, "is_prefix_caching_supported", None), property),
              "CompilationConfig._attention_ops": isinstance(getattr(CompilationConfig, "_attention_ops", None), list),
              "MambaAttentionBackendEnum.register": hasattr(MambaAttentionBackendEnum, "register")}
    missing = [name for name, ok in needed.items() if not ok]
    if missing:
        raise ImportError(f"ttt-adapt's vLLM plugin needs {', '.join(missing)} (tested with vLLM "
                          f"{TESTED_VLLM[0]}, found {vllm.__version__})")
    if getattr(ModelConfig, "_ttt_architectures", None) is None:
        ModelConfig._ttt_architectures = set()
        hybrid, prefix = ModelConfig.is_hybrid.fget, ModelConfig.is_prefix_caching_supported.fget
        ModelConfig.is_hybrid = property(lambda self: self.architecture in self._ttt_architectures or hybrid(self))
        ModelConfig.is_prefix_caching_supported = property(
            lambda self: self.architecture not in self._ttt_architectures and prefix(self))
    ModelConfig._ttt_architectures |= architectures
    if TTT_OP not in CompilationConfig._attention_ops:  # split compiled graphs at the TTT op (as at mamba's)
        CompilationConfig._attention_ops.append(TTT_OP)
    if BACKEND not in MambaAttentionBackendEnum._member_map_:
        MambaAttentionBackendEnum.register(BACKEND, "ttt_adapt.vllm_plugin.ttt_mlp.TTTStateBackend")
    for arch in architectures:
        MODELS_CONFIG_MAP[arch] = TTTServingConfig
    refuse_state_requests()


STATE_ARGS = ("ttt_state", "ttt_state_path", "ttt_state_name")


def refuse_state_requests() -> None:
    """Make a request that passes a saved fast-weight state (`extra_args` / the server's `vllm_xargs` naming one of
    `STATE_ARGS`) fail in one line instead of being served without it (idempotent)."""
    from vllm import SamplingParams

    verify = SamplingParams._verify_args
    if getattr(verify, "_ttt_refuses_states", False):
        return

    def _verify_args(self):
        given = sorted(set(getattr(self, "extra_args", None) or ()) & set(STATE_ARGS))
        if given:
            raise ServingError(f"the ttt-adapt vLLM plugin cannot start a request from a saved fast-weight state "
                               f"({given[0]}): vLLM's state cache is filled by prefill only; use transformers' "
                               "generate(ttt_state=...) (docs/memory.md)")
        return verify(self)

    _verify_args._ttt_refuses_states = True
    SamplingParams._verify_args = _verify_args


class TTTServingConfig:
    """vLLM's per-architecture config hook: refuse what the TTT state cannot follow exactly."""

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        check_serving(vllm_config)


def check_serving(vllm_config) -> None:
    """ServingError (one line) for a setting under which the fast-weight state would go wrong."""
    cache, parallel = vllm_config.cache_config, vllm_config.parallel_config
    ttt = vllm_config.model_config.hf_config.ttt
    if cache.enable_prefix_caching:
        raise ServingError("In-Place TTT models do not support prefix caching (the fast weights of a cached prefix "
                           "are not kept): drop --enable-prefix-caching / enable_prefix_caching=True")
    if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
        raise ServingError("the ttt-adapt vLLM plugin serves on one device (tensor and pipeline parallel size 1), "
                           f"got tp={parallel.tensor_parallel_size}, pp={parallel.pipeline_parallel_size}")
    if vllm_config.speculative_config is not None:
        raise ServingError("In-Place TTT models do not support speculative decoding (fast weights cannot be "
                           "rolled back)")
    if ttt["target"] != "hidden_states":
        raise ServingError(f"the ttt-adapt vLLM plugin serves target='hidden_states' exports, this one has "
                           f"target={ttt['target']!r}")
    check_family(vllm_config)


def check_family(vllm_config) -> None:
    """ServingError (one line) for a family setting vLLM's stock model does not follow as transformers does."""
    arch, hf = vllm_config.model_config.architecture, vllm_config.model_config.hf_text_config
    if arch == "TTTQwen2ForCausalLM" and len(set(getattr(hf, "layer_types", None) or ())) > 1:
        raise ServingError("vLLM's Qwen2 slides its attention window on every layer or none, this export mixes "
                           f"sliding and full layers (layer_types {hf.layer_types})")
    if arch == "TTTGemma3ForCausalLM":
        if getattr(hf, "attn_logit_softcapping", None) is not None:
            raise ServingError("vLLM's Gemma 3 does not apply attention logit softcapping, this export sets "
                               f"attn_logit_softcapping={hf.attn_logit_softcapping}")
        if getattr(hf, "use_bidirectional_attention", False):
            raise ServingError("the ttt-adapt vLLM plugin serves causal Gemma 3 exports, this one sets "
                               "use_bidirectional_attention=True")
