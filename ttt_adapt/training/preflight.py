"""The checks a run needs before any work: the files, the base model, the launch and the run folder, in one place.

`ttt_adapt.recipe` checks a recipe's keys, types and values without reading anything; what needs the file
system, the base model's config and tokenizer or the launch (process count, FSDP request, mixed precision) is
checked here. `preflight(recipe, accelerator)` runs them all (on every process, before anything is built or
written) and returns what they loaded (`Preflight`: the base config, the tokenizer, the FSDP request), so
nothing is loaded twice. Every failure is a `RecipeError` whose message is one line naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
from transformers import AutoConfig

from ttt_adapt._util import RecipeError, first_line, looks_like_local_path
from ttt_adapt.data.chat import check_chat_template
from ttt_adapt.distributed.context_parallel import check_cp_size
from ttt_adapt.distributed.fsdp import FSDPRequest, fsdp_request
from ttt_adapt.model_setup import is_converted, recipe_tokenizer
from ttt_adapt.modeling import FAMILIES
from ttt_adapt.recipe.sections import EvalError, Recipe
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
    check_attention(recipe, accelerator.device.type)
    fsdp = fsdp_request(recipe)
    if fsdp is not None:
        check_fsdp_run(fsdp, accelerator.mixed_precision)
    return Preflight(base.config, base.tokenizer, fsdp)


def check_run(recipe: Recipe) -> Base:
    """Everything about the recipe that needs the files, the base model or the run folder (RecipeError, one
    line). Returns the base config and tokenizer, loaded once here."""
    check_files(recipe)
    config = base_config(recipe)
    check_base(recipe, config)
    if recipe.eval is not None:
        check_eval(recipe, config)
    check_rows(recipe)
    check_trackers(recipe)
    check_run_folder(recipe)
    return Base(config, checked_tokenizer(recipe, config))


def check_files(recipe: Recipe, outputs: bool = True) -> None:
    """The local files and folders the recipe names are what it says: the model folder, the data files, and
    (`outputs`: for a run that writes them) the run and export folders (the eval corpus: `check_eval`)."""
    name = recipe.model.name_or_path
    if looks_like_local_path(name) and not Path(name).expanduser().is_dir():
        raise RecipeError(f"model.name_or_path: no such folder: {name}")
    recipe.data.check_files()
    if not outputs:
        return
    out = Path(recipe.train.output_dir)
    if out.exists() and not out.is_dir():
        raise RecipeError(f"train.output_dir: is a file, not a folder: {recipe.train.output_dir}")
    e = recipe.export
    if e.dir is not None:
        out = Path(e.dir)
        if out.exists() and not out.is_dir():
            raise RecipeError(f"export.dir: is a file, not a folder: {e.dir}")
        if out.is_dir() and any(out.iterdir()) and not e.overwrite:
            raise RecipeError(f"export.dir: {e.dir} exists and is not empty (set export.overwrite=true to replace it)")


def base_config(recipe: Recipe):
    """The config of `model.name_or_path` (RecipeError, one line, when there is none)."""
    name = recipe.model.name_or_path
    try:
        return AutoConfig.from_pretrained(name)
    except Exception as e:  # OSError, ValueError, hub errors: all mean "not a loadable model" here
        raise RecipeError(f"model.name_or_path: cannot load a model config from {name!r}: {first_line(e, None)}") \
            from None


def check_base(recipe: Recipe, config) -> None:
    """The base is a family `convert` takes (or a TTT model of the recipe's layout) and the recipe's TTT layers
    exist in it."""
    name = recipe.model.name_or_path
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES and not is_converted(model_type):
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        what = f"a multimodal {model_type!r} model" if text is not config else f"a {model_type!r} model"
        raise RecipeError(
            f"model.name_or_path: {name!r} is {what}; In-Place TTT converts text-only causal LMs with a gated MLP "
            f"of model_type {', '.join(FAMILIES)}"
        )
    num_layers = config.num_hidden_layers
    outside = [i for i in recipe.ttt.layers or [] if i >= num_layers]
    if outside:
        raise RecipeError(f"ttt.layers: layer {outside[0]} is out of range: {name} has {num_layers} layers "
                          f"(0..{num_layers - 1})")
    if is_converted(model_type):  # a TTT model keeps its layout: the recipe must describe it
        have = dict(config.ttt)
        want = dict(recipe.ttt.to_dict(), layers=recipe.ttt.resolved_layers(num_layers))
        for key, value in want.items():
            if key != "lr_init" and have.get(key) != value:  # lr_init only matters for fresh TTT parameters
                raise RecipeError(f"ttt.{key}: {name} is already a TTT model with {key}={have.get(key)!r}; "
                                  f"the recipe says {value!r}")


def check_eval(recipe: Recipe, config) -> None:
    """The eval section's corpus exists, its recall file (if any) reads, and its lengths fit the base model's
    positions (EvalError)."""
    from ttt_adapt.eval.recall import read_recall_file
    from ttt_adapt.eval.settings import check_lengths

    if recipe.eval.corpus is None:
        raise EvalError("eval.corpus: not set, and the recipe has no data.eval_path to default to")
    if not Path(recipe.eval.corpus).is_file():
        raise EvalError(f"eval.corpus: no such file: {recipe.eval.corpus}")
    if recipe.eval.recall_file is not None:
        read_recall_file(recipe.eval.recall_file)  # before training: a bad file fails in one line, not at the end
    check_lengths(recipe.eval, config, recipe.model.name_or_path)


def check_rows(recipe: Recipe) -> None:
    """With context parallelism each row must split into `cp_size` shards of whole TTT chunks."""
    cp_size, chunk, seq_len = recipe.parallel.cp_size, recipe.ttt.chunk_size, recipe.data.seq_len
    unit = cp_size * chunk
    if cp_size > 1 and seq_len % unit:
        raise RecipeError(
            f"data.seq_len: {seq_len} tokens cannot be cut into {cp_size} shards of whole {chunk}-token chunks; "
            f"use a multiple of {unit} (e.g. {max(unit, seq_len // unit * unit)})"
        )


def check_trackers(recipe: Recipe) -> None:
    if recipe.train.trackers:
        from accelerate.tracking import get_available_trackers

        available = {str(t) for t in get_available_trackers()}
        for tracker in recipe.train.trackers:
            if tracker not in available:
                raise RecipeError(f"train.trackers: {tracker} is not installed (pip install {tracker})")


def check_run_folder(recipe: Recipe) -> None:
    """A run folder that already holds a run is resumed, or refused without `train.resume`."""
    latest = latest_checkpoint(recipe.train.output_dir)
    if latest is not None and not recipe.train.resume:
        raise RecipeError(
            f"train.output_dir: {recipe.train.output_dir} already holds a run (latest {latest.name}); "
            "set train.resume=true to continue it, or choose another train.output_dir"
        )
    check_resume(recipe, latest)  # changes a resumed run cannot honour


def checked_tokenizer(recipe: Recipe, config):
    """The base model's tokenizer (`model_setup.recipe_tokenizer`), checked to be a real one that fits the model."""
    name = recipe.model.name_or_path
    try:
        tokenizer = recipe_tokenizer(recipe)
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
    if recipe.data.uses_chat():  # conversations need a template that marks the assistant's tokens
        try:
            check_chat_template(tokenizer, recipe.data.chat_template_kwargs, repr(name))
        except ValueError as e:
            raise RecipeError(str(e)) from None
    return tokenizer


def check_world(recipe: Recipe, num_processes: int) -> None:
    """The process count must split into data-parallel groups of `parallel.cp_size` ranks (RecipeError)."""
    check_cp_size(recipe.parallel.cp_size, num_processes)


def check_attention(recipe: Recipe, device_type: str) -> None:
    """The recipe's attention backend can train on this device: torch has no flex attention backward on CPU
    (RecipeError, one line, instead of torch's error at the first backward)."""
    if recipe.model.attn_implementation == "flex_attention" and device_type == "cpu" and recipe.parallel.cp_size == 1:
        raise RecipeError("model.attn_implementation: flex_attention cannot train on CPU (torch has no flex attention "
                          "backward there); use sdpa (packed rows then run as ttt_packed) or train on a GPU")


def check_fsdp_run(request: FSDPRequest, mixed_precision: str) -> None:
    """Refuse (RecipeError, one line) an FSDP run that would not shard or could not be exact."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world < 2:
        raise RecipeError(
            f"FSDP ({request.source}) shards the weights over several processes, and this run has 1: launch several "
            "(accelerate launch --multi_gpu --num_processes N ...; --multi_gpu on CPU-only machines too), or drop "
            "the FSDP request"
        )
    if mixed_precision == "fp16":
        raise RecipeError("train.mixed_precision: fp16 is not supported with FSDP (no sharded gradient scaler): "
                          "use bf16")


__all__ = ["Base", "Preflight", "preflight", "check_run", "check_files", "base_config", "check_base", "check_eval",
           "check_world", "check_attention", "check_fsdp_run"]
