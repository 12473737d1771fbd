"""Load, tokenise and pack text corpora into fixed-length training rows.

A row holds `seq_len` tokens taken from consecutive documents. `position_ids` restart at 0 where
a document starts; that is how the model (attention masks and TTT chunk boundaries) keeps
documents apart, so rows carry no cross-document signal. A document that does not fit in the
rest of a row is cut and its remainder starts the next row at position 0, as a new piece: no row
can attend across rows anyway, and it keeps every position below `seq_len`. `labels` are -100 at
the first token of every piece (HF's loss shifts labels, so that token would be predicted from
the previous document's last token) and on padding. Only the last row is padded; its padding is
a piece of its own (positions 0, 1, ...) with `attention_mask` 0 and labels -100, so training may
drop `attention_mask` and rely on the position restarts alone.

The map-style path (`streaming=False`) shuffles documents exactly with `seed` and caches every
step in the `datasets` cache. The streaming path shuffles with a buffer of documents, so for the
same seed it yields the same tokens in a different order; packing itself is shared.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from datasets import Dataset, Features, IterableDataset, List, Value, load_dataset
from datasets.exceptions import DatasetNotFoundError
from datasets.fingerprint import Hasher

from ttt_adapt._util import RecipeError, looks_like_local_path
from ttt_adapt.loss import IGNORE_INDEX  # the label the loss skips

ROW_FEATURES = Features(
    {name: List(Value("int32")) for name in ("input_ids", "position_ids", "labels", "attention_mask")}
)
# Local file suffix -> `datasets` packaged builder. A .txt file is one document (whole files,
# not lines: long-context training wants long documents); use .jsonl for one document a line.
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".arrow": "arrow"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
STREAMING_SHUFFLE_BUFFER = 1000  # documents held in memory by the streaming shuffle
_PACKING_VERSION = "1"  # bump when the packed layout changes, to invalidate cached rows
FORMATS = ("text", "chat")  # plain documents; conversations (`ttt_adapt.data.chat`)
ON_BAD_ROW = ("error", "skip")


@dataclass
class DataSource:
    """One corpus of a `data.mix`: where it lives (as `data.path`), its format and its weight (the share of the
    documents and conversations drawn from it; weights need not sum to 1)."""

    path: str
    format: str = "text"
    weight: float = 1.0
    name: str | None = None
    split: str = "train"
    text_field: str = "text"


@dataclass
class DataConfig:
    """Where the corpus lives and how it becomes training rows.

    `path` is a hub dataset name, a local .jsonl/.json/.parquet/.txt/.arrow file (optionally
    .gz/.bz2/.xz/.zst compressed, except parquet/arrow), a folder of such files, or a folder
    written by `Dataset.save_to_disk`. `split` applies
    to local files too (they form one "train" split), so slices like "train[:10%]" work.
    Held-out documents come from `eval_path` (a local file/folder) if given, else a seeded
    `eval_fraction` of the documents; 0 disables evaluation. `min_doc_len` counts the tokens of
    a tokenised document including the appended eos. `num_proc` parallelises loading and
    tokenising map-style datasets (streams ignore it).

    Conversations (`format: chat`, see `ttt_adapt.data.chat` and docs/chat.md): rows with `messages` or
    `prompt`/`completion`, rendered with the tokenizer's chat template (or the Jinja file `chat_template_path`,
    as TRL's `chat_template_path`), `chat_template_kwargs` passed to it; only assistant tokens are labelled. A bad
    row stops the run with one line naming it (`on_bad_row: error`) or is skipped and counted (`skip`). `mix`
    replaces `path`: several sources (`DataSource`), text and chat, drawn by weight; `format` and `eval_path`
    then describe the held-out file, if any.
    """

    path: str | None = None
    name: str | None = None
    split: str = "train"
    text_field: str = "text"
    eval_path: str | None = None
    eval_fraction: float = 0.01
    seq_len: int = 2048
    min_doc_len: int = 0
    streaming: bool = False
    num_proc: int | None = None
    cache_dir: str | None = None
    seed: int = 0
    format: str = "text"
    chat_template_path: str | None = None
    chat_template_kwargs: dict = field(default_factory=dict)
    on_bad_row: str = "error"
    mix: list[DataSource] | None = None

    def validate(self) -> DataConfig:
        """Raise a one-line RecipeError ("data.key: ...") naming the first bad value; return self. Reads no files
        (`check_files` does)."""
        if self.mix is not None:
            _validate_mix(self)
        elif self.path is None:
            raise RecipeError("data.path: missing (required, or list the sources in data.mix)")
        for name in ("text_field", "split") + (("path",) if self.mix is None else ()):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise RecipeError(f"data.{name}: must be a non-empty string, got {getattr(self, name)!r}")
        for name, value, choices in (("format", self.format, FORMATS), ("on_bad_row", self.on_bad_row, ON_BAD_ROW)):
            if value not in choices:
                raise RecipeError(f"data.{name}: must be one of {', '.join(choices)}; got {value!r}")
        if not _is_int(self.seq_len) or self.seq_len < 2:
            raise RecipeError(f"data.seq_len: must be an integer >= 2, got {self.seq_len!r}")
        if not isinstance(self.eval_fraction, (int, float)) or not 0 <= self.eval_fraction < 1:
            raise RecipeError(f"data.eval_fraction: must be in [0, 1), got {self.eval_fraction!r}")
        if not _is_int(self.min_doc_len) or self.min_doc_len < 0:
            raise RecipeError(f"data.min_doc_len: must be an integer >= 0, got {self.min_doc_len!r}")
        if self.num_proc is not None and (not _is_int(self.num_proc) or self.num_proc < 1):
            raise RecipeError(f"data.num_proc: must be null or an integer >= 1, got {self.num_proc!r}")
        return self

    def check_files(self) -> DataConfig:
        """Raise a one-line RecipeError if a local `path` or `eval_path` is missing, empty or of an unknown
        type; return self."""
        for key, source in self.sources():
            if _looks_local(source.path):
                _local_files(source.path, key)
        if self.chat_template_path is not None and not os.path.isfile(os.path.expanduser(self.chat_template_path)):
            raise RecipeError(f"data.chat_template_path: no such file {self.chat_template_path!r}")
        if self.eval_path is not None:
            _local_files(self.eval_path, "eval_path")
        return self

    def sources(self) -> list[tuple[str, DataSource]]:
        """(recipe key, source) of every training corpus: `data.path` alone, or each `data.mix` entry."""
        if self.mix is None:
            return [("path", DataSource(self.path, self.format, 1.0, self.name, self.split, self.text_field))]
        return [(f"mix[{i}].path", source) for i, source in enumerate(self.mix)]

    def uses_chat(self) -> bool:
        return self.format == "chat" or any(s.format == "chat" for _, s in self.sources())


def _validate_mix(cfg: DataConfig) -> None:
    if cfg.path is not None:
        raise RecipeError("data.path: set either data.path or data.mix, not both")
    if not cfg.mix:
        raise RecipeError("data.mix: is empty; list at least one source, or use data.path")
    for i, source in enumerate(cfg.mix):
        key = f"data.mix[{i}]"
        for name in ("path", "split", "text_field"):
            if not getattr(source, name):
                raise RecipeError(f"{key}.{name}: must be a non-empty string, got {getattr(source, name)!r}")
        if source.format not in FORMATS:
            raise RecipeError(f"{key}.format: must be one of {', '.join(FORMATS)}; got {source.format!r}")
        if not source.weight > 0:
            raise RecipeError(f"{key}.weight: must be > 0, got {source.weight}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _builder_for(file: str) -> str | None:
    name = file.lower()
    for suffix in COMPRESSIONS:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return BUILDERS.get(os.path.splitext(name)[1])


def _looks_local(path: str) -> bool:
    """True for a path that cannot be a hub dataset name (`looks_like_local_path`, or a data file suffix)."""
    return looks_like_local_path(path) or _builder_for(path) is not None


def _data_files_in(folder: str) -> list[str]:
    """Supported files under `folder`, sorted, skipping hidden files and folders; only the .arrow
    shards of a `Dataset.save_to_disk` folder (its state.json is metadata, not data)."""
    if os.path.isfile(os.path.join(folder, "state.json")):
        return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".arrow"))
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [os.path.join(root, n) for n in names if not n.startswith(".") and _builder_for(n)]
    return sorted(files)


def _local_files(path: str, field: str) -> tuple[str, list[str]]:
    """The `datasets` builder and the sorted data files of a local file or folder."""
    path = os.path.expanduser(path)
    if os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        files = _data_files_in(path)
        if not files:
            raise RecipeError(f"data.{field}: folder {path!r} holds no {'/'.join(BUILDERS)} files")
    else:
        raise RecipeError(f"data.{field}: no such file or folder {path!r}")
    builders = {_builder_for(file) for file in files}
    if None in builders:
        raise RecipeError(f"data.{field}: {path!r} is not one of {'/'.join(BUILDERS)}")
    files = [file for file in files if os.path.getsize(file) > 0]  # `datasets` trips on empty files
    if not files:
        raise RecipeError(f"data.{field}: {path!r} holds no documents (empty files)")
    if len(builders) > 1:
        raise RecipeError(f"data.{field}: folder {path!r} mixes file types {sorted(builders)}; keep one")
    return builders.pop(), files


def _load_local(path: str, field: str, cfg: DataConfig) -> Dataset | IterableDataset:
    builder, files = _local_files(path, field)
    extra = {"sample_by": "document"} if builder == "text" else {}
    num_proc = None if cfg.streaming else cfg.num_proc
    return load_dataset(
        builder, data_files=files, split=cfg.split, streaming=cfg.streaming,
        cache_dir=cfg.cache_dir, num_proc=num_proc, **extra,
    )


def _load_hub(cfg: DataConfig) -> Dataset | IterableDataset:
    try:
        return load_dataset(
            cfg.path, cfg.name, split=cfg.split, streaming=cfg.streaming,
            cache_dir=cfg.cache_dir, num_proc=None if cfg.streaming else cfg.num_proc,
        )
    except (DatasetNotFoundError, FileNotFoundError, ConnectionError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"data.path: {cfg.path!r} is neither a local file/folder nor a loadable hub dataset "
            f"({reason})"
        ) from None


def _columns(ds: Dataset | IterableDataset) -> list:
    """The dataset's column names; for a stream whose features are unknown, its first row's keys ([] if none)."""
    if ds.column_names is not None:
        return ds.column_names
    first = next(iter(ds), None)
    return [] if first is None else list(first)


def _text_only(ds: Dataset | IterableDataset, cfg: DataConfig, field: str) -> Dataset | IterableDataset:
    """Keep only the text column, after checking that it exists and holds strings."""
    source = repr(getattr(cfg, field))
    columns = _columns(ds)
    if not columns or (isinstance(ds, Dataset) and len(ds) == 0):
        raise RecipeError(f"data.{field}: {source} holds no documents")
    if cfg.text_field not in columns:
        raise ValueError(
            f"data.text_field: {source} has no column {cfg.text_field!r}; columns: {columns}"
        )
    feature = ds.features.get(cfg.text_field) if ds.features else None
    if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise ValueError(
            f"data.text_field: column {cfg.text_field!r} of {source} holds {feature}, not text"
        )
    return ds.select_columns([cfg.text_field])


def _in_eval(indices: list[int], seed: int, fraction: float) -> list[bool]:
    """A seeded coin per document index in the source order: the streaming hold-out."""
    def coin(index: int) -> float:
        digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2**64

    return [coin(index) < fraction for index in indices]


def _hold_out(ds: Dataset | IterableDataset, cfg: DataConfig) -> tuple[Dataset | IterableDataset, ...]:
    """Split off `eval_fraction` of the documents: exactly (seeded) for a Dataset, by a seeded coin per
    document for a stream (no length to split by; the eval stream is lazy, cap it with `.take`)."""
    if isinstance(ds, IterableDataset):
        def keep(batch, indices, want_eval):
            return [flag == want_eval for flag in _in_eval(indices, cfg.seed, cfg.eval_fraction)]

        return (
            ds.filter(keep, with_indices=True, batched=True, fn_kwargs={"want_eval": False}),
            ds.filter(keep, with_indices=True, batched=True, fn_kwargs={"want_eval": True}),
        )
    if math.ceil(cfg.eval_fraction * len(ds)) >= len(ds):  # `train_test_split` holds out ceil(fraction * n)
        raise ValueError(
            f"data.eval_fraction: holding out {cfg.eval_fraction} of {len(ds)} document(s) "
            "leaves none to train on"
        )
    splits = ds.train_test_split(test_size=cfg.eval_fraction, seed=cfg.seed)
    return splits["train"], splits["test"]


def load_documents(cfg: DataConfig) -> tuple[Dataset | IterableDataset, Dataset | IterableDataset | None]:
    """Load the training documents and the held-out ones (None if none asked for), text column only."""
    cfg.validate()
    local = _looks_local(cfg.path)
    ds = _load_local(cfg.path, "path", cfg) if local else _load_hub(cfg)
    ds = _text_only(ds, cfg, "path")
    if cfg.eval_path is not None:
        eval_ds = _text_only(_load_local(cfg.eval_path, "eval_path", cfg), cfg, "eval_path")
        return ds, eval_ds
    if cfg.eval_fraction > 0:
        return _hold_out(ds, cfg)
    return ds, None


def _tokenize_batch(batch: dict, tokenizer, text_field: str, eos_token_id: int) -> dict:
    """Token ids of each text with eos appended; [] for empty texts (dropped later)."""
    texts = [text or "" for text in batch[text_field]]
    encoded = tokenizer(texts, return_attention_mask=False, verbose=False)["input_ids"]
    return {
        "input_ids": [
            [] if not text.strip() else ids if ids and ids[-1] == eos_token_id else ids + [eos_token_id]
            for text, ids in zip(texts, encoded)
        ]
    }


def _long_enough(input_ids: list[list[int]], min_doc_len: int) -> list[bool]:
    return [len(ids) > 0 and len(ids) >= min_doc_len for ids in input_ids]


def tokenize_corpus(ds: Dataset | IterableDataset, tokenizer, cfg: DataConfig) -> Dataset | IterableDataset:
    """Tokenise the text column (the tokenizer's own special tokens, then eos per document) into a
    single `input_ids` column, dropping empty documents and those shorter than `min_doc_len`.
    Map-style datasets are processed with `num_proc` workers and cached by fingerprint."""
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token; set tokenizer.eos_token before building data")
    map_kwargs = dict(
        batched=True,
        fn_kwargs={"tokenizer": tokenizer, "text_field": cfg.text_field, "eos_token_id": tokenizer.eos_token_id},
        remove_columns=ds.column_names or [cfg.text_field],
    )
    filter_kwargs = dict(batched=True, input_columns="input_ids", fn_kwargs={"min_doc_len": cfg.min_doc_len})
    if isinstance(ds, Dataset):
        map_kwargs.update(num_proc=cfg.num_proc, desc="Tokenising")
        filter_kwargs.update(num_proc=cfg.num_proc, desc=f"Dropping documents under {cfg.min_doc_len} tokens")
    return ds.map(_tokenize_batch, **map_kwargs).filter(_long_enough, **filter_kwargs)


def pack_documents(token_docs: Iterable[Sequence[int]], seq_len: int, pad_token_id: int) -> Iterator[dict]:
    """Concatenate documents into rows of exactly `seq_len` tokens (see the module docstring).

    Yields dicts of int lists `input_ids`, `position_ids`, `labels`, `attention_mask`. Long
    documents are cut into in-order pieces, each starting at position 0; the last row is padded.
    """
    if not _is_int(seq_len) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    row = _empty_row()
    for doc in token_docs:
        start = 0
        while start < len(doc):
            piece = list(doc[start : start + seq_len - len(row["input_ids"])])
            _append_piece(row, piece, real=True)
            start += len(piece)
            if len(row["input_ids"]) == seq_len:
                yield row
                row = _empty_row()
    if row["input_ids"]:
        _append_piece(row, [pad_token_id] * (seq_len - len(row["input_ids"])), real=False)
        yield row


def _empty_row() -> dict[str, list[int]]:
    return {"input_ids": [], "position_ids": [], "labels": [], "attention_mask": []}


def _append_piece(row: dict[str, list[int]], piece: list[int], real: bool) -> None:
    if not piece:
        return
    row["input_ids"] += piece
    row["position_ids"] += range(len(piece))
    row["labels"] += [IGNORE_INDEX] + piece[1:] if real else [IGNORE_INDEX] * len(piece)
    row["attention_mask"] += [int(real)] * len(piece)


def _packed_rows(token_ds: Dataset | IterableDataset, seq_len: int, pad_token_id: int) -> Iterator[dict]:
    """Generator behind both packed datasets; raises on an empty corpus (a stream learns it only here)."""
    seen = 0

    def documents() -> Iterator[list[int]]:
        nonlocal seen
        for batch in token_ds.iter(batch_size=256):
            seen += len(batch["input_ids"])
            yield from batch["input_ids"]

    yield from pack_documents(documents(), seq_len, pad_token_id)
    if seen == 0:
        raise ValueError("no documents left to pack: the corpus is empty or min_doc_len removes every document")


def _pack_dataset(
    token_ds: Dataset | IterableDataset, seq_len: int, pad_token_id: int, cache_dir: str | None
) -> Dataset | IterableDataset:
    gen_kwargs = {"token_ds": token_ds, "seq_len": seq_len, "pad_token_id": pad_token_id}
    if isinstance(token_ds, IterableDataset):
        return IterableDataset.from_generator(_packed_rows, features=ROW_FEATURES, gen_kwargs=gen_kwargs)
    # Packing crosses batch boundaries, so it runs as one generator; the explicit fingerprint (the
    # input's, which covers tokenizer, filter and shuffle) lets `datasets` reuse the cached rows.
    fingerprint = Hasher.hash([token_ds._fingerprint, seq_len, pad_token_id, _PACKING_VERSION])
    return Dataset.from_generator(
        _packed_rows, features=ROW_FEATURES, gen_kwargs=gen_kwargs, cache_dir=cache_dir, fingerprint=fingerprint
    )


def _check_not_empty(token_ds: Dataset | IterableDataset, cfg: DataConfig, which: str) -> None:
    if isinstance(token_ds, Dataset) and len(token_ds) == 0:
        raise ValueError(
            f"data.min_doc_len: no {which} documents left after dropping those under {cfg.min_doc_len} tokens"
        )


def build_datasets(cfg: DataConfig, tokenizer) -> tuple[Dataset | IterableDataset, Dataset | IterableDataset | None]:
    """Packed (train, eval) rows; eval is None when neither `eval_path` nor `eval_fraction` asks for it.

    Training documents are shuffled with `cfg.seed` before tokenising (streams with a buffer of
    `STREAMING_SHUFFLE_BUFFER` documents); held-out rows keep the split's order. A packed stream is
    a single shard read in the same order on every pass (`set_epoch` does not reach the documents).
    """
    train_docs, eval_docs = load_documents(cfg)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if isinstance(train_docs, IterableDataset):
        train_docs = train_docs.shuffle(seed=cfg.seed, buffer_size=STREAMING_SHUFFLE_BUFFER)
    else:
        train_docs = train_docs.shuffle(seed=cfg.seed)
    packed = []
    for which, docs in (("training", train_docs), ("eval", eval_docs)):
        if docs is None:
            packed.append(None)
            continue
        token_ds = tokenize_corpus(docs, tokenizer, cfg)
        _check_not_empty(token_ds, cfg, which)
        packed.append(_pack_dataset(token_ds, cfg.seq_len, pad_token_id, cfg.cache_dir))
    return packed[0], packed[1]
