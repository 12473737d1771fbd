"""Tests for ttt_adapt.data: packing invariants, loading, splitting, streaming, errors."""

import gzip
import json
import random
from collections import Counter

import pytest
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ttt_adapt.data import (
    IGNORE_INDEX,
    DataConfig,
    build_datasets,
    load_documents,
    pack_documents,
    tokenize_corpus,
)

PAD, EOS, OFFSET = 1, 2, 3  # word "wK" has token id K + OFFSET


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path, monkeypatch):
    """Keep what `datasets` writes without an explicit cache_dir (stream builders' lock files) out of ~."""
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", tmp_path / "default_cache")


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {"[UNK]": 0, "[PAD]": PAD, "[EOS]": EOS, **{f"w{i}": i + OFFSET for i in range(1000)}}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=word_level, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )


def make_texts(n=30, seed=0, max_words=40):
    """Distinct documents (the first word is unique) of 1..max_words words."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        words = [f"w{rng.randrange(100, 1000)}" for _ in range(rng.randrange(max_words))]
        texts.append(" ".join([f"w{i}", *words]))
    return texts


def token_ids(text):
    return [int(word[1:]) + OFFSET for word in text.split()] + [EOS]


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: text, "meta": i}) + "\n" for i, text in enumerate(texts)))
    return path


def config(path, tmp_path, **overrides):
    settings = {"eval_fraction": 0.0, "seq_len": 16, **overrides}
    return DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), **settings)


def assert_well_packed(rows, docs, seq_len, pad_token_id=PAD):
    """Rows hold exactly the documents' tokens in order; positions and labels mark every piece start."""
    assert all(len(row[key]) == seq_len for row in rows for key in row)
    stream, starts = [], set()
    for r, row in enumerate(rows):
        columns = (row[k] for k in ("input_ids", "position_ids", "labels", "attention_mask"))
        for j, (tok, pos, label, mask) in enumerate(zip(*columns)):
            if not mask:  # padding: the tail of the last row, its own piece
                assert r == len(rows) - 1 and tok == pad_token_id and label == IGNORE_INDEX
                assert pos == j - row["attention_mask"].index(0)
                continue
            assert pos == (0 if j == 0 or pos == 0 else row["position_ids"][j - 1] + 1)
            assert label == (IGNORE_INDEX if pos == 0 else tok)
            if pos == 0:
                starts.add(len(stream))
            stream.append(tok)
    assert stream == [tok for doc in docs for tok in doc]
    doc_starts = {sum(map(len, docs[:i])) for i in range(len(docs))}
    row_starts = set(range(0, len(stream), seq_len))
    assert starts == doc_starts | row_starts


def split_at_eos(rows):
    stream = [t for row in rows for t, m in zip(row["input_ids"], row["attention_mask"]) if m]
    docs, current = [], []
    for tok in stream:
        current.append(tok)
        if tok == EOS:
            docs.append(tuple(current))
            current = []
    assert not current
    return docs


# -- packing ------------------------------------------------------------------------------------


def test_pack_small_example_exactly():
    rows = list(pack_documents([[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]], seq_len=4, pad_token_id=0))
    assert [r["input_ids"] for r in rows] == [[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 0, 0]]
    assert [r["position_ids"] for r in rows] == [[0, 1, 2, 0], [0, 1, 2, 3], [0, 0, 0, 1]]
    assert [r["labels"] for r in rows] == [[-100, 6, 7, -100], [-100, 10, 11, 12], [-100, -100, -100, -100]]
    assert [r["attention_mask"] for r in rows] == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]


