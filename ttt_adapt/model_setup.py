"""The model and tokenizer a recipe trains: base loaded, converted to TTT, trainable parameters chosen.

Training (`ttt_adapt.training.loop`) builds the model here and so does loading a checkpoint for export
(`ttt_adapt.training.checkpoints`), so a checkpoint's weights always meet the module layout they were saved from.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from accelerate.utils import set_seed
from transformers import AutoModelForCausalLM, AutoTokenizer

from ttt_adapt._util import RecipeError, first_line
from ttt_adapt.compat import enable_activation_checkpointing
from ttt_adapt.config import Recipe
from ttt_adapt.convert import convert
from ttt_adapt.modeling import BASE_MODEL_TYPES, TTT_MODEL_TYPES

SUPPORTED_MODEL_TYPES = BASE_MODEL_TYPES  # the families `convert` takes (ttt_adapt.modeling_ttt.FAMILIES)
CONVERTED_MODEL_TYPES = TTT_MODEL_TYPES


def is_ttt_param(name: str) -> bool:
    """TTT parameters live in each TTT layer's `mlp.ttt` submodule (also under peft's modules_to_save)."""
    return ".mlp.ttt." in name


def load_tokenizer(recipe: Recipe):
    """The base model's tokenizer; it must have an eos token (packing ends every document with it)."""
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.name_or_path)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token (needed to separate packed documents)")
    return tokenizer


def build_model(recipe: Recipe, meta_config=None):
    """The model to train: base loaded, converted, trainable parameters chosen (LoRA via peft if asked).

    Seeded with `train.seed`, so the same recipe always builds the same initial TTT (and LoRA) weights. With
    `meta_config` (the base's config) nothing is read or allocated: the same model is built on the meta device,
    for the FSDP processes that receive their shards of the weights from another (`ttt_adapt.distributed.fsdp`).
    """
    with torch.device("meta") if meta_config is not None else contextlib.nullcontext():
        return _build_model(recipe, meta_config)


def _build_model(recipe: Recipe, meta_config):
    set_seed(recipe.train.seed)
    m = recipe.model
    kwargs = {"dtype": getattr(torch, m.dtype)}
    if m.attn_implementation is not None:
        kwargs["attn_implementation"] = m.attn_implementation
    if meta_config is not None:
        model = AutoModelForCausalLM.from_config(meta_config, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(m.name_or_path, **kwargs)
    if model.config.model_type not in CONVERTED_MODEL_TYPES:
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
        for name, p in model.named_parameters():
            p.requires_grad_(t.trainable == "full" or is_ttt_param(name))
    if not any(is_ttt_param(n) and p.requires_grad for n, p in model.named_parameters()):
        raise RuntimeError("no trainable TTT parameter found after conversion")
    return model


__all__ = ["build_model", "load_tokenizer", "is_ttt_param", "SUPPORTED_MODEL_TYPES", "CONVERTED_MODEL_TYPES"]
