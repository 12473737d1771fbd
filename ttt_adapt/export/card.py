"""The exported folder's model card (README.md): Hub metadata, TTT settings, training summary, evaluation table,
the modeling-code note (kept current by `ttt_adapt.export.folder.refresh_code`), usage."""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml
from huggingface_hub import hf_hub_download, metadata_load

from ttt_adapt._util import looks_like_local_path
from ttt_adapt.eval.report import markdown_table
from ttt_adapt.modeling.configuration_ttt import TESTED_TRANSFORMERS

CODE_NOTE = re.compile(r"<!-- ttt-adapt:code -->.*?<!-- /ttt-adapt:code -->\n?", re.DOTALL)


def render_model_card(config, recipe, state: dict, checkpoint: Path, *, report=None, license="other",
                      repo_id=None, revision=None, best: bool = False, chat: bool = False) -> str:
    """The README.md: Hub metadata, TTT settings, training summary, evaluation table, usage (`chat`: a chat
    example through `pipeline("text-generation")`, for a tokenizer with a chat template)."""
    base = recipe.model.name_or_path
    family = config.model_type.removeprefix("ttt_")
    metadata = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "license": license,
        "tags": ["in-place-ttt", "test-time-training", "long-context", "ttt-adapt", family, "custom_code"],
    }
    if not looks_like_local_path(base):  # the Hub only links Hub ids
        metadata.update(base_model=base, base_model_relation="finetune")
    name = repo_id.split("/")[-1] if repo_id else Path(checkpoint).parent.name
    shown_base = base if not looks_like_local_path(base) else f"a local checkpoint ({Path(base).name})"
    t = recipe.train
    trained = {"ttt": "TTT parameters", "instruct": "TTT parameters + the TTT layers' down_proj (instruct)",
               "full": "every parameter"}[t.trainable] + (f" + LoRA r={t.lora.r} (merged)" if t.lora.r else "")
    parts = [
        f"---\n{yaml.safe_dump(metadata, sort_keys=False)}---\n",
        f"# {name}\n",
        f"In-Place Test-Time Training version of {shown_base}, made with ttt-adapt: the MLPs of layers "
        f"{config.ttt['layers']} update their `down_proj` as fast weights, chunk by chunk, while reading "
        "a sequence, so the model keeps adapting to long contexts at inference time.\n",
        "## TTT settings\n",
        _table(["setting", "value"], [[k, _fmt(v)] for k, v in config.ttt.items()]),
        "## Training\n",
        _table(["", ""], [
            ["base model", shown_base],
            ["steps", _fmt(state.get("step"))],
            ["tokens", f"{state['tokens']:,}" if isinstance(state.get("tokens"), int) else "?"],
            ["trained", trained],
            ["sequence length", _fmt(recipe.data.seq_len)],
            ["rows per step", f"{t.batch_size} x {t.grad_accum} (x data-parallel processes)"],
            ["learning rate", f"{_fmt(t.lr)} (TTT parameters {_fmt(t.ttt_lr if t.ttt_lr is not None else t.lr)})"],
            ["checkpoint", f"{Path(checkpoint).name} (step {_fmt(state.get('step'))}"
                           + (", the lowest eval loss of the run)" if best else ")")],
            *([["eval loss at that step", _fmt(state["eval_loss"])]] if state.get("eval_loss") is not None else []),
        ]),
        "<details><summary>Recipe</summary>\n\n```yaml\n"
        + yaml.safe_dump(_public({k: v for k, v in recipe.to_dict().items() if k != "export"}), sort_keys=False)
        + "```\n\n</details>\n",
    ]
    if report:
        parts += ["## Evaluation\n", markdown_table(report)]
    load_from = repo_id or "path/to/this/folder"
    pin = f', revision="{revision}"' if revision else ""
    parts += [
        code_note(),
        "## Usage\n",
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'tokenizer = AutoTokenizer.from_pretrained("{load_from}", trust_remote_code=True{pin})\n'
        f'model = AutoModelForCausalLM.from_pretrained("{load_from}", trust_remote_code=True{pin})\n'
        'inputs = tokenizer("A long document ...", return_tensors="pt")\n'
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))\n```\n",
        *([_chat_usage(load_from, pin)] if chat else []),
        "`trust_remote_code=True` runs the Python files of this repository (`configuration_ttt.py`, "
        "`modeling_ttt.py`, `ttt_layer.py`, `ttt_state.py`; they need only torch and transformers). Read them, then pin "
        "`revision` to the commit you read so later pushes cannot change the code you run.\n",
    ]
    return "\n".join(parts)


def _chat_usage(load_from: str, pin: str) -> str:
    return (
        "A chat model: its tokenizer carries the chat template it was trained with, and `generation_config.json` stops "
        "at the template's end-of-turn token.\n\n"
        "```python\nfrom transformers import pipeline\n\n"
        f'chat = pipeline("text-generation", model="{load_from}", trust_remote_code=True{pin})\n'
        'messages = [{"role": "user", "content": "A long document ...\\n\\nWhat does it say about ...?"}]\n'
        'print(chat(messages, max_new_tokens=64)[0]["generated_text"][-1]["content"])\n```\n'
    )


def _table(header: list, rows: list[list]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "null" if v is None else str(v)


def _public(d):
    """The recipe without local directory names: a local path is shown by its last component."""
    if isinstance(d, dict):
        return {k: _public(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_public(v) for v in d]
    if isinstance(d, str) and os.sep in d and looks_like_local_path(d):
        return Path(d).name
    return d


def base_license(name_or_path: str) -> str | None:
    """The `license` in the base model's model card (a local README.md, or the Hub's), if any."""
    try:
        card = Path(name_or_path) / "README.md"
        if looks_like_local_path(name_or_path):
            meta = metadata_load(card) if card.is_file() else None
        else:
            meta = metadata_load(hf_hub_download(name_or_path, "README.md"))
    except Exception:  # offline, no card, malformed YAML: the card then says "other"
        return None
    return (meta or {}).get("license")


def code_note() -> str:
    """The model card's line about the modeling code (replaced by `refresh_code`)."""
    lo, hi = TESTED_TRANSFORMERS
    return (
        "<!-- ttt-adapt:code -->\n## Modeling code\n\nThe modeling files of this folder are tested with transformers "
        f"{lo} to {hi} (`config.json`: `ttt_code`). They refuse older releases, and every cached forward checks that "
        "the attention cache and the fast weights have read the same tokens, stopping with an error rather than "
        "generating wrong tokens under a release that routes the cache differently; `scripts/export.py "
        "--refresh-code` of a newer ttt-adapt updates them without touching the weights.\n<!-- /ttt-adapt:code -->\n"
    )


def with_code_note(card: str) -> str:
    """`card` with its modeling-code note replaced by the current one (added before Usage, or at the end)."""
    if CODE_NOTE.search(card):
        return CODE_NOTE.sub(lambda _: code_note(), card, count=1)
    at = card.find("## Usage")
    return card[:at] + code_note() + "\n" + card[at:] if at >= 0 else card.rstrip("\n") + "\n\n" + code_note()


__all__ = ["render_model_card", "base_license", "code_note", "with_code_note", "CODE_NOTE"]
