"""Pretrained causal LM (Qwen3, Qwen2, Llama, Mistral, Gemma 3 text) -> In-Place TTT model, sharing the base weights."""

import torch

from .modeling import FAMILIES
from .modeling.configuration_ttt import TTTConfig
from .modeling.ttt_layer import TTTParams


def supported_names() -> str:
    """The causal LM classes `convert` takes, with their model_types, for error messages."""
    return ", ".join(f"{lm.__bases__[-1].__name__} ({model_type})" for model_type, lm in FAMILIES.items())


def ttt_class_of(model):
    """The TTT causal LM class of a stock causal LM of a supported family (its TTT class subclasses it, last base),
    or None."""
    lm = FAMILIES.get(getattr(model.config, "model_type", None))
    return lm if lm is not None and type(model) is lm.__bases__[-1] else None


def convert(model, ttt_config: TTTConfig | None = None):
    """Turn a pretrained causal LM of a supported family (`FAMILIES`: Qwen3, Qwen2, Llama, Mistral, Gemma 3 text)
    into its In-Place TTT version.

    The returned model holds the very same base parameter tensors (tied embeddings stay tied) plus new TTT
    parameters on the base's device and dtype, initialised so that its outputs equal the base's exactly.
    Raises ValueError naming the problem for a model it cannot take or a bad `ttt_config`.
    """
    ttt_config = ttt_config if ttt_config is not None else TTTConfig()
    if getattr(model.config, "model_type", "").startswith("ttt_") or isinstance(model, tuple(FAMILIES.values())):
        raise ValueError(f"{type(model).__name__} is already an In-Place TTT model")
    model_cls = ttt_class_of(model)
    if model_cls is None:
        raise ValueError(f"{type(model).__name__} {_why_not(model)}; In-Place TTT takes {supported_names()}")
    if getattr(model.config, "use_bidirectional_attention", False):
        raise ValueError(f"{type(model).__name__} has bidirectional attention; In-Place TTT needs a causal model")
    if not isinstance(ttt_config, TTTConfig):
        raise ValueError(f"ttt_config must be a TTTConfig, got {type(ttt_config).__name__}")
    num_layers = model.config.num_hidden_layers
    ttt_config.validate(num_layers)

    config_cls = model_cls.config_class
    base_dict = model.config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        base_dict.pop(key, None)
    ttt = dict(ttt_config.to_dict(), layers=ttt_config.resolved_layers(num_layers))
    config = config_cls(**base_dict, ttt=ttt, base_model_name_or_path=model.name_or_path or None)
    config._attn_implementation = model.config._attn_implementation

    with torch.device("meta"):
        ttt_model = model_cls(config)
    ttt_model.load_state_dict(model.state_dict(keep_vars=True), strict=False, assign=True)
    _share_buffers(ttt_model, model)
    param = next(model.parameters())
    for module in ttt_model.modules():
        if isinstance(module, TTTParams):
            module.to_empty(device=param.device)
            module.to(param.dtype)
            module.reset_parameters(config.ttt["lr_init"], config.initializer_range)
    # a base on the meta device (the memory plan, a sharded model's skeleton) stays there; any other fills all
    missing = [n for n, p in ttt_model.named_parameters() if p.is_meta] if not param.is_meta else []
    if missing:
        raise ValueError(f"the base model lacks weights the TTT model needs: {', '.join(missing[:3])}")
    ttt_model.tie_weights()
    ttt_model.generation_config = model.generation_config
    ttt_model.train(model.training)
    return ttt_model


def _why_not(model) -> str:
    """Why `convert` does not take `model`, in a few words."""
    config = model.config
    if hasattr(config, "get_text_config") and config.get_text_config() is not config:
        return (f"is a multimodal model ({getattr(config, 'model_type', '?')}): pass its text-only causal LM, "
                "e.g. Gemma3ForCausalLM for Gemma 3 text checkpoints (model_type gemma3_text)")
    mlps = [m for name, m in model.named_modules() if name.endswith(".mlp") or name == "mlp"]
    if not mlps:
        return "has no decoder-layer MLPs (modules named 'mlp')"
    for mlp in mlps:
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            return (f"has an MLP that is not gated ({type(mlp).__name__}; In-Place TTT needs gate_proj, up_proj, "
                    "down_proj)")
    return "is not a supported family"


def _share_buffers(ttt_model, base):
    """Non-persistent buffers (e.g. rotary inv_freq) are not in a state dict: take the base's own tensors."""
    for name, module in ttt_model.named_modules():
        if isinstance(module, TTTParams):
            continue
        for buf_name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.is_meta:
                module._buffers[buf_name] = base.get_submodule(name).get_buffer(buf_name)
        for attr, value in list(vars(module).items()):  # plain tensor attributes, e.g. original_inv_freq
            if isinstance(value, torch.Tensor) and value.is_meta and not isinstance(value, torch.nn.Parameter):
                setattr(module, attr, getattr(base.get_submodule(name), attr))
