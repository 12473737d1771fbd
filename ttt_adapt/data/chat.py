"""Conversations as training rows: rendered with the tokenizer's chat template, labelled on the assistant turns only.

A row holds `messages` (a list of {role, content}: the Hugging Face conversational format) or `prompt` and
`completion` (TRL's prompt-completion format: lists of messages, or strings, read as one user and one assistant
message). It is rendered by the tokenizer's chat template (or the Jinja file `data.chat_template_path`, set on the
tokenizer by `ttt_adapt.model_setup.recipe_tokenizer`) through `apply_chat_template(...,
return_assistant_tokens_mask=True)`, `data.chat_template_kwargs` passed through (e.g. Qwen3's `enable_thinking`).
As with TRL's `assistant_only_loss`, the template must mark what the assistant says with `{% generation %}` ...
`{% endgeneration %}`; only those tokens get labels (the end-of-turn token too, when the block holds it, so the
model learns to stop). A conversation longer than `data.seq_len` tokens is cut at `seq_len`, its start kept (TRL's
`max_length` truncation), and counted; conversations are never split across rows (`ttt_adapt.data.mix` packs them).

A bad row (neither `messages` nor `prompt`/`completion`, a message without a known role or text content, no
assistant turn, a template that refuses it, nothing left to label) raises a one-line ValueError naming its row
(`data.on_bad_row: error`) or is dropped and counted (`skip`). Rows are numbered from 0 in the source's order.
"""

from __future__ import annotations

import re
from pathlib import Path

from datasets import Dataset, IterableDataset

from ttt_adapt._util import first_line
from ttt_adapt.data.text import DataConfig, _columns, _hold_out, _load_hub, _load_local, _looks_local
from ttt_adapt.loss import IGNORE_INDEX

ROLES = ("system", "developer", "user", "assistant", "tool")
CHAT_COLUMNS = ("messages", "prompt", "completion")
ROW = "_row"  # the row's index in its source, kept through shuffles and hold-outs to name bad rows
GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")  # how transformers finds the assistant-span marker
PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


class BadRow(ValueError):
    """A row that is not a usable conversation; the message says why."""


def set_chat_template(tokenizer, path) -> None:
    """Replace the tokenizer's chat template by the Jinja file at `path` (TRL's `chat_template_path`)."""
    tokenizer.chat_template = Path(path).expanduser().read_text()


def messages_of(row: dict) -> list[dict]:
    """The conversation of a row (`messages`, or `prompt` + `completion`), checked; raises BadRow."""
    if row.get("messages") is not None:
        messages = row["messages"]
    elif row.get("prompt") is not None and row.get("completion") is not None:
        messages = _as_messages(row["prompt"], "user") + _as_messages(row["completion"], "assistant")
    else:
        raise BadRow("holds neither `messages` nor `prompt` and `completion`")
    if not isinstance(messages, list) or not messages:
        raise BadRow("its messages are not a non-empty list")
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise BadRow(f"message {i} has {'unknown role ' + repr(role) if role else 'no role'} "
                         f"(known: {', '.join(ROLES)})")
        if not isinstance(message.get("content"), str):
            raise BadRow(f"message {i} ({role}) has no text content")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow("has no assistant turn")
    return messages


def _as_messages(value, role: str) -> list:
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def render(tokenizer, messages: list[dict], template_kwargs: dict) -> tuple[list[int], list[int]]:
    """(token ids, assistant mask) of a conversation rendered by the tokenizer's chat template."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                        **template_kwargs)
    return list(out["input_ids"]), list(out["assistant_masks"])


def check_chat_template(tokenizer, template_kwargs: dict, name: str = "the tokenizer") -> None:
    """Raise a one-line ValueError unless the tokenizer's chat template labels an assistant turn."""
    template = tokenizer.chat_template
    fix = "set data.chat_template_path to a Jinja template that does (docs/chat.md)"
    if not isinstance(template, str):
        raise ValueError(f"data.chat_template_path: {name} has no chat template; {fix.replace(' that does', '')}")
    if not GENERATION.search(template):
        raise ValueError(f"data.chat_template_path: the chat template of {name} does not mark assistant spans with "
                         f"{{% generation %}} ... {{% endgeneration %}}, so no assistant-only labels; {fix}")
    try:
        _, mask = render(tokenizer, PROBE, template_kwargs)
    except Exception as e:  # a broken template or kwargs it does not take: the user's input, one line
        raise ValueError(f"data.chat_template_path: the chat template fails on a two-turn conversation: "
                         f"{first_line(e, None)}") from None
    if not any(mask):
        raise ValueError(f"data.chat_template_path: the chat template of {name} marks no assistant token of a "
                         f"two-turn conversation; {fix}")


