"""Training checkpoints: naming, atomic saving, retention, the latest one, and loading (to resume or to export).

A checkpoint is `<train.output_dir>/checkpoint-N` (N: the optimizer step) holding what `accelerator.save_state`
writes (model weights as `model.safetensors`, optimizer, RNG states), the recipe and `trainer_state.json`. It
is written under a hidden name and renamed into place once complete, so a folder named `checkpoint-N` with a
state file is always whole. Weights and optimizer state are checked finite before saving, so every complete
checkpoint is a good one: retention (`train.keep_last`) can never trade a good checkpoint for a diverged one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_model

from ttt_adapt.compat import disable_activation_checkpointing
from ttt_adapt.config import Recipe, RecipeError
from ttt_adapt.model_setup import build_model
from ttt_adapt.stopping import Diverged, tensors_finite

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
WEIGHTS = "model.safetensors"  # what `accelerator.save_state` writes for the (first) prepared model
ADAPTER_MARKERS = ("lora_", "modules_to_save", "original_module", "base_layer")


class CheckpointError(RecipeError):
    """A checkpoint that cannot be loaded into the recipe's model; one line."""


def checkpoint_path(output_dir, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


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


def save_checkpoint(accelerator, model, optimizer, recipe: Recipe, state: dict) -> Path:
    """Save the training state of step `state["step"]` atomically and keep the last `train.keep_last`.

    All processes call it. Raises `Diverged` (nothing written, nothing deleted) if any weight or optimizer
    state is not finite on any process.
    """
    out = Path(recipe.train.output_dir)
    local_ok = tensors_finite(model.parameters()) and tensors_finite(
        t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    bad = accelerator.reduce(torch.tensor(float(not local_ok), device=accelerator.device), reduction="sum")
    if bad > 0:
        raise Diverged(state["step"], "the weights or optimizer state are not finite", latest_checkpoint(out))
    final = checkpoint_path(out, state["step"])
    tmp = out / f".tmp-{final.name}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(out)[: -recipe.train.keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def read_state(checkpoint: Path) -> dict:
    """The checkpoint's `trainer_state.json` (step, tokens, row cursor, ...)."""
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def load_checkpoint(accelerator, checkpoint: Path) -> dict:
    """Restore the prepared model, optimizer and RNG states from `checkpoint`; return its trainer state."""
    try:
        accelerator.load_state(str(checkpoint))
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(
            f"train.output_dir: {checkpoint} does not match this recipe's model "
            f"({str(e).strip().splitlines()[0][:200]}); use another train.output_dir"
        ) from None
    return read_state(checkpoint)


def load_checkpoint_model(checkpoint: Path, recipe: Recipe):
    """The recipe's model (`build_model`) with the checkpoint's weights loaded strictly, LoRA merged, in eval
    mode: what an export writes. Raises `CheckpointError` (one line) for weights that do not fit or are not
    finite."""
    weights = Path(checkpoint) / WEIGHTS
    if not weights.is_file():
        found = ", ".join(sorted(p.name for p in Path(checkpoint).iterdir())) or "nothing"
        raise CheckpointError(
            f"{checkpoint} holds no {WEIGHTS} (found {found}); sharded FSDP checkpoints must be saved with a "
            "full state dict"
        )
    try:
        model = build_model(recipe)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot rebuild the model from {recipe.model.name_or_path!r}: {_first_line(e)}") from None
    try:
        missing, unexpected = load_model(model, weights, strict=False)  # tied weights are stored once
    except RuntimeError as e:  # shape mismatch
        raise CheckpointError(f"{weights} does not fit the recipe's model: {_first_line(e)}") from None
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


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


__all__ = [
    "CHECKPOINT", "STATE_FILE", "WEIGHTS", "CheckpointError", "checkpoint_path", "list_checkpoints",
    "latest_checkpoint", "save_checkpoint", "read_state", "load_checkpoint", "load_checkpoint_model",
]
