"""Conversations as training rows (ttt_adapt.data.chat, ttt_adapt.data.mix): assistant-only labels from the chat
template's generation marks, whole conversations packed without crossing, bad rows, text + chat mixes."""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from ttt_adapt._util import RecipeError
from ttt_adapt.data.chat import check_chat_template, end_of_turn_id, render, set_chat_template
from ttt_adapt.data import DataConfig, DataSource, pack_documents
from ttt_adapt.data.mix import build_datasets, pack_units
from ttt_adapt.loss import IGNORE_INDEX

ASSETS = Path(__file__).parents[1] / "ttt_adapt" / "assets"
TEMPLATE = ASSETS / "chat" / "chat_template.jinja"


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", tmp_path / "default_cache")


@pytest.fixture(scope="module")
def tokenizer():
    tok = AutoTokenizer.from_pretrained(ASSETS / "tiny_qwen3_base")
    set_chat_template(tok, TEMPLATE)
    return tok


def conversation(i: int, turns: int = 2) -> list[dict]:
    messages = [{"role": "system", "content": "Be brief."}] if i % 2 else []
    for t in range(turns):
        messages += [{"role": "user", "content": f"Question {i}.{t}: what is {i} plus {t}?"},
                     {"role": "assistant", "content": f"It is {i + t}."}]
    return messages


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def chat_config(path, tmp_path, **overrides):
    settings = {"format": "chat", "eval_fraction": 0.0, "seq_len": 128, "cache_dir": str(tmp_path / "cache"),
                **overrides}
    return DataConfig(path=str(path), **settings)


def labelled_text(tokenizer, row) -> list[str]:
    """The labelled stretches of a packed row, decoded (labels as in the row: unshifted)."""
    spans, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    return spans + ([tokenizer.decode(current)] if current else [])


def test_only_what_the_assistant_says_is_labelled_end_of_turn_included(tokenizer):
    ids, mask = render(tokenizer, conversation(3), {})
    said = [tokenizer.decode([t for t, m in zip(ids, mask) if m])]
    assert said == ["It is 3.<|endoftext|>It is 4.<|endoftext|>"]
    assert end_of_turn_id(tokenizer, {}) == tokenizer.eos_token_id
    check_chat_template(tokenizer, {})


def test_rows_hold_whole_conversations_with_assistant_labels_only(tokenizer, tmp_path):
    convs = [conversation(i, turns=1 + i % 3) for i in range(12)]
    path = write_rows(tmp_path / "chat.jsonl", [{"messages": m} for m in convs])
    rows = list(build_datasets(chat_config(path, tmp_path, seq_len=160), tokenizer)[0])
    lengths = sorted(len(render(tokenizer, m, {})[0]) for m in convs)
    seen = []
    for row in rows:
        assert all(len(row[k]) == 160 for k in row)
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        pieces = [(a, b) for a, b in zip(starts, starts[1:] + [160])]
        for a, b in pieces:
            if row["attention_mask"][a]:
                assert row["position_ids"][a:b] == list(range(b - a)) and row["labels"][a] == IGNORE_INDEX
                seen.append(b - a)
            else:  # padding closes a row that the next conversation does not fit
                assert set(row["labels"][a:b]) == {IGNORE_INDEX} and b == 160
        for span in labelled_text(tokenizer, row):
            assert span.startswith("It is ") and span.endswith("<|endoftext|>")
    assert max(lengths) <= 160 and len(rows) > 1
    assert sorted(seen) == lengths  # every conversation whole, none split or lost
    assert sum(len(labelled_text(tokenizer, r)) for r in rows) == sum(len(m) // 2 for m in convs)


def test_prompt_completion_rows_and_template_kwargs(tokenizer, tmp_path):
    path = write_rows(tmp_path / "pc.jsonl", [
        {"prompt": [{"role": "user", "content": "Name a colour."}],
         "completion": [{"role": "assistant", "content": "Teal."}]},
        {"prompt": "Name a bird.", "completion": "Heron."},
    ])
    rows = list(build_datasets(chat_config(path, tmp_path), tokenizer)[0])
    assert sorted(s for r in rows for s in labelled_text(tokenizer, r)) == ["Heron.<|endoftext|>", "Teal.<|endoftext|>"]
    tok = AutoTokenizer.from_pretrained(ASSETS / "tiny_qwen3_base")
    marked = "message['content'] + eos_token -}}{%- endgeneration"
    tok.chat_template = TEMPLATE.read_text().replace(marked, "(prefix or '') + " + marked)
    rows = list(build_datasets(chat_config(path, tmp_path, chat_template_kwargs={"prefix": "Sure: "}), tok)[0])
    assert sorted(s for r in rows for s in labelled_text(tok, r))[0] == "Sure: Heron.<|endoftext|>"


BAD_ROWS = [
    ({"messages": [{"role": "user", "content": "hi"}]}, "has no assistant turn"),
    ({"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     "message 0 has unknown role 'wizard'"),
    ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "yo"}]},
     r"message 0 \(user\) has no text content"),
    ({"text": "a plain document"}, "holds neither `messages` nor `prompt` and `completion`"),
]