def end_of_turn_id(tokenizer, template_kwargs: dict) -> int | None:
    """The token that ends an assistant turn: the last token of the template's assistant span when it is a special
    (added) token, e.g. Qwen's <|im_end|>, Llama 3's <|eot_id|>; None when the span ends in plain text."""
    try:
        ids, mask = render(tokenizer, PROBE, template_kwargs)
    except Exception:
        return None
    marked = [i for i, m in enumerate(mask) if m]
    if not marked:
        return None
    token = ids[marked[-1]]
    return token if tokenizer.convert_ids_to_tokens(token) in tokenizer.get_added_vocab() else None


def load_conversations(cfg: DataConfig, key: str = "path") -> tuple[Dataset | IterableDataset, object]:
    """The raw conversation rows of `cfg.path` (their chat columns and `ROW`) and the held-out ones (`eval_path`,
    else `eval_fraction` of them, else None)."""
    train = _chat_columns(_load_local(cfg.path, "path", cfg) if _looks_local(cfg.path) else _load_hub(cfg), cfg, key)
    if cfg.eval_path is not None:
        return train, _chat_columns(_load_local(cfg.eval_path, "eval_path", cfg), cfg, "eval_path")
    if cfg.eval_fraction > 0:
        return _hold_out(train, cfg)
    return train, None


def _chat_columns(ds, cfg: DataConfig, key: str):
    columns = _columns(ds)
    if not columns or (isinstance(ds, Dataset) and len(ds) == 0):
        raise ValueError(f"data.{key}: {getattr(cfg, key.split('.')[-1], cfg.path)!r} holds no rows")
    if "messages" not in columns and not {"prompt", "completion"} <= set(columns):
        raise ValueError(f"data.{key}: a chat corpus needs a `messages` column or `prompt` and `completion` "
                         f"columns; columns: {columns}")
    ds = ds.select_columns([c for c in CHAT_COLUMNS if c in columns])
    return ds.map(lambda batch, indices: {ROW: indices}, with_indices=True, batched=True)


def tokenize_conversations(rows, tokenizer, cfg: DataConfig, key: str = "path"):
    """(dataset of `input_ids` and `labels` per conversation, stats) for the rows of `load_conversations`.

    `labels` hold the token where the template marks an assistant token, -100 elsewhere. `stats` (map-style
    datasets; None for streams) counts `rows`, `skipped` (bad rows, with `first_skipped`, the first one's reason)
    and `cut` (conversations longer than `seq_len`)."""
    kwargs = dict(batched=True, remove_columns=rows.column_names or None,
                  fn_kwargs={"tokenizer": tokenizer, "template_kwargs": dict(cfg.chat_template_kwargs),
                             "seq_len": cfg.seq_len, "on_bad_row": cfg.on_bad_row, "key": key})
    if isinstance(rows, Dataset):
        kwargs.update(num_proc=cfg.num_proc, desc="Rendering conversations")
    rendered = rows.map(_render_batch, **kwargs)
    stats = None
    if isinstance(rendered, Dataset):
        bad = [(row, why) for row, why in zip(rendered[ROW], rendered["_bad"]) if why]
        stats = {"rows": len(rendered), "skipped": len(bad), "cut": sum(rendered["_cut"]),
                 "first_skipped": f"row {bad[0][0]}: {bad[0][1]}" if bad else None}
    filter_kwargs = {"num_proc": cfg.num_proc} if isinstance(rendered, Dataset) else {}
    kept = rendered.filter(lambda ids: [len(x) > 0 for x in ids], batched=True, input_columns="input_ids",
                           **filter_kwargs)
    return kept.remove_columns([ROW, "_bad", "_cut"]), stats


def _render_batch(batch: dict, tokenizer, template_kwargs: dict, seq_len: int, on_bad_row: str, key: str) -> dict:
    out = {"input_ids": [], "labels": [], ROW: batch[ROW], "_bad": [], "_cut": []}
    columns = [c for c in CHAT_COLUMNS if c in batch]
    for j, index in enumerate(batch[ROW]):
        ids, labels, why, cut = [], [], "", False
        try:
            messages = messages_of({c: batch[c][j] for c in columns})
            try:
                ids, mask = render(tokenizer, messages, template_kwargs)
            except Exception as e:  # the template's own raise_exception (e.g. roles must alternate), a Jinja error
                raise BadRow(f"the chat template refuses it: {first_line(e, None)}") from None
            cut = len(ids) > seq_len
            ids, mask = ids[:seq_len], mask[:seq_len]
            if not any(mask[1:]):  # the first token of a row is never labelled
                raise BadRow(f"no assistant token in its first {seq_len} tokens (data.seq_len)" if cut
                             else "the template marks none of its tokens as the assistant's")
            labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
        except BadRow as e:
            if on_bad_row == "error":
                raise ValueError(f"data.{key}: row {index}: {e} (data.on_bad_row: skip drops such rows)") from None
            ids, labels, why, cut = [], [], str(e), False
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["_bad"].append(why)
        out["_cut"].append(cut)
    return out


__all__ = ["ROLES", "BadRow", "set_chat_template", "messages_of", "render", "check_chat_template", "end_of_turn_id",
           "load_conversations", "tokenize_conversations"]
