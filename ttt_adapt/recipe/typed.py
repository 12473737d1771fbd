"""The typed loading the recipe (`ttt_adapt.recipe.sections`, `.loading`) is built on: YAML in, typed dataclasses out.

`read_recipe_file` reads a recipe's YAML mapping, `apply_override` applies one dotted `key=value` override to
it (the value parsed as YAML), and `build_dataclass` turns a mapping into a dataclass, checking every key
against the fields (an unknown one gets the closest known name as a hint) and every value against the field's
annotation (`int`, `float`, `bool`, `str`, `list[...]`, `X | None`, nested dataclasses). Anything wrong raises
`RecipeError`, whose message is one line `dotted.key: what is wrong`.

YAML 1.1 reads the bare words yes/no/on/off/true/false as booleans, in files and in overrides alike: a key with a
fixed set of words (`choices`, e.g. `train.mixed_precision: no`, `ttt.state_norm_guard=off`) gets back the one of
its words that YAML read as that boolean; any other string key is told to quote it.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path

import yaml

from ttt_adapt._util import RecipeError


def read_recipe_file(path: str, sections) -> dict:
    """The YAML mapping in recipe file `path` ({} for an empty file); a one-line `RecipeError` if the file is
    missing, unreadable, broken YAML or not a mapping (of the recipe's `sections`)."""
    if not Path(path).is_file():
        raise RecipeError(f"no such recipe file: {path}")
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{path}: broken YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: cannot read: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections ({', '.join(sorted(sections))})")
    return raw


def apply_override(raw: dict, item: str) -> None:
    """Apply one `dotted.key=value` override to the raw recipe dict; the value is parsed as YAML."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {item!r}: expected dotted.key=value (e.g. train.max_steps=3)")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise RecipeError(f"override {item!r}: the value is not valid YAML") from None
    *parents, leaf = key.split(".")
    node = raw
    for depth, part in enumerate(parents):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"override {item!r}: {'.'.join(parents[: depth + 1])} is not a section")
        node = child
    node[leaf] = value


def unknown_key_message(key: str, name: str, known) -> str:
    """`key: unknown key`, with the closest of the `known` names to `name` as a hint."""
    close = difflib.get_close_matches(name, sorted(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{key}: unknown key{hint}"


def build_dataclass(cls, raw, key: str, choices: dict | None = None):
    """Build dataclass `cls` from mapping `raw`, checking unknown keys, missing keys and types. `choices`: the
    words of the string keys that take a fixed set (dotted keys, list indices left out: `data.mix.format`)."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{key}: must be a mapping of settings, got {describe(raw)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in raw:
        if name not in known:
            raise RecipeError(unknown_key_message(f"{key}.{name}", str(name), known))
    kwargs = {}
    for name, f in known.items():
        if name in raw:
            kwargs[name] = coerce(raw[name], hints[name], f"{key}.{name}", choices)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{key}.{name}: missing (required)")
    return cls(**kwargs)


def coerce(value, annotation, key: str, choices: dict | None = None):
    """Check `value` against a type annotation; return it (ints widened to float, nested dataclasses built, a YAML
    boolean read back as the word of `choices` it stands for)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return coerce(value, inner[0], key, choices)
        for a in inner:
            try:
                return coerce(value, a, key, choices)
            except RecipeError:
                pass
        raise RecipeError(f"{key}: expected {type_name(annotation)}, got {describe(value)}")
    if dataclasses.is_dataclass(annotation):
        return build_dataclass(annotation, value, key, choices)
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{key}: expected {type_name(annotation)}, got {describe(value)}")
        return [coerce(v, args[0], f"{key}[{i}]", choices) for i, v in enumerate(value)]
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping, got {describe(value)}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{key}: expected true or false, got {describe(value)}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{key}: expected an integer, got {describe(value)}")
        return value
    if annotation is float:
        # YAML 1.1 reads `5e-6` (no dot) as a string; accept it as the number it plainly is.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{key}: expected a number, got {describe(value)}")
        if value != value or value in (float("inf"), float("-inf")):
            raise RecipeError(f"{key}: expected a finite number, got {value}")
        return float(value)
    if annotation is str:
        if isinstance(value, bool):
            value = yaml_word(value, (choices or {}).get(re.sub(r"\[\d+\]", "", key)), key)
        if not isinstance(value, str):
            raise RecipeError(f"{key}: expected a string, got {describe(value)}")
        return value
    if annotation is typing.Any:
        return value
    raise TypeError(f"{key}: unsupported annotation {annotation!r} in the recipe schema")


def yaml_word(value: bool, words, key: str) -> str:
    """The one of `words` that YAML reads as `value` (`no` of no/bf16/fp16 for false). RecipeError (one line) when
    none is, or when the key takes any string (`words` None: which word was written cannot be told)."""
    if words is None:
        raise RecipeError(f"{key}: expected a string, got {describe(value)} (YAML reads a bare yes/no/on/off/true/"
                          "false as a boolean: quote the word)")
    for word in words:
        if yaml.safe_load(word) is value:
            return word
    raise RecipeError(f"{key}: must be one of {', '.join(map(str, words))}; got {describe(value)}")


def type_name(annotation) -> str:
    """How an error names the type a key expects (`an integer`, `a list of strings`, `a string or null`)."""
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}
    plural = {bool: "booleans", int: "integers", float: "numbers", str: "strings", dict: "mappings"}
    if annotation in names:
        return names[annotation]
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is list:
        return f"a list of {plural.get(args[0], type_name(args[0]))}"
    if args:
        inner = " or ".join(type_name(a) for a in args if a is not type(None))
        return inner + (" or null" if type(None) in args else "")
    return getattr(annotation, "__name__", str(annotation))


def describe(value) -> str:
    """How an error names the value it got (`string 'abc'`, `null`), at most 80 characters."""
    if value is None:
        return "null"
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "mapping"}
    return f"{kind.get(type(value), type(value).__name__)} {value!r}"[:80]


__all__ = ["read_recipe_file", "apply_override", "build_dataclass", "coerce", "yaml_word", "unknown_key_message",
           "type_name", "describe"]
