"""The checks a run needs before any work: the base model, the launch and the run folder, in one place.

`preflight(recipe, accelerator)` runs them all (on every process, before anything is built or written) and
returns what they loaded (`Base`: the base config and tokenizer), so nothing is loaded twice. Every failure
is a `RecipeError` whose message is one line naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import AutoConfig

from ttt_adapt._util import RecipeError, first_line
from ttt_adapt.config import Recipe
from ttt_adapt.distributed.fsdp import FSDPRequest, check_fsdp_run, fsdp_request
from ttt_adapt.model_setup import CONVERTED_MODEL_TYPES, SUPPORTED_MODEL_TYPES, load_tokenizer
from ttt_adapt.training.checkpoints import latest_checkpoint
from ttt_adapt.training.resume import check_resume


@dataclass
class Base:
    """What the checks loaded: the base model's config and its tokenizer."""

    config: object
    tokenizer: object


@dataclass
class Preflight(Base):
    """`Base` plus the FSDP request of the recipe or the launch (None: no FSDP)."""

    fsdp: FSDPRequest | None = None


def preflight(recipe: Recipe, accelerator) -> Preflight:
    """Every check of a training run on this launch (`accelerator`: its process count and mixed precision)."""
    base = check_run(recipe)
    check_world(recipe, accelerator.num_processes)
    fsdp = fsdp_request(recipe)
    if fsdp is not None:
        check_fsdp_run(fsdp, accelerator.mixed_precision)
    return Preflight(base.config, base.tokenizer, fsdp)


def base_config(recipe: Recipe):
    """The config of `model.name_or_path` (RecipeError, one line, when there is none)."""
    name = recipe.model.name_or_path
    try:
        return AutoConfig.from_pretrained(name)
    except Exception as e:  # OSError, ValueError, hub errors: all mean "not a loadable model" here
        raise RecipeError(f"model.name_or_path: cannot load a model config from {name!r}: {first_line(e, None)}") \
            from None


def check_run(recipe: Recipe) -> Base:
    """Everything about the recipe that needs the base model or the run folder; raise RecipeError (one line).
    Returns the base config and tokenizer, loaded once here."""
    name = recipe.model.name_or_path
    config = base_config(recipe)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES + CONVERTED_MODEL_TYPES:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        what = f"a multimodal {model_type!r} model" if text is not config else f"a {model_type!r} model"
        raise RecipeError(
            f"model.name_or_path: {name!r} is {what}; In-Place TTT converts text-only causal LMs with a gated MLP "
            f"of model_type {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    num_layers = config.num_hidden_layers
    if model_type in CONVERTED_MODEL_TYPES:
        _check_same_ttt(recipe, config)
    else:
        try:
            recipe.ttt.validate(num_layers)
        except ValueError as e:
            raise RecipeError(f"ttt.layers: {e} ({name})" if "layer" in str(e) else f"ttt: {e}") from None
    if recipe.eval is not None:  # the eval section's keys, corpus and lengths (EvalError is a RecipeError)
        from ttt_adapt.evaluate import settings_from_recipe

        settings_from_recipe(recipe, config)
    cp_size = recipe.parallel.cp_size
    if cp_size > 1 and recipe.data.seq_len % (cp_size * recipe.ttt.chunk_size):
        unit = cp_size * recipe.ttt.chunk_size
        raise RecipeError(
            f"data.seq_len: {recipe.data.seq_len} tokens cannot be cut into {cp_size} shards of whole "
            f"{recipe.ttt.chunk_size}-token chunks; use a multiple of {unit} (e.g. {max(unit, recipe.data.seq_len // unit * unit)})"
        )
    if recipe.train.trackers:
        from accelerate.tracking import get_available_trackers

        available = {str(t) for t in get_available_trackers()}
        for tracker in recipe.train.trackers:
            if tracker not in available:
                raise RecipeError(f"train.trackers: {tracker} is not installed (pip install {tracker})")
    latest = latest_checkpoint(recipe.train.output_dir)
    if latest is not None and not recipe.train.resume:
        raise RecipeError(
            f"train.output_dir: {recipe.train.output_dir} already holds a run (latest {latest.name}); "
            "set train.resume=true to continue it, or choose another train.output_dir"
        )
    check_resume(recipe, latest)  # changes a resumed run cannot honour
    try:
        tokenizer = load_tokenizer(recipe)
    except Exception as e:
        raise RecipeError(f"model.name_or_path: cannot load a tokenizer from {name!r}: {first_line(e, None)}") \
            from None
    # transformers builds a tokenizer of special tokens only (one for Qwen, five for Gemma) for a folder without
    # tokenizer files
    if len(tokenizer) < 2 or len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise RecipeError(f"model.name_or_path: {name!r} holds no tokenizer (save one next to the weights)")
    if len(tokenizer) > config.vocab_size:
        raise RecipeError(
            f"model.name_or_path: the tokenizer of {name!r} has {len(tokenizer)} tokens, "
            f"more than the model's vocab_size {config.vocab_size}"
        )
    return Base(config, tokenizer)


def _check_same_ttt(recipe: Recipe, config):
    """A base that is already a TTT model keeps its TTT layout: the recipe's `ttt` section must describe it."""
    have = dict(config.ttt)
    try:
        want = dict(recipe.ttt.to_dict(), layers=recipe.ttt.resolved_layers(config.num_hidden_layers))
    except ValueError as e:
        raise RecipeError(f"ttt.layers: {e} ({recipe.model.name_or_path})") from None
    for key, value in want.items():
        if key != "lr_init" and have.get(key) != value:  # lr_init only matters for fresh TTT parameters
            raise RecipeError(
                f"ttt.{key}: {recipe.model.name_or_path} is already a TTT model with {key}={have.get(key)!r}; "
                f"the recipe says {value!r}"
            )


def check_world(recipe: Recipe, num_processes: int):
    """The process count must split into data-parallel groups of `parallel.cp_size` ranks (RecipeError)."""
    cp_size = recipe.parallel.cp_size
    if num_processes % cp_size:
        raise RecipeError(
            f"parallel.cp_size: {cp_size} does not divide the {num_processes} process(es); launch a multiple of "
            f"{cp_size} (accelerate launch --multi_gpu --num_processes {cp_size} ...; --multi_gpu on CPU-only machines too)"
        )


__all__ = ["Base", "Preflight", "preflight", "base_config", "check_run", "check_world"]