@pytest.mark.parametrize("seed", range(40))
def test_pack_random_documents_keep_every_token_in_order(seed):
    rng = random.Random(seed)
    seq_len = rng.randrange(2, 12)
    docs = [[rng.randrange(3, 50) for _ in range(rng.randrange(1, 30))] for _ in range(rng.randrange(1, 8))]
    rows = list(pack_documents(docs, seq_len, PAD))
    assert_well_packed(rows, docs, seq_len)
    real = [t for row in rows for t, m in zip(row["input_ids"], row["attention_mask"]) if m]
    assert Counter(real) == Counter(t for doc in docs for t in doc)
    assert len(rows) == -(-sum(map(len, docs)) // seq_len)


def test_pack_long_document_split_in_order():
    doc = list(range(3, 3 + 23))
    rows = list(pack_documents([[40, 41], doc], seq_len=8, pad_token_id=PAD))
    assert [r["input_ids"][0] for r in rows] == [40, doc[6], doc[14], doc[22]]
    assert [r["position_ids"][0] for r in rows] == [0, 0, 0, 0]
    assert_well_packed(rows, [[40, 41], doc], 8)


def test_pack_exact_fit_has_no_padding_and_empty_input_no_rows():
    rows = list(pack_documents([[3, 4], [5, 6]], seq_len=4, pad_token_id=PAD))
    assert len(rows) == 1 and rows[0]["attention_mask"] == [1, 1, 1, 1]
    assert list(pack_documents([], seq_len=4, pad_token_id=PAD)) == []
    with pytest.raises(ValueError, match="seq_len"):
        list(pack_documents([[3]], seq_len=1, pad_token_id=PAD))


# -- tokenising ---------------------------------------------------------------------------------


def test_tokenize_appends_eos_drops_empty_and_is_cached(tmp_path, tokenizer):
    texts = ["w1 w2", "", "w3", "   "]
    cfg = config(write_jsonl(tmp_path / "a.jsonl", texts), tmp_path)
    docs, _ = load_documents(cfg)
    first = tokenize_corpus(docs, tokenizer, cfg)
    assert first["input_ids"] == [token_ids("w1 w2"), token_ids("w3")]
    again = tokenize_corpus(docs, tokenizer, cfg)
    assert again._fingerprint == first._fingerprint and again.cache_files == first.cache_files


def test_min_doc_len_filter(tmp_path, tokenizer):
    texts = make_texts()
    cfg = config(write_jsonl(tmp_path / "a.jsonl", texts), tmp_path, min_doc_len=20)
    train, _ = build_datasets(cfg, tokenizer)
    expected = sorted(tuple(token_ids(t)) for t in texts if len(token_ids(t)) >= 20)
    assert 0 < len(expected) < len(texts)
    assert sorted(split_at_eos(train)) == expected


# -- loading ------------------------------------------------------------------------------------


def test_load_jsonl_txt_parquet_and_folders(tmp_path, tokenizer):
    texts = make_texts(6)
    write_jsonl(tmp_path / "a.jsonl", texts, field="body")
    Dataset.from_dict({"text": texts}).to_parquet(str(tmp_path / "a.parquet"))
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "txt").mkdir()
    for i, text in enumerate(texts):  # one .txt file is one document, line breaks included
        (tmp_path / "txt" / f"{i}.txt").write_text(text.replace(" ", "\n", 1))
    (tmp_path / "txt" / "README.md").write_text("ignored")
    Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))  # .arrow shards + json metadata
    sources = [("a.jsonl", "body"), ("a.parquet", "text"), ("a.jsonl.gz", "text"), ("txt", "text"), ("saved", "text")]
    for path, field in sources:
        docs, eval_docs = load_documents(config(tmp_path / path, tmp_path, text_field=field))
        assert eval_docs is None and docs.column_names == [field]
        assert sorted(t.replace("\n", " ") for t in docs[field]) == sorted(texts), path


def test_eval_fraction_split_is_disjoint_and_complete(tmp_path):
    texts = make_texts(40)
    path = write_jsonl(tmp_path / "a.jsonl", texts)
    for streaming in (False, True):
        train, held_out = load_documents(config(path, tmp_path, eval_fraction=0.25, streaming=streaming))
        train, held_out = [r["text"] for r in train], [r["text"] for r in held_out]
        assert set(train).isdisjoint(held_out) and sorted(train + held_out) == sorted(texts)
        assert len(held_out) == 10 if not streaming else 0 < len(held_out) < 40


def test_eval_path_and_packed_eval_rows(tmp_path, tokenizer):
    train_texts, eval_texts = make_texts(10, seed=1), make_texts(3, seed=2)
    cfg = config(
        write_jsonl(tmp_path / "train.jsonl", train_texts), tmp_path,
        eval_path=str(write_jsonl(tmp_path / "eval.jsonl", eval_texts)), eval_fraction=0.5,
    )
    train, held_out = build_datasets(cfg, tokenizer)
    assert sorted(split_at_eos(train)) == sorted(tuple(token_ids(t)) for t in train_texts)
    assert split_at_eos(held_out) == [tuple(token_ids(t)) for t in eval_texts]  # eval keeps its order
    assert_well_packed(list(held_out), [token_ids(t) for t in eval_texts], cfg.seq_len)


# -- build_datasets: determinism and streaming --------------------------------------------------


