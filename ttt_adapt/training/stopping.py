"""How a training run stops early, cleanly: divergence (non-finite numbers) and preemption (signals).

`train()` raises `Diverged` when a step's loss or gradient norm is not finite (`train.on_nonfinite: stop`, or
`skip` after too many skipped steps in a row), when its loss spikes above `train.spike_factor` times the median
of the recent steps (`train.on_spike`), or when weights about to be saved are not finite, and
`Preempted` after a stop signal, once the step in flight is finished and checkpointed. Each carries the
exit status `scripts/adapt.py` returns, so a job script can tell "rerun me" from "fix me". Outside the training
steps (`StopAtOnce`: set-up, the final evaluation and export) a stop signal raises `Interrupted` at once, with
nothing half-written: rerunning the same command resumes (after training: evaluates and exports only).
"""

from __future__ import annotations

import signal
import statistics
import threading
from pathlib import Path

import torch

EXIT_DIVERGED = 3  # 2 is bad input
EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: "try again later"; rerunning the same command resumes


class TrainingStopped(Exception):
    """Training ended before `train.max_steps`; `exit_code` says why, the message (one line) what to do."""

    exit_code = 1


class Diverged(TrainingStopped):
    """A non-finite loss, gradient norm or weight, or a loss spike, at `step`; `last_good` is the newest checkpoint
    left to resume from (or None); `set_aside` the checkpoint whose weights gave the bad step, renamed so that
    rerunning does not resume from it (or None)."""

    exit_code = EXIT_DIVERGED

    def __init__(self, step: int, what: str, last_good: Path | None, set_aside: Path | None = None,
                 remedy: str = "lower train.lr or set train.clip_grad_norm"):
        self.step, self.what, self.last_good, self.set_aside = step, what, last_good, set_aside
        aside = f"; its weights came from a checkpoint now set aside as {set_aside}" if set_aside else ""
        if last_good:
            where = f"the last good checkpoint is {last_good} ({remedy}, then rerun to resume from it)"
        else:
            where = f"no good checkpoint was written before it ({remedy}, then rerun to start over)"
        super().__init__(f"training diverged at step {step}: {what}{aside}; {where}")


class Preempted(TrainingStopped):
    """A stop signal arrived; the run stopped after `step`, saved in `checkpoint`."""

    exit_code = EXIT_PREEMPTED

    def __init__(self, step: int, signal_name: str, checkpoint: Path):
        self.step, self.signal_name, self.checkpoint = step, signal_name, checkpoint
        super().__init__(f"stopped by {signal_name} after step {step}, saved in {checkpoint}; "
                         "rerun the same command to resume")


class Interrupted(BaseException):
    """A stop signal outside the training steps (set-up, final evaluation, export) stops at once; the message (one
    line) says what is left and that rerunning the same command continues. A BaseException, like
    KeyboardInterrupt: no `except Exception` on the way may swallow it."""

    exit_code = EXIT_PREEMPTED


def spike_ratio(loss: float, recent: list[float], warmup: int) -> float | None:
    """`loss` over the median of the `recent` step losses; None while fewer than `warmup` are known."""
    if len(recent) < warmup:
        return None
    median = statistics.median(recent)
    return loss / median if median > 0 else None


def tensors_finite(tensors) -> bool:
    """True if every floating-point tensor in `tensors` is finite (one fused check per tensor, no copies)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors if torch.is_floating_point(t) and t.numel())


class StopSignals:
    """While active, the signals named (`SIGTERM`, ...) only set `received` instead of stopping the process.

    The loop reads `received` once per step and all processes agree on it before acting. A second signal
    changes nothing (launchers such as torchrun forward the one they get, so workers often see two): send
    SIGKILL to stop at once. The previous handlers come back on exit. Outside the main thread Python cannot
    install handlers, and signals keep their usual effect.
    """

    def __init__(self, names):
        self.signals = [signal.Signals[name] for name in names]
        self.received: str | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        self._previous = {}
        return False


class StopAtOnce(StopSignals):
    """While active, the signals named raise `Interrupted` where the program is (its `during` text describes
    the phase: `"during set-up: ..."`). The training loop's `StopSignals` take precedence inside it, and the
    previous handlers come back on exit. Outside the main thread signals keep their usual effect."""

    def __init__(self, names, during: str = ""):
        super().__init__(names)
        self.during = during

    def _handle(self, signum, frame):
        raise Interrupted(f"stopped by {signal.Signals(signum).name} {self.during}")


__all__ = ["TrainingStopped", "Diverged", "Interrupted", "StopAtOnce", "spike_ratio", "Preempted", "StopSignals", "EXIT_DIVERGED", "EXIT_PREEMPTED",
           "tensors_finite"]
