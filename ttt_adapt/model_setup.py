"""The model and tokenizer a recipe trains: base loaded, converted to TTT, trainable parameters chosen.

Training (`ttt_adapt.training.loop`) builds the model here and so does loading a checkpoint for export
(`ttt_adapt.training.checkpoints`), so a checkpoint's weights always meet the module layout they were saved from.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from accelerate.utils import set_seed
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ttt_adapt._util import RecipeError, first_line, unwrap
from ttt_adapt.compat import enable_activation_checkpointing
from ttt_adapt.convert import convert
from ttt_adapt.data.chat import set_chat_template
from ttt_adapt.modeling import FAMILIES
from ttt_adapt.modeling.ttt_layer import TTTMLP
from ttt_adapt.recipe.sections import Recipe


def is_ttt_param(name: str) -> bool:
    """TTT parameters live in each TTT layer's `mlp.ttt` submodule (also under peft's modules_to_save)."""
    return ".mlp.ttt." in name


def trained_names(model, trainable: str) -> set[str]:
    """Names of the parameters `train.trainable` trains: the TTT parameters (`ttt`), those and the `down_proj` of
    every TTT layer (`instruct`), or all of them (`full`)."""
    names = [name for name, _ in model.named_parameters()]
    if trainable == "full":
        return set(names)
    down = set()
    if trainable == "instruct":
        down = {f"{prefix}.down_proj.{n}" for prefix, module in model.named_modules() if isinstance(module, TTTMLP)
                for n, _ in module.down_proj.named_parameters()}
    return {name for name in names if is_ttt_param(name) or name in down}


def is_converted(model_type) -> bool:
    """True for the `ttt_*` model_type of a family in `FAMILIES` (a TTT model, trained on without converting)."""
    return any(lm.config_class.model_type == model_type for lm in FAMILIES.values())


def recipe_tokenizer(recipe: Recipe):
    """The base model's tokenizer, with the chat template of `data.chat_template_path` when the recipe names one; it
    must have an eos token (packing ends every document with it)."""
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.name_or_path)
    if recipe.data.chat_template_path is not None:
        set_chat_template(tokenizer, recipe.data.chat_template_path)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token (needed to separate packed documents)")
    return tokenizer


def build_model(recipe: Recipe, device: str | None = None, config=None):
    """The model to train: base loaded, converted, trainable parameters chosen (LoRA via peft if asked).

    Seeded with `train.seed`, so the same recipe always builds the same initial TTT (and LoRA) weights.
    `config`: the base config when already loaded (`ttt_adapt.training.preflight`). `device="meta"` builds the very same
    model without reading or allocating anything, from the config alone: what the memory plan counts, and the
    skeleton of FSDP processes that receive their shards of the weights from another (`ttt_adapt.distributed.fsdp`).
    """
    with torch.device("meta") if device == "meta" else contextlib.nullcontext():
        return _build_model(recipe, device, config)


def _build_model(recipe: Recipe, device, config):
    set_seed(recipe.train.seed)
    m = recipe.model
    kwargs = {"dtype": getattr(torch, m.dtype)}
    if m.attn_implementation is not None:
        kwargs["attn_implementation"] = m.attn_implementation
    if device == "meta":
        config = config if config is not None else AutoConfig.from_pretrained(m.name_or_path)
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    else:
        if config is not None:
            kwargs["config"] = config
        model = AutoModelForCausalLM.from_pretrained(m.name_or_path, **kwargs)
    if not is_converted(model.config.model_type):
        model = convert(model, recipe.ttt)
    model.config.use_cache = False
    t = recipe.train
    if t.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if t.lora.r > 0:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=t.lora.r,
            lora_alpha=t.lora.alpha,
            lora_dropout=t.lora.dropout,
            target_modules=list(t.lora.target_modules),
            modules_to_save=["ttt"],  # suffix match: model.layers.N.mlp.ttt (the TTTParams of each TTT layer)
            task_type="CAUSAL_LM",
        )
        try:
            with warnings.catch_warnings():  # peft reads transformers' deprecated alias: not the user's to fix
                warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
                model = get_peft_model(model, lora)
        except ValueError as e:  # e.g. a target module name the model does not have
            raise RecipeError(f"train.lora.target_modules: peft refused {t.lora.target_modules}: {first_line(e, None)}") \
                from None
    else:
        trained = trained_names(model, t.trainable)
        for name, p in model.named_parameters():
            p.requires_grad_(name in trained)
    if not any(is_ttt_param(n) and p.requires_grad for n, p in model.named_parameters()):
        raise RuntimeError("no trainable TTT parameter found after conversion")
    return model


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder layers of a (possibly peft-wrapped) causal LM of a supported family, TTT layers included."""
    base = unwrap(model)
    layers = getattr(getattr(base, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise ValueError(f"{type(base).__name__} has no model.layers (decoder layers)")
    return list(layers)


def compile_decoder_layers(model) -> None:
    """torch.compile each decoder layer in place (module identity kept, so FSDP, DDP and checkpointing see the same
    modules): a TTT layer compiles without graph breaks, and a new document layout is new data, not a recompile."""
    for layer in decoder_layers(model):
        layer.compile()


__all__ = ["build_model", "trained_names", "compile_decoder_layers", "decoder_layers", "recipe_tokenizer",
           "is_ttt_param", "is_converted"]
