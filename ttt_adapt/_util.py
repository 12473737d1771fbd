"""Small helpers every part of ttt_adapt uses, defined once: the error family, one-line reasons, the peft
unwrap, sizes and dtypes."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")  # the dtypes a recipe, an export or an evaluation may name
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|mb|gb|tb|kib|mib|gib|tib)\s*$", re.IGNORECASE)
SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class RecipeError(ValueError):
    """Bad input: a recipe, override, run folder, checkpoint or export request. The message is one line naming
    the key or path; the scripts print it and exit 2. `CheckpointError`, `ExportError` and `EvalError` are
    RecipeErrors."""


class UsageError(RecipeError):
    """A command-line mistake (unknown option, missing or malformed argument); one line, exit 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the scripts: a mistake raises `UsageError` (one line, the script exits 2) instead of printing
    the usage block and exiting. A parser given a short `usage` names it in the line."""

    def error(self, message):
        hint = f" (usage: {self.usage})" if self.usage else ""
        raise UsageError(f"{message}{hint}")


def first_line(e: BaseException, limit: int | None = 300) -> str:
    """The first line of an exception's message (its type's name when it has none), at most `limit` characters."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line if limit is None else line[:limit]


def unwrap(model):
    """The transformers model inside a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def looks_like_local_path(name: str) -> bool:
    """True if `name` can't be a hub id (`org/name`), so it must be a local path."""
    return (
        Path(name).expanduser().exists()
        or name.startswith(("/", ".", "~"))
        or "\\" in name
        or name.count("/") > 1
    )


def parse_size(size) -> int:
    """`"5GB"`, `"500MB"`, `"2GiB"`, `"1.5GB"` or a byte count -> bytes (GB = 10^9, GiB = 2^30); ValueError
    otherwise."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = SIZE.match(size) if isinstance(size, str) else None
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"expected a size like 80GB or 500MiB, got {size!r}")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])


__all__ = ["DTYPES", "RecipeError", "UsageError", "ArgumentParser", "first_line", "unwrap", "parse_size", "looks_like_local_path"]
