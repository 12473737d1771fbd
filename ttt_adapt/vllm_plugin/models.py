"""vLLM's Qwen3, Qwen2, Llama, Mistral and Gemma 3 models with the TTT layers' MLP replaced by `TTTMLP`; everything
else (attention and its sliding windows, norms, Gemma 3's scaled embeddings and logit softcapping) is vLLM's own.

Each TTT decoder layer is the stock vLLM decoder layer whose `mlp` is wrapped (its projections reused, so vLLM's
weight loading, including the gate/up merge, is unchanged) and whose forward hands the MLP the token positions.
The causal LMs declare themselves hybrid (vLLM then allocates one state slot per request for the TTT layers).
"""

import contextlib

from vllm.model_executor.layers.mamba.mamba_utils import get_temporal_copy_spec
from vllm.model_executor.models import gemma3, qwen2, qwen3
from vllm.model_executor.models.gemma3 import Gemma3DecoderLayer, Gemma3ForCausalLM
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralDecoderLayer, MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer, Qwen2ForCausalLM, Qwen2Model
from vllm.model_executor.models.qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM, Qwen3Model
from vllm.model_executor.models.utils import extract_layer_index

from .ttt_mlp import TTTMLP, state_shapes


@contextlib.contextmanager
def swapped(module, name, replacement):
    """`module.<name>` is `replacement` inside the block: stock __init__s build their parts by module-level name."""
    stock = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, stock)


class TTTDecoderLayerMixin:
    """Wraps the MLP of a TTT layer; the forward is the stock one with positions passed to that MLP."""

    def _wrap_ttt_mlp(self, config, prefix):
        layer_idx = extract_layer_index(prefix)
        if layer_idx in config.ttt["layers"]:
            self.mlp = TTTMLP(self.mlp, config, layer_idx, prefix=f"{prefix}.mlp")

    def forward(self, positions, hidden_states, residual, **kwargs):
        if not isinstance(self.mlp, TTTMLP):
            return super().forward(positions, hidden_states, residual, **kwargs)
        if any(v is not None for v in kwargs.values()):  # e.g. Mistral's t_cond, which this forward does not apply
            raise ValueError(f"a TTT decoder layer got inputs it does not apply: {sorted(kwargs)}")
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states, positions), residual


class TTTQwen3DecoderLayer(TTTDecoderLayerMixin, Qwen3DecoderLayer):
    def __init__(self, config, cache_config=None, quant_config=None, prefix="", **kwargs):
        super().__init__(config, cache_config, quant_config, prefix, **kwargs)
        self._wrap_ttt_mlp(config, prefix)


class TTTLlamaDecoderLayer(TTTDecoderLayerMixin, LlamaDecoderLayer):
    def __init__(self, vllm_config, prefix="", config=None, **kwargs):
        super().__init__(vllm_config, prefix, config, **kwargs)
        self._wrap_ttt_mlp(config or vllm_config.model_config.hf_config, prefix)


class TTTHybridMixin(HasInnerState, IsHybrid):
    """The state each request gets per TTT layer (`ttt_mlp.state_shapes`), fp32."""

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config):
        return state_shapes(vllm_config.model_config.hf_config)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config):
        import torch

        return (torch.float32,) * 4

    @classmethod
    def get_mamba_state_copy_func(cls):
        return (get_temporal_copy_spec,) * 4


class TTTQwen3Model(Qwen3Model):
    decoder_layer_type = TTTQwen3DecoderLayer


class TTTQwen3ForCausalLM(Qwen3ForCausalLM, TTTHybridMixin):
    """vLLM's `Qwen3ForCausalLM` with In-Place TTT layers."""

    def __init__(self, *, vllm_config, prefix=""):
        with swapped(qwen3, "Qwen3Model", TTTQwen3Model):
            super().__init__(vllm_config=vllm_config, prefix=prefix)


class TTTLlamaForCausalLM(LlamaForCausalLM, TTTHybridMixin):
    """vLLM's `LlamaForCausalLM` with In-Place TTT layers."""

    def __init__(self, *, vllm_config, prefix=""):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=TTTLlamaDecoderLayer)


# ------------------------------------------------------------------------------------ Qwen2, Mistral, Gemma 3


class TTTQwen2DecoderLayer(TTTDecoderLayerMixin, Qwen2DecoderLayer):
    def __init__(self, config, cache_config=None, quant_config=None, prefix="", **kwargs):
        super().__init__(config, cache_config, quant_config, prefix, **kwargs)
        self._wrap_ttt_mlp(config, prefix)


class TTTMistralDecoderLayer(TTTDecoderLayerMixin, MistralDecoderLayer):
    def __init__(self, vllm_config, prefix="", config=None, **kwargs):
        super().__init__(vllm_config, prefix, config, **kwargs)
        if self.ada_rms_norm_t_cond is not None:  # not in transformers' Mistral, so never in an export
            raise ValueError("In-Place TTT Mistral layers do not take ada_rms_norm_t_cond")
        self._wrap_ttt_mlp(config or vllm_config.model_config.hf_config, prefix)


class TTTGemma3DecoderLayer(TTTDecoderLayerMixin, Gemma3DecoderLayer):
    """Gemma 3's layer: the TTT MLP reads the `pre_feedforward_layernorm` output, as in transformers."""

    def __init__(self, config, cache_config=None, quant_config=None, prefix="", **kwargs):
        super().__init__(config, cache_config, quant_config, prefix, **kwargs)
        self._wrap_ttt_mlp(config, prefix)

    def forward(self, positions, hidden_states, residual, **kwargs):
        if not isinstance(self.mlp, TTTMLP):
            return Gemma3DecoderLayer.forward(self, positions, hidden_states, residual, **kwargs)
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states, **kwargs)
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states, residual = self.pre_feedforward_layernorm(hidden_states, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden_states, positions)), residual


class TTTQwen2Model(Qwen2Model):
    def __init__(self, *, vllm_config, prefix=""):
        super().__init__(vllm_config=vllm_config, prefix=prefix, decoder_layer_type=TTTQwen2DecoderLayer)


class TTTQwen2ForCausalLM(Qwen2ForCausalLM, TTTHybridMixin):
    """vLLM's `Qwen2ForCausalLM` with In-Place TTT layers."""

    def __init__(self, *, vllm_config, prefix=""):
        with swapped(qwen2, "Qwen2Model", TTTQwen2Model):
            super().__init__(vllm_config=vllm_config, prefix=prefix)


class TTTMistralForCausalLM(MistralForCausalLM, TTTHybridMixin):
    """vLLM's `MistralForCausalLM` (the model vLLM serves `MistralForCausalLM` checkpoints with) with In-Place TTT
    layers."""

    def __init__(self, *, vllm_config, prefix=""):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=TTTMistralDecoderLayer)


class TTTGemma3ForCausalLM(Gemma3ForCausalLM, TTTHybridMixin):
    """vLLM's text `Gemma3ForCausalLM` with In-Place TTT layers."""

    def __init__(self, *, vllm_config, prefix=""):
        with swapped(gemma3, "Gemma3DecoderLayer", TTTGemma3DecoderLayer):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
