"""Training progress: the window of steps since the last progress line, the lines written (the history), and
`metrics.jsonl`.

`metrics.jsonl` is always valid JSON: one object a line, a non-finite number written as null and named in the
line's `"nonfinite"` list (json.dumps is strict: it can never write NaN or Infinity). The same numbers go to
Accelerate's trackers, finite ones only.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def json_safe(record: dict) -> dict:
    """`record` with non-finite floats (at any depth) replaced by None and their dotted keys in `nonfinite`."""
    bad = []

    def clean(value, key):
        if isinstance(value, float) and not math.isfinite(value):
            bad.append(key)
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{key}.{i}") for i, v in enumerate(value)]
        return value

    out = clean(record, "")
    if bad:
        out["nonfinite"] = bad
    return out


class MetricsFile:
    """Appends lines to `<output_dir>/metrics.jsonl` (main process) and logs them to the trackers."""

    def __init__(self, accelerator, output_dir):
        self.accelerator = accelerator
        self.path = Path(output_dir) / "metrics.jsonl"

    def truncate(self, after_step: int):
        """Keep the lines of steps <= `after_step` (a resumed run redoes the others); main process only."""
        if not self.accelerator.is_main_process:
            return
        lines = [line for line in self.path.read_text().splitlines() if line.strip()] if self.path.is_file() else []
        write_atomically(self.path, "".join(line + "\n" for line in lines if json.loads(line)["step"] <= after_step))

    def write(self, record: dict):
        """One line (flushed at once: a killed run keeps what it logged) and the finite numbers to trackers."""
        safe = json_safe(record)
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(safe, allow_nan=False) + "\n")
        if self.accelerator.trackers:
            values = {k: v for k, v in flat(record, sep="/").items()
                      if k != "step" and not (isinstance(v, float) and not math.isfinite(v))}
            self.accelerator.log(values, step=record["step"])


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` by `text` in one rename: a stop at any moment leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def flat(d: dict, prefix: str = "", sep: str = ".") -> dict:
    """Nested dict -> flat {a.b: value}; lists and None become strings (trackers take scalars only)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flat(v, key, sep))
        else:
            out[key] = str(v) if isinstance(v, (list, tuple)) or v is None else v
    return out


class Window:
    """Sums over the steps since the last progress line; skipped steps count for time and tokens only."""

    def __init__(self):
        self.updates, self.loss, self.labelled, self.tokens, self.seconds, self.grad_norm = 0, 0.0, 0.0, 0.0, 0.0, None

    def add(self, result):
        """Add one step's `StepResult` (`ttt_adapt.training.loop`)."""
        self.tokens += result.tokens
        self.seconds += result.seconds
        if result.updated:
            self.updates += 1
            self.loss += result.loss * result.labelled
            self.labelled += result.labelled
            self.grad_norm = result.grad_norm

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


class Progress:
    """The metrics file, the current `Window` and the progress lines written so far (`history`)."""

    def __init__(self, metrics: MetricsFile):
        self.metrics, self.window, self.history = metrics, Window(), []

    def add(self, result):
        self.window.add(result)

    def write_line(self, step: int, tokens: int, lr: float, ttt_param_lr: float, ttt_learning_rates) -> None:
        """Write the progress line of the window's steps (at `step`) unless none of them updated the model, and
        start a fresh window. `ttt_learning_rates`: a callable giving {layer: learned TTT learning rate}."""
        w = self.window
        if w.updates:
            record = {
                "step": step,
                "loss": w.loss / max(w.labelled, 1.0),
                "lr": lr,
                "ttt_param_lr": ttt_param_lr,
                "tokens": tokens,
                "tokens_per_s": w.tokens_per_s,
                "grad_norm": w.grad_norm,
                "ttt_learning_rates": {str(k): v for k, v in ttt_learning_rates().items()},
            }
            self.metrics.write(record)
            self.history.append(record)
        self.window = Window()


__all__ = ["MetricsFile", "Progress", "Window", "json_safe", "flat", "write_atomically"]
