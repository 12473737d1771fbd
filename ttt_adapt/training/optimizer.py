"""The optimizer of a training run: AdamW parameter groups and the learning-rate schedule.

The TTT parameters and the rest get separate learning rates (`train.ttt_lr`, `train.lr`); matrices are decayed,
vectors and scalars not. The rates warm up linearly, then follow a cosine down to `train.min_lr_ratio`.
"""

from __future__ import annotations

import math

from ttt_adapt.model_setup import is_ttt_param
from ttt_adapt.recipe.sections import Recipe

ADAM_BETAS = (0.9, 0.95)  # the usual choice for LM pretraining; torch's default 0.999 adapts too slowly


def param_groups(model, recipe: Recipe) -> list[dict]:
    """AdamW groups: TTT vs the rest (separate learning rates), matrices decayed, vectors/scalars not."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = "ttt" if is_ttt_param(name) else "base"
        key = f"{kind}{'' if p.ndim >= 2 else '_no_decay'}"
        if key not in groups:
            groups[key] = {"params": [], "name": key, **group_settings(key, recipe)}
        groups[key]["params"].append(p)
    return list(groups.values())


def group_settings(name: str, recipe: Recipe) -> dict:
    """The recipe's learning rate (`lr` = `base_lr`, the schedule's 1) and weight decay of the group `name`."""
    t = recipe.train
    lr = (t.ttt_lr if t.ttt_lr is not None else t.lr) if name.startswith("ttt") else t.lr
    return {"lr": lr, "base_lr": lr, "weight_decay": 0.0 if name.endswith("_no_decay") else t.weight_decay}


def apply_recipe_to_optimizer(optimizer, recipe: Recipe) -> None:
    """Give every group the recipe's settings: a restored optimizer state brings back the ones it was saved with."""
    for group in optimizer.param_groups:
        group.update(group_settings(group["name"], recipe))


def applied_lrs(optimizer) -> dict:
    """{group name: the learning rate the last `optimizer.step()` used}."""
    return {g["name"]: g["lr"] for g in optimizer.param_groups}


def lr_factor(step: int, recipe: Recipe) -> float:
    """Multiplier of the learning rates at optimizer step `step` (from 1): linear warmup to 1 over the warmup
    steps, then a cosine that would reach `min_lr_ratio` one step after `max_steps` (so no step is wasted at 0)."""
    t = recipe.train
    warmup = t.resolved_warmup_steps
    if step <= warmup:
        return step / warmup
    progress = min(1.0, (step - warmup - 1) / max(1, t.max_steps - warmup))
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


__all__ = ["ADAM_BETAS", "param_groups", "group_settings", "apply_recipe_to_optimizer", "applied_lrs", "lr_factor"]
