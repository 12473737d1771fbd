"""Training rows from one corpus or a weighted mix of corpora, plain text and conversations.

`build_datasets(cfg, tokenizer)` is what training calls. A single plain-text corpus takes `ttt_adapt.data.text`'s path
unchanged. Otherwise every source (`data.path` in `data.format`, or each `data.mix` entry) becomes units of
`input_ids` and `labels`: a text document labelled on every token (`ttt_adapt.data.text.tokenize_corpus`), a
conversation on its assistant tokens (`ttt_adapt.data.chat`). Each source's units are shuffled with `data.seed`,
then the sources are interleaved, drawing each next unit from source i with probability weight_i / sum of weights
(`datasets.interleave_datasets`, seeded, until every source has been read once: a small source repeats), and
packed by `pack_units`: as `ttt_adapt.data.text.pack_documents` packs documents (position_ids restart at 0 for each
unit, the first token of each piece unlabelled), except that a conversation is never split: when it does not fit
in what is left of a row, the row is closed with padding (attention_mask 0, no labels, a piece of its own) and the
conversation starts the next one. Held-out rows: `eval_path` (in `data.format`), else `eval_fraction` of each
source, interleaved alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

from datasets import Dataset, Features, IterableDataset, List, Value, interleave_datasets
from datasets.fingerprint import Hasher

from ttt_adapt.data import text
from ttt_adapt.data.chat import check_chat_template, load_conversations, tokenize_conversations
from ttt_adapt.data.text import ROW_FEATURES, STREAMING_SHUFFLE_BUFFER, DataConfig
from ttt_adapt.loss import IGNORE_INDEX

UNIT_FEATURES = Features({"input_ids": List(Value("int32")), "labels": List(Value("int32")), "whole": Value("bool")})
_PACKING_VERSION = "units-1"


def build_datasets(cfg: DataConfig, tokenizer, log=print):
    """Packed (train, eval) rows of the recipe's data (eval None when none is asked for); `log` receives the
    counts of skipped and cut conversations."""
    if cfg.mix is None and cfg.format == "text":
        return text.build_datasets(cfg, tokenizer)
    cfg.validate()
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token; set tokenizer.eos_token before building data")
    if cfg.uses_chat():
        check_chat_template(tokenizer, cfg.chat_template_kwargs)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_parts, eval_parts, weights = [], [], []
    for key, source in cfg.sources():
        one = dataclasses.replace(cfg, path=source.path, format=source.format, name=source.name, split=source.split,
                                  text_field=source.text_field, mix=None,
                                  eval_path=cfg.eval_path if cfg.mix is None else None,
                                  eval_fraction=0.0 if cfg.mix is not None and cfg.eval_path else cfg.eval_fraction)
        train, held = _source_units(one, tokenizer, key, log)
        train_parts.append(train)
        weights.append(source.weight)
        if held is not None:
            eval_parts.append(held)
    if cfg.mix is not None and cfg.eval_path is not None:
        held_cfg = dataclasses.replace(cfg, path=cfg.eval_path, eval_path=None, eval_fraction=0.0, mix=None)
        eval_parts = [_units(held_cfg, _load(held_cfg, "eval_path")[0], tokenizer, "eval_path", log)]
    train_units = _interleave(train_parts, weights, cfg.seed)
    eval_units = _interleave(eval_parts, weights if len(eval_parts) == len(weights) else None, cfg.seed) \
        if eval_parts else None
    return (_pack(train_units, cfg.seq_len, pad_id, cfg.cache_dir),
            None if eval_units is None else _pack(eval_units, cfg.seq_len, pad_id, cfg.cache_dir))


def _load(cfg: DataConfig, key: str):
    if cfg.format == "chat":
        return load_conversations(cfg, key)
    return text.load_documents(cfg)


def _source_units(cfg: DataConfig, tokenizer, key: str, log):
    train, held = _load(cfg, key)
    if isinstance(train, IterableDataset):
        train = train.shuffle(seed=cfg.seed, buffer_size=STREAMING_SHUFFLE_BUFFER)
    else:
        train = train.shuffle(seed=cfg.seed)
    return (_units(cfg, train, tokenizer, key, log),
            None if held is None else _units(cfg, held, tokenizer, f"{key} (held out)", log))


def _units(cfg: DataConfig, rows, tokenizer, key: str, log):
    """The rows of one source as `UNIT_FEATURES` units."""
    if cfg.format == "chat":
        tokens, stats = tokenize_conversations(rows, tokenizer, cfg, key)
        if stats is not None and log is not None and (stats["skipped"] or stats["cut"]):
            log(f"data.{key}: {stats['rows']} conversations, {stats['skipped']} bad ones skipped"
                + (f" (first: {stats['first_skipped']})" if stats["skipped"] else "")
                + f", {stats['cut']} longer than data.seq_len={cfg.seq_len} cut there")
        whole = True
    else:
        tokens = text.tokenize_corpus(rows, tokenizer, cfg)
        text._check_not_empty(tokens, cfg, "training" if "held" not in key else "eval")
        whole = False
    kwargs = {"features": UNIT_FEATURES} if isinstance(tokens, Dataset) else {}
    return tokens.map(lambda batch: {"input_ids": batch["input_ids"],
                                     "labels": batch["labels"] if whole else batch["input_ids"],
                                     "whole": [whole] * len(batch["input_ids"])},
                      batched=True, remove_columns=[c for c in tokens.column_names or [] if c != "input_ids"],
                      **kwargs)


def _interleave(parts: list, weights: list[float] | None, seed: int):
    if len(parts) == 1:
        return parts[0]
    probabilities = None if weights is None else [w / sum(weights) for w in weights]
    return interleave_datasets(parts, probabilities=probabilities, seed=seed, stopping_strategy="all_exhausted")


def pack_units(units: Iterable[tuple[list[int], list[int], bool]], seq_len: int, pad_token_id: int) -> Iterator[dict]:
    """Rows of exactly `seq_len` tokens from (input_ids, labels, whole) units (see the module docstring): a unit
    with `whole` set (a conversation, at most `seq_len` tokens) is never split; others are cut as documents are."""
    if not text._is_int(seq_len) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    row = text._empty_row()
    for ids, labels, whole in units:
        if whole:
            if len(ids) > seq_len:
                raise ValueError(f"a conversation of {len(ids)} tokens is longer than seq_len={seq_len}")
            if len(row["input_ids"]) + len(ids) > seq_len:
                _pad(row, seq_len, pad_token_id)
                yield row
                row = text._empty_row()
        start = 0
        while start < len(ids):
            end = start + seq_len - len(row["input_ids"])
            _append(row, ids[start:end], labels[start:end])
            start = min(end, len(ids))
            if len(row["input_ids"]) == seq_len:
                yield row
                row = text._empty_row()
    if row["input_ids"]:
        _pad(row, seq_len, pad_token_id)
        yield row


def _append(row: dict, ids: list[int], labels: list[int]) -> None:
    if not ids:
        return
    row["input_ids"] += ids
    row["position_ids"] += range(len(ids))
    row["labels"] += [IGNORE_INDEX] + list(labels[1:])  # the first token would be predicted from another unit
    row["attention_mask"] += [1] * len(ids)


def _pad(row: dict, seq_len: int, pad_token_id: int) -> None:
    text._append_piece(row, [pad_token_id] * (seq_len - len(row["input_ids"])), real=False)


def _packed_rows(units, seq_len: int, pad_token_id: int) -> Iterator[dict]:
    seen = 0

    def each() -> Iterator[tuple]:
        nonlocal seen
        for batch in units.iter(batch_size=256):
            seen += len(batch["input_ids"])
            yield from zip(batch["input_ids"], batch["labels"], batch["whole"])

    yield from pack_units(each(), seq_len, pad_token_id)
    if seen == 0:
        raise ValueError("no documents or conversations left to pack: every source is empty or every row was dropped")


def _pack(units, seq_len: int, pad_token_id: int, cache_dir: str | None):
    gen_kwargs = {"units": units, "seq_len": seq_len, "pad_token_id": pad_token_id}
    if isinstance(units, IterableDataset):
        return IterableDataset.from_generator(_packed_rows, features=ROW_FEATURES, gen_kwargs=gen_kwargs)
    if len(units) == 0:
        raise ValueError("no documents or conversations left to pack: every source is empty or every row was dropped")
    fingerprint = Hasher.hash([units._fingerprint, seq_len, pad_token_id, _PACKING_VERSION])
    return Dataset.from_generator(_packed_rows, features=ROW_FEATURES, gen_kwargs=gen_kwargs, cache_dir=cache_dir,
                                  fingerprint=fingerprint)


__all__ = ["build_datasets", "pack_units", "UNIT_FEATURES"]
