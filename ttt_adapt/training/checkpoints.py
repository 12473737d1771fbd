"""Training checkpoints: naming, atomic saving, retention, the latest one, and loading (to resume or to export).

A checkpoint is `<train.output_dir>/checkpoint-N` (N: the optimizer step) holding what `accelerator.save_state`
writes (model weights as `model.safetensors`, optimizer, RNG states), the recipe and `trainer_state.json`. It
is written under a hidden name and renamed into place once complete, so a folder named `checkpoint-N` with a
state file is always whole. Weights and optimizer state are checked finite before saving, so every complete
checkpoint is a good one: retention (`train.keep_last`) can never trade a good checkpoint for a diverged one.

A sharded (FSDP) model is saved sharded instead: `sharded/` holds model and optimizer state as a torch
distributed checkpoint (each process writes its shards, nothing is gathered), next to each process's RNG
states. It loads into any number of processes, sharded or not (the shards are redistributed by name), and
`load_checkpoint_model` reads it on one process for the export, so no setting says which kind a checkpoint is.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from safetensors.torch import load_model

from ttt_adapt._util import RecipeError, first_line
from ttt_adapt.compat import disable_activation_checkpointing
from ttt_adapt.distributed.fsdp import is_sharded, local
from ttt_adapt.model_setup import build_model
from ttt_adapt.recipe.sections import Recipe
from ttt_adapt.training.stopping import Diverged, tensors_finite

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
WEIGHTS = "model.safetensors"  # what `accelerator.save_state` writes for the (first) prepared model
SHARDED = "sharded"  # the distributed checkpoint of a sharded model: {"model": ..., "optimizer": ...}
RNG_STATES = "rng_state_{rank}.pkl"  # next to SHARDED: one per process, like accelerate's random_states_N.pkl
ADAPTER_MARKERS = ("lora_", "modules_to_save", "original_module", "base_layer")


class CheckpointError(RecipeError):
    """A checkpoint that cannot be loaded into the recipe's model; one line."""