@pytest.mark.parametrize("bad, reason", BAD_ROWS)
def test_a_bad_row_is_one_line_naming_it_or_skipped_and_counted(tokenizer, tmp_path, bad, reason):
    rows = [{"messages": conversation(i)} for i in range(5)]
    rows.insert(3, bad)
    path = write_rows(tmp_path / "chat.jsonl", rows)
    with pytest.raises(ValueError, match=rf"^data.path: row 3: {reason}.*on_bad_row: skip") as e:
        build_datasets(chat_config(path, tmp_path), tokenizer)
    assert "\n" not in str(e.value)
    logged = []
    packed = build_datasets(chat_config(path, tmp_path, on_bad_row="skip"), tokenizer, log=logged.append)[0]
    assert sum(len(labelled_text(tokenizer, r)) for r in packed) == 5 * 2
    assert len(logged) == 1 and "6 conversations, 1 bad ones skipped (first: row 3: " in logged[0], logged


def test_long_conversations_are_cut_at_seq_len_and_counted(tokenizer, tmp_path):
    long = conversation(0, turns=12)
    path = write_rows(tmp_path / "chat.jsonl", [{"messages": long}, {"messages": conversation(1)}])
    logged = []
    rows = list(build_datasets(chat_config(path, tmp_path, seq_len=96), tokenizer, log=logged.append)[0])
    full, _ = render(tokenizer, long, {})
    assert rows[0]["input_ids"] == full[:96] or rows[1]["input_ids"] == full[:96]
    assert "1 longer than data.seq_len=96 cut there" in logged[0]


def test_a_template_without_generation_marks_is_refused_in_one_line(tmp_path):
    tok = AutoTokenizer.from_pretrained(ASSETS / "tiny_qwen3_base")
    path = write_rows(tmp_path / "chat.jsonl", [{"messages": conversation(0)}])
    with pytest.raises(ValueError, match="^data.chat_template_path: the tokenizer has no chat template"):
        build_datasets(chat_config(path, tmp_path), tok)
    tok.chat_template = TEMPLATE.read_text().replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
    with pytest.raises(ValueError, match=r"does not mark assistant spans with \{% generation %\}"):
        build_datasets(chat_config(path, tmp_path), tok)


def test_text_units_pack_exactly_as_documents_do():
    docs = [list(range(3, 3 + n)) for n in (5, 17, 2, 40, 9)]
    assert list(pack_units(((d, d, False) for d in docs), 16, 1)) == list(pack_documents(docs, 16, 1))


def test_a_mix_draws_by_weight_and_keeps_each_format(tokenizer, tmp_path):
    text = write_rows(tmp_path / "text.jsonl", [{"text": f"plain document number {i} " * 3} for i in range(40)])
    chat = write_rows(tmp_path / "chat.jsonl", [{"messages": conversation(i)} for i in range(40)])
    mix = [DataSource(str(text), "text", 3.0), DataSource(str(chat), "chat", 1.0)]
    cfg = DataConfig(mix=mix, eval_fraction=0.1, seq_len=64, cache_dir=str(tmp_path / "cache"))
    train, held = build_datasets(cfg, tokenizer)
    rows = list(train)
    labels = [lab for r in rows for lab in r["labels"] if lab != IGNORE_INDEX]
    said = sum(len(labelled_text(tokenizer, r)) for r in rows if "It is" in tokenizer.decode(r["input_ids"]))
    assert said > 0 and len(labels) > 0
    again = list(build_datasets(cfg, tokenizer)[0])
    assert again == rows  # seeded
    assert held is not None and len(held) > 0


def test_recipe_schema_for_chat_and_mix():
    ok = DataConfig(mix=[DataSource("a.jsonl", "text", 0.7), DataSource("b.jsonl", "chat", 0.3)]).validate()
    assert ok.uses_chat() and [k for k, _ in ok.sources()] == ["mix[0].path", "mix[1].path"]
    for cfg, message in [
        (DataConfig(path="a.jsonl", format="dialogue"), "^data.format: must be one of text, chat"),
        (DataConfig(path="a.jsonl", on_bad_row="ignore"), "^data.on_bad_row: must be one of error, skip"),
        (DataConfig(), r"^data.path: missing \(required, or list the sources in data.mix\)"),
        (DataConfig(path="a.jsonl", mix=[DataSource("b.jsonl")]), "^data.path: set either data.path or data.mix"),
        (DataConfig(mix=[DataSource("b.jsonl", weight=0.0)]), r"^data.mix\[0\].weight: must be > 0"),
        (DataConfig(mix=[DataSource("b.jsonl", format="html")]), r"^data.mix\[0\].format: must be one of"),
    ]:
        with pytest.raises(RecipeError, match=message):
            cfg.validate()
