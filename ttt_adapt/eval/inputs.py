"""Held-out documents, models and tokenizers for an evaluation, loaded with one-line `EvalError`s."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ttt_adapt._util import first_line, looks_like_local_path, unwrap
from ttt_adapt.eval.settings import EvalError


def read_corpus(path, text_field: str = "text", max_docs: int | None = None) -> list[str]:
    """The documents of a .jsonl (one JSON object a line) or .txt (one document) file; EvalError if none."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"no such corpus file: {path}")
    if path.suffix == ".txt":
        docs = [path.read_text()]
    elif path.suffix in (".jsonl", ".json"):
        docs = []
        with open(path) as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    docs.append(json.loads(line)[text_field])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise EvalError(f"{path}:{i}: not a JSON object with a {text_field!r} field") from None
    else:
        raise EvalError(f"{path}: the corpus must be a .jsonl file ({{\"{text_field}\": ...}} a line) or a .txt file")
    docs = [d for d in docs if isinstance(d, str) and d.strip()]
    if not docs:
        raise EvalError(f"{path}: the corpus holds no documents")
    return docs[:max_docs]


def load_model(name_or_path, dtype: str = "float32", device=None):
    """A causal LM in eval mode (a TTT export loads through ttt_adapt's registered Auto classes); one-line errors."""
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, name_or_path, "a model", dtype=getattr(torch, dtype))
    return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()


def model_config(model_or_path):
    """The config of a loaded model (peft unwrapped) or of a model folder / hub id; one-line errors."""
    if not isinstance(model_or_path, (str, Path)):
        return unwrap(model_or_path).config
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, model_or_path, "a model config")


def load_tokenizer(name_or_path):
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, name_or_path, "a tokenizer")


def _from_pretrained(auto_class, name_or_path, what: str, **kwargs):
    """`auto_class.from_pretrained` with one-line errors for a missing folder or an unloadable one."""
    name = str(name_or_path)
    if looks_like_local_path(name) and not Path(name).is_dir():
        raise EvalError(f"no such model folder: {name}")
    try:
        return auto_class.from_pretrained(name, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise EvalError(f"cannot load {what} from {name}: {first_line(e, None)}") from None


def describe(model) -> str:
    return str(model) if isinstance(model, (str, Path)) else f"{type(unwrap(model)).__name__} (in memory)"