def test_build_is_deterministic_per_seed_and_complete(tmp_path, tokenizer):
    texts = make_texts()
    path = write_jsonl(tmp_path / "a.jsonl", texts)
    rows = {seed: list(build_datasets(config(path, tmp_path, seed=seed), tokenizer)[0]) for seed in (0, 1)}
    again = build_datasets(config(path, tmp_path, seed=0), tokenizer)[0]
    assert list(again) == rows[0] and rows[0] != rows[1]
    for seed_rows in rows.values():
        docs = split_at_eos(seed_rows)
        assert sorted(docs) == sorted(tuple(token_ids(t)) for t in texts)
        assert_well_packed(seed_rows, [list(d) for d in docs], 16)
    assert again.features["input_ids"].feature.dtype == "int32"


def test_streaming_matches_map_style(tmp_path, tokenizer):
    texts = make_texts()
    path = write_jsonl(tmp_path / "a.jsonl", texts)
    # Same document order (no shuffle): tokenising and packing give identical rows.
    per_mode = {}
    for streaming in (False, True):
        cfg = config(path, tmp_path, streaming=streaming)
        token_docs = [row["input_ids"] for row in tokenize_corpus(load_documents(cfg)[0], tokenizer, cfg)]
        per_mode[streaming] = list(pack_documents(token_docs, cfg.seq_len, PAD))
    assert per_mode[True] == per_mode[False]
    # Shuffled end to end: a buffer shuffle orders documents differently, the tokens are the same.
    built = {s: list(build_datasets(config(path, tmp_path, streaming=s), tokenizer)[0]) for s in (False, True)}
    assert len(built[True]) == len(built[False])
    assert sorted(split_at_eos(built[True])) == sorted(split_at_eos(built[False]))
    assert list(build_datasets(config(path, tmp_path, streaming=True), tokenizer)[0]) == built[True]


# -- bad input ----------------------------------------------------------------------------------


def one_line_error(fn, match):
    with pytest.raises(ValueError, match=match) as err:
        fn()
    assert "\n" not in str(err.value)


def test_bad_config_values(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", make_texts(3))
    one_line_error(config(path, tmp_path, seq_len=1).validate, "^data.seq_len: must be an integer >= 2")
    one_line_error(config(path, tmp_path, eval_fraction=1.0).validate, r"^data.eval_fraction: must be in \[0, 1\)")
    one_line_error(config(path, tmp_path, eval_fraction=-0.1).validate, "eval_fraction")
    one_line_error(config(path, tmp_path, min_doc_len=-1).validate, "min_doc_len")
    one_line_error(config(tmp_path / "missing.jsonl", tmp_path).check_files, "path: no such file or folder .*missing")
    one_line_error(config(tmp_path / "nodir", tmp_path).check_files, "path: no such file or folder .*nodir")
    one_line_error(config(path, tmp_path, eval_path=str(tmp_path / "gone.jsonl")).check_files, "eval_path: no such file")
    (tmp_path / "empty_dir").mkdir()
    one_line_error(config(tmp_path / "empty_dir", tmp_path).check_files, "holds no .*files")
    (tmp_path / "notes.md").write_text("x")
    one_line_error(config(tmp_path / "notes.md", tmp_path).check_files, "is not one of")


def test_bad_corpus(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", make_texts(3), field="body")
    one_line_error(lambda: load_documents(config(path, tmp_path)), r"no column 'text'; columns: \['body', 'meta'\]")
    one_line_error(lambda: load_documents(config(path, tmp_path, streaming=True)), "no column 'text'")
    (tmp_path / "empty.jsonl").write_text("")
    one_line_error(lambda: load_documents(config(tmp_path / "empty.jsonl", tmp_path)), "holds no documents")
    short = config(path, tmp_path, text_field="body", min_doc_len=10_000)
    one_line_error(lambda: build_datasets(short, tokenizer), "no training documents left after dropping .* 10000")
    stream = config(path, tmp_path, text_field="body", min_doc_len=10_000, streaming=True)
    one_line_error(lambda: list(build_datasets(stream, tokenizer)[0]), "no documents left to pack")
    one_doc = config(write_jsonl(tmp_path / "one.jsonl", ["w1"]), tmp_path, eval_fraction=0.1)
    one_line_error(lambda: load_documents(one_doc), "leaves none to train on")
    no_eos = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    one_line_error(lambda: build_datasets(config(path, tmp_path, text_field="body"), no_eos), "no eos_token")


def test_unknown_hub_name(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/typo' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr("ttt_adapt.data.text.load_dataset", offline)
    one_line_error(lambda: load_documents(config("someone/typo", tmp_path)), "neither a local file/folder nor .* hub")
