"""The divergence decisions of a training run: what a step with a non-finite loss or gradient norm, or a loss
spike, does to the run.

Such a step updates nothing (a spike under `train.on_spike: warn` excepted). `nonfinite_verdict` and
`spike_verdict` count it among the bad steps in a row (`TrainState`) and decide, from the recipe, whether the run
stops (`Diverged`, exit 3) or skips the step and goes on; the verdict carries the one-line account and the
metrics line. When the run stops, `set_aside` renames the checkpoint whose weights gave the bad loss
(`checkpoint-N.diverged`), so that rerunning resumes from a good one.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ttt_adapt.recipe.sections import TrainConfig
from ttt_adapt.training.checkpoints import STATE_FILE, checkpoint_path

NONFINITE_NAMES = {"loss": "the loss", "grad_norm": "the gradient norm"}
SPIKE_REMEDY = "lower train.lr, set train.clip_grad_norm, or raise train.spike_factor if such losses are expected"


@dataclass
class Verdict:
    """What a bad step does: `stop` the run (`Diverged`), `warn` and keep its update, or else skip its update.

    `what` says what went wrong (one line), `in_a_row` counts the bad steps of its kind in a row, `record` is its
    metrics line (None: none) and `remedy` what the `Diverged` message advises (None: its default)."""

    what: str
    stop: bool = False
    warn: bool = False
    in_a_row: int = 0
    record: dict | None = None
    remedy: str | None = None


def nonfinite_verdict(state, train: TrainConfig, step: int, result) -> Verdict:
    """Step `step` (its `StepResult`) had a non-finite loss or gradient norm: one more in a row in `state` (the
    run's `TrainState`); stop unless `train.on_nonfinite: skip` allows one more skipped step in a row."""
    state.nonfinite_in_a_row += 1
    in_a_row = state.nonfinite_in_a_row
    what = " and ".join(f"{NONFINITE_NAMES[k]} ({getattr(result, k)})" for k in result.nonfinite)
    what += " is not finite" if len(result.nonfinite) == 1 else " are not finite"
    stop = train.on_nonfinite == "stop" or in_a_row > train.max_nonfinite_skips
    record = {"step": step, "loss": result.loss, "grad_norm": result.grad_norm, "skipped": not stop, "diverged": stop}
    if stop and train.on_nonfinite == "skip":
        what += f" ({in_a_row} steps in a row, train.max_nonfinite_skips={train.max_nonfinite_skips})"
    return Verdict(what, stop=stop, in_a_row=in_a_row, record=record)


def spike_verdict(state, train: TrainConfig, step: int, result) -> Verdict:
    """Step `step`'s loss spiked (`result.spike`: its ratio to the median of `state.recent_losses`): stop
    (`train.on_spike: stop`, or `skip` after too many skipped steps in a row), skip its update, or only warn."""
    median = result.loss / result.spike
    what = (f"the loss spiked to {result.loss:.4g}, {result.spike:.2f} x the median {median:.4g} of the last "
            f"{len(state.recent_losses)} steps (train.spike_factor={train.spike_factor:g})")
    if train.on_spike == "warn":
        return Verdict(what, warn=True)
    state.spikes_in_a_row += 1
    in_a_row = state.spikes_in_a_row
    stop = train.on_spike == "stop" or in_a_row > train.max_spike_skips
    record = {"step": step, "loss": result.loss, "grad_norm": result.grad_norm, "spike_ratio": result.spike,
              "skipped": not stop, "diverged": stop}
    if stop and train.on_spike == "skip":
        what += f" ({in_a_row} steps in a row, train.max_spike_skips={train.max_spike_skips})"
    return Verdict(what, stop=stop, in_a_row=in_a_row, record=record, remedy=SPIKE_REMEDY)


def set_aside(accelerator, output_dir: Path, step: int, good: int | None, resumed_step: int) -> Path | None:
    """Step `step` diverged. The weights that gave its loss are those after step `step - 1`: a checkpoint of them
    written this session (`resumed_step` on) and not vouched for by a good step (`good`) is renamed
    `checkpoint-N.diverged`; return its new path (None: nothing set aside). Every process calls it."""
    bad = checkpoint_path(output_dir, step - 1)
    if not (step - 1 >= resumed_step and step - 1 != good and (bad / STATE_FILE).is_file()):
        return None
    aside = bad.with_name(f"{bad.name}.diverged")
    if accelerator.is_main_process:
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(bad, aside)
    accelerator.wait_for_everyone()
    return aside


__all__ = ["Verdict", "nonfinite_verdict", "spike_verdict", "set_aside", "NONFINITE_NAMES"]