def checkpoint_path(output_dir, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def checkpoint_step(checkpoint: Path) -> int:
    return int(CHECKPOINT.match(Path(checkpoint).name).group(1))


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints (`checkpoint-N` holding a trainer state) in `output_dir`, oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def latest_checkpoint(output_dir) -> Path | None:
    """The newest complete (hence good: finite) checkpoint folder in `output_dir`, or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(accelerator, model, optimizer, recipe: Recipe, state: dict, keep: tuple = ()) -> Path:
    """Save the training state of step `state["step"]` atomically and keep the last `train.keep_last`, and the
    checkpoints of the steps in `keep` (the newest good one, the best one).

    All processes call it. Raises `Diverged` (nothing written, nothing deleted) if any weight or optimizer
    state is not finite on any process.
    """
    out = Path(recipe.train.output_dir)
    local_ok = tensors_finite(local(p) for p in model.parameters()) and tensors_finite(
        local(t) for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    bad = accelerator.reduce(torch.tensor(float(not local_ok), device=accelerator.device), reduction="sum")
    if bad > 0:
        raise Diverged(state["step"], "the weights or optimizer state are not finite", latest_checkpoint(out))
    final = checkpoint_path(out, state["step"])
    tmp = out / f".tmp-{final.name}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    if is_sharded(model):
        save_sharded(tmp, model, optimizer)
    else:
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(out)[: -recipe.train.keep_last]:
            if checkpoint_step(old) not in keep:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def read_state(checkpoint: Path) -> dict:
    """The checkpoint's `trainer_state.json` (step, tokens, row cursor, ...)."""
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def save_sharded(folder: Path, model, optimizer) -> None:
    """Every process writes its shards of the model and optimizer state (DCP) and its RNG states to `folder`."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder / SHARDED))
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    with open(folder / RNG_STATES.format(rank=dist.get_rank()), "wb") as f:
        pickle.dump(rng, f)


def load_sharded(folder: Path, model, optimizer) -> None:
    """Load a `save_sharded` checkpoint into `model` and `optimizer`, sharded or not, on any number of processes;
    restore this process's RNG states if the checkpoint has them (a process count that changed has fewer)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(folder / SHARDED), no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    rng_file = folder / RNG_STATES.format(rank=dist.get_rank() if dist.is_initialized() else 0)
    if rng_file.is_file():
        with open(rng_file, "rb") as f:
            rng = pickle.load(f)  # written by this code, next to the weights we trust anyway
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


def load_checkpoint(accelerator, checkpoint: Path, model=None, optimizer=None) -> dict:
    """Restore the model, optimizer and RNG states from `checkpoint`; return its trainer state.

    A sharded checkpoint loads into the given `model` and `optimizer` (sharded or not, any process count);
    one written by `accelerator.save_state` into the prepared ones, and not into a sharded model."""
    checkpoint = Path(checkpoint)
    sharded = (checkpoint / SHARDED).is_dir()
    if not sharded and model is not None and is_sharded(model):
        raise CheckpointError(
            f"train.output_dir: {checkpoint} was saved without FSDP and cannot be resumed sharded; resume it "
            "without FSDP (parallel.fsdp=false, no --use_fsdp) or choose another train.output_dir"
        )
    try:
        if sharded:
            load_sharded(checkpoint, accelerator.unwrap_model(model), getattr(optimizer, "optimizer", optimizer))
        else:
            accelerator.load_state(str(checkpoint))
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(
            f"train.output_dir: {checkpoint} does not match this recipe's model "
            f"({first_line(e, 200)}); use another train.output_dir"
        ) from None
    return read_state(checkpoint)


def load_checkpoint_model(checkpoint: Path, recipe: Recipe):
    """The recipe's model (`build_model`) with the checkpoint's weights loaded strictly, LoRA merged, in eval
    mode: what an export writes. Raises `CheckpointError` (one line) for weights that do not fit or are not
    finite."""
    weights, sharded = Path(checkpoint) / WEIGHTS, Path(checkpoint) / SHARDED
    if not weights.is_file() and not sharded.is_dir():
        found = ", ".join(sorted(p.name for p in Path(checkpoint).iterdir())) or "nothing"
        raise CheckpointError(f"{checkpoint} holds no {WEIGHTS} and no {SHARDED}/ (found {found})")
    try:
        model = build_model(recipe)
    except (OSError, ValueError) as e:
        name = recipe.model.name_or_path
        raise CheckpointError(f"cannot rebuild the model from {name!r}: {first_line(e)}") from None
    if sharded.is_dir():
        weights = sharded
        missing, unexpected = _load_sharded_weights(model, sharded)
    else:
        try:
            missing, unexpected = load_model(model, weights, strict=False)  # tied weights are stored once
        except RuntimeError as e:  # shape mismatch
            raise CheckpointError(f"{weights} does not fit the recipe's model: {first_line(e)}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not fit the recipe's model: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    if not tensors_finite(model.parameters()):  # written before saves were checked, or edited by hand
        raise CheckpointError(f"{weights} holds non-finite weights (the run diverged): choose an earlier checkpoint")
    if hasattr(model, "merge_and_unload"):  # peft: fold LoRA in, keep the trained copy of modules_to_save
        model = model.merge_and_unload()
    leftover = [n for n, _ in model.named_parameters() if any(m in n for m in ADAPTER_MARKERS)]
    if leftover:
        raise RuntimeError(f"adapter parameters left after merging: {leftover[:3]}")
    disable_activation_checkpointing(model)
    return model.eval()


def _load_sharded_weights(model, folder: Path) -> tuple[list, list]:
    """Read the model part of a distributed checkpoint into the unsharded `model`, in this process alone;
    return (missing, unexpected) names."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = get_model_state_dict(model)
    try:
        stored = {k[len("model."):] for k in dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
                  if k.startswith("model.")}
    except (OSError, ValueError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"cannot read the distributed checkpoint {folder}: {first_line(e)}") from None
    missing, unexpected = sorted(set(state) - stored), sorted(stored - set(state))
    if missing or unexpected:
        return missing, unexpected
    try:
        wrapped = {"model": state}
        dcp.load(wrapped, checkpoint_id=str(folder), no_dist=True)
    except (RuntimeError, ValueError) as e:  # e.g. a shape mismatch
        raise CheckpointError(f"{folder} does not fit the recipe's model: {first_line(e)}") from None
    set_model_state_dict(model, wrapped["model"])
    return [], []


__all__ = [
    "CHECKPOINT", "STATE_FILE", "WEIGHTS", "SHARDED", "CheckpointError", "checkpoint_path", "checkpoint_step",
    "list_checkpoints",
    "latest_checkpoint", "save_checkpoint", "read_state", "load_checkpoint", "load_checkpoint_model",
]
