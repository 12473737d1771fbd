"""`metrics.jsonl`, always valid JSON: one object a line, a non-finite number written as null and named in
the line's `"nonfinite"` list (json.dumps is strict: it can never write NaN or Infinity). The same numbers go
to Accelerate's trackers, finite ones only.
"""

from __future__ import annotations

import json
import math
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
        if not self.path.is_file():
            self.path.write_text("")
            return
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        self.path.write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= after_step))

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


__all__ = ["MetricsFile", "json_safe", "flat"]
