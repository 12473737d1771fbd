"""Memory measured directly: answer tokens' distance back to the fact, the no-recall flag (fires when the adapted
model's answers are not below the base's, not when they are), the in-length section built from the losses the
evaluation already has, a user's recall file (parsing, one-line errors, truncation from the front, answers not in
the document), the report's warnings, table and plot, the CLI's --recall-file, and the memory horizon."""

import json

import pytest
import torch
from eval_fixtures import byte_tokenizer, files  # noqa: F401 (a fixture)

from ttt_adapt.eval import EvalError, EvalSettings, markdown_table, run_evaluation
from ttt_adapt.eval.loss_by_position import answer_distances
from ttt_adapt.eval.memory import horizon_line, memory_horizon
from ttt_adapt.eval.recall import (
    IN_LENGTH,
    read_recall_file,
    recall_by_distance,
    tokenize_recall_rows,
)
from ttt_adapt.eval.report import plot_recall_by_distance, report_warnings
from ttt_adapt.eval.run import in_length_recall

pytestmark = pytest.mark.usefixtures("one_thread")


def _offsets(tokenizer, text):
    return [tuple(o) for o in tokenizer(text, return_offsets_mapping=True)["offset_mapping"]]


def test_answer_distance_counts_tokens_back_to_the_last_mention():
    tokenizer = byte_tokenizer()  # one token per byte: token j holds character j
    text = "code 4821. other code 4821. filler filler. Q: code? A: 4821"
    a = len(text) - 4
    found = answer_distances(text, _offsets(tokenizer, text), [(a, len(text))])
    last = text.rfind("4821", 0, a) + 3  # the token holding the last mention's last character
    assert found == [(a + k, a - last) for k in range(4)]
    # only the first mention may count (`within`): further back
    first_end = text.find("4821") + 3
    found = answer_distances(text, _offsets(tokenizer, text), [(a, len(text))], within=(0, 10))
    assert found[0] == (a, a - first_end)
    assert answer_distances(text, _offsets(tokenizer, text), [(a, len(text))], within=(10, 12))[0] == (a, -1)


def _rows(distances):
    """Two documents of 8 tokens; the answer tokens at the given (row, column) -> distance."""
    rows = {"input_ids": torch.zeros(2, 8, dtype=torch.long), "attention_mask": torch.ones(2, 8, dtype=torch.bool),
            "recall": torch.zeros(2, 8, dtype=torch.bool), "recall_distance": torch.full((2, 8), -1)}
    for (i, j), d in distances.items():
        rows["recall"][i, j], rows["recall_distance"][i, j] = True, d
    return rows


ANSWERS = {(0, 3): 2, (1, 3): 2, (0, 6): 5, (1, 7): 6}  # training length 8: bins 0-1, 1-4, 4-8


def test_flag_fires_when_answers_are_not_below_the_base_and_not_when_they_are():
    rows = _rows(ANSWERS)
    base = torch.full((2, 8), 2.0)
    better = {"base": base, "adapted": base - 0.5 + 0.01 * torch.rand(2, 8, generator=torch.Generator().manual_seed(0))}
    section = recall_by_distance(better, rows, 8)
    assert section["bins"] == [[1, 4], [4, 8]] and section["answer_tokens_per_bin"] == [2, 2]
    assert section["flag"] is None and all(c < -20 for c in section["change_vs_base_percent"])
    assert "the fast weights recall" in markdown_table({"bins": [0, 8], "base": {"loss_by_position": [2.0]},
                                                        "adapted": {"loss_by_position": [1.5]},
                                                        "recall_by_distance": section})
    worse = {"base": base, "adapted": base.clone()}
    worse["adapted"][:, 6:] = 2.5  # the far answers: 25 % worse than the base
    section = recall_by_distance(worse, rows, 8)
    assert section["flag"] == "no recall through the fast weights: answers +0.0 % at 1-4, +25.0 % at 4-8 tokens back vs base"
    report = {"bins": [0, 8], "base": {"loss_by_position": [2.0]}, "adapted": {"loss_by_position": [2.0]},
              "recall_by_distance": section}
    assert f"**WARNING: {section['flag']}**" in markdown_table(report)  # report.md and the model card
    assert report_warnings(report) == [f"{section['flag']} ({IN_LENGTH})"]


def test_in_length_section_reuses_the_losses_and_logs_the_flag():
    rows = _rows(ANSWERS)
    base = torch.full((2, 8), 2.0)
    controls = {"adapted_swapped_state": torch.full((1, 8), 3.0), "adapted_no_state": base.clone(), "paired": [1]}
    logged = []
    settings = EvalSettings(seq_len=8)
    section = in_length_recall(base, base + 1.0, controls, rows, settings, logged.append)
    assert section["adapted_swapped_state"] == [3.0, 3.0] and section["adapted_no_state"] == [2.0, 2.0]
    assert section["own_minus_swapped"][0] is None  # one paired document: no interval
    assert section["flag"].startswith("no recall through the fast weights: answers +50.0 % at 1-4")
    assert logged == [f"evaluate: WARNING: {section['flag']} ({IN_LENGTH})"]
    logged.clear()
    assert in_length_recall(base, base - 1.0, controls, rows, settings, logged.append)["flag"] is None and not logged
    no_answers = _rows({})
    assert in_length_recall(base, base, controls, no_answers, settings, logged.append) is None


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


ROW = {"document": "The vault Kor holds code 4821. It rained.", "question": "Q: What code opens vault Kor? A:",
       "answer": "4821"}


@pytest.mark.parametrize("content,words", [
    (None, "eval.recall_file: no such file"),
    ([ROW, "{not json"], "line 2: not JSON"),
    ([ROW, "", {"document": "x", "question": "y"}], "line 3: missing field 'answer'"),
    ([[1, 2]], "line 1: expected a JSON object"),
    ([{**ROW, "answer": 4821}], "line 1: field 'answer' must be a string"),
    ([{**ROW, "answer": " "}], "line 1: field 'answer' is empty"),
    ([""], "holds no rows"),
])
def test_bad_recall_file_is_one_line_naming_file_and_line(tmp_path, content, words):
    path = tmp_path / "recall.jsonl"
    if content is not None:
        _write(path, content)
    with pytest.raises(EvalError) as e:
        read_recall_file(path)
    assert words in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_recall_rows_mark_answers_truncate_from_the_front_and_count_what_is_left_out(tmp_path):
    tokenizer = byte_tokenizer()
    missing = {**ROW, "answer": "9999"}
    long = {**ROW, "document": ROW["document"] + " Then" + " more words" * 20 + "."}
    records = read_recall_file(_write(tmp_path / "r.jsonl", [ROW, missing, long]))
    rows, counts = tokenize_recall_rows(tokenizer, records, 512, pad_id=1)
    assert counts == {"truncated": 0, "answer_not_in_document": 1, "answer_cut_off": 0}
    text = ROW["document"] + "\n\n" + ROW["question"] + " " + ROW["answer"]
    assert tokenizer.decode(rows["input_ids"][0][rows["attention_mask"][0]]) == text
    assert tokenizer.decode(rows["input_ids"][0][rows["recall"][0]]) == "4821"
    mention_end = text.find("4821") + 3
    assert rows["recall_distance"][0][rows["recall"][0]].tolist() == [len(text) - 4 - mention_end] * 4
    assert not rows["recall"][1].any()  # answer not in the document: left out of the bins
    # cut to 60 tokens (of 80, 80, 306): question and answer stay, the documents lose their front (row 2 its mention)
    rows, counts = tokenize_recall_rows(tokenizer, records, 60, pad_id=1)
    assert counts == {"truncated": 3, "answer_not_in_document": 1, "answer_cut_off": 1}
    assert rows["attention_mask"].sum(1).tolist() == [60, 60, 60]
    assert tokenizer.decode(rows["input_ids"][0]) == text[20:]
    assert rows["recall_distance"][0][rows["recall"][0]].tolist() == [len(text) - 4 - mention_end] * 4  # unchanged
    kept = tokenizer.decode(rows["input_ids"][2])
    assert kept.endswith(ROW["question"] + " 4821") and "4821." not in kept and not rows["recall"][2].any()
    with pytest.raises(EvalError, match="fast tokenizer"):
        tokenize_recall_rows(type("Slow", (), {"is_fast": False})(), records, 60, 1)


def test_report_holds_in_length_and_recall_file_sections_table_plot_and_warnings(files, tmp_path):
    records = [{"document": f"Vault Kor{i} holds code {4000 + i}. " + "The bridge was narrow. " * (1 + 2 * i),
                "question": f"Q: What code opens vault Kor{i}? A:", "answer": str(4000 + i)} for i in range(4)]
    records.append({"document": "Nothing here.", "question": "Q: code? A:", "answer": "1234"})
    recall_file = _write(tmp_path / "recall.jsonl", records)
    settings = EvalSettings(corpus=str(files["corpus"]), seq_len=256, bin_edges=[0, 64, 128, 256], lengths=[],
                            tasks=[], max_length=0, batch_size=4, recall_file=str(recall_file))
    logged = []
    report = run_evaluation(settings, files["base"], files["adapted"], tmp_path / "out", log=logged.append)
    inside = report["recall_by_distance"]  # the corpus's query answers, documents of the training length
    assert inside["train_length"] == 256 and sum(inside["answer_tokens_per_bin"]) > 0
    assert {"base", "adapted", "adapted_swapped_state", "adapted_no_state", "own_minus_swapped",
            "own_minus_no_state"} <= set(inside)
    section = report["recall_file"]
    assert (section["rows"], section["rows_measured"], section["answer_not_in_document"]) == (5, 4, 1)
    assert (section["max_tokens"], section["answer_cut_off"]) == (256, 0)  # max_length 0: rows of seq_len tokens
    rbd = section["recall_by_distance"]
    assert sum(rbd["documents_per_bin"]) >= 4 and "adapted_swapped_state" not in rbd and rbd["adapted_no_state"]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["warnings"] == report["warnings"]
    assert report["warnings"] == report_warnings(report)
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"On the {IN_LENGTH}" in md and "Recall file recall.jsonl: 5 rows, 4 measured (1 answer not in the" in md
    assert md.count("Answer-token loss by distance back to the fact") == 2
    for line in report["warnings"]:
        assert f"evaluate: WARNING: {line}" in logged
    assert (tmp_path / "out" / "recall_by_distance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_has_one_panel_per_section_and_red_flag_titles(tmp_path, monkeypatch):
    import matplotlib.figure

    rows = _rows(ANSWERS)
    base = torch.full((2, 8), 2.0)
    good = recall_by_distance({"base": base, "adapted": base - 0.5}, rows, 8)
    bad = recall_by_distance({"base": base, "adapted": base + 0.5}, rows, 8)
    titles = []
    saved = matplotlib.figure.Figure.savefig

    def spy(fig, path, **kw):
        titles.extend((ax.get_title(), ax.title.get_color()) for ax in fig.axes)
        return saved(fig, path, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    report = {"recall_by_distance": good, "long_context": {"recall_by_distance": bad},
              "recall_file": {"recall_by_distance": good}}
    plot_recall_by_distance(report, tmp_path / "r.png")
    assert len(titles) == 3 and (tmp_path / "r.png").is_file()
    assert titles[0][1] == "black" and titles[1][1] == "red" and f"WARNING: {bad['flag']}" in titles[1][0]


def test_cli_recall_file_and_its_errors(files, tmp_path, capsys):
    from conftest import script_main

    main = script_main("evaluate")
    bad = _write(tmp_path / "bad.jsonl", [ROW, {"document": "x"}])
    args = ["--base", files["base"], "--adapted", files["adapted"], "--corpus", files["corpus"], "--out",
            tmp_path / "out", "--seq-len", "256", "--tasks", "none", "--max-length", "0"]
    assert main([str(a) for a in args + ["--recall-file", bad]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}, line 2: missing field 'question'" in err
    assert not (tmp_path / "out").exists()  # refused before any model was loaded
    # fast weights that never change anything (TTT learning rate 0): answers exactly the base's, no recall anywhere
    from ttt_adapt.eval import load_model

    same = load_model(files["adapted"])
    for m in same.modules():
        if hasattr(m, "ttt") and hasattr(m.ttt, "lr"):
            m.ttt.lr.data.zero_()
    same.save_pretrained(tmp_path / "same")
    files["tokenizer"].save_pretrained(tmp_path / "same")
    args[3] = tmp_path / "same"
    good = _write(tmp_path / "good.jsonl", [ROW, {**ROW, "document": "Code 77. " + ROW["document"]}])
    assert main([str(a) for a in args + ["--recall-file", good]]) == 0
    captured = capsys.readouterr()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["recall_file"]["rows_measured"] == 2 and "Recall file good.jsonl" in captured.out
    assert [w.split(" vs base ")[1] for w in report["warnings"]] == [f"({IN_LENGTH})", f"(recall file {good})"]
    assert all(w.startswith("no recall through the fast weights: answers +0.0 % at ") for w in report["warnings"])
    for line in report["warnings"]:
        assert f"evaluate.py: WARNING: {line}" in captured.err and f"**WARNING: {line.split(' (')[0]}**" in captured.out


def _after(*highs):
    return {str(f): {"minus_nothing": None if h is None else {"mean": h - 0.01, "low": h - 0.02, "high": h}}
            for f, h in zip((0, 512, 2048, 8192), highs)}


def test_memory_horizon_is_the_longest_filler_the_state_still_beats_nothing_at():
    assert memory_horizon(_after(-0.03, -0.01, 0.002, -0.01)) == {"horizon": 512, "lost_at": 2048}
    assert memory_horizon(_after(-0.03, -0.01, -0.002, -0.001)) == {"horizon": 8192, "lost_at": None}
    assert memory_horizon(_after(0.01, -0.5, -0.5, -0.5)) == {"horizon": None, "lost_at": 0}
    assert memory_horizon(_after(-0.01, None)) == {"horizon": 0, "lost_at": 512}
    assert horizon_line({"horizon": None, "lost_at": 0}).startswith("none")
    assert horizon_line({"horizon": 512, "lost_at": 2048}) == ("512 tokens (the state beats no state after 512 more "
                                                               "tokens of other text, not after 2048)")


def test_model_card_carries_the_recall_tables_and_flag(files, tmp_path):
    from ttt_adapt.recipe import build_recipe
    from ttt_adapt.eval import load_model
    from ttt_adapt.export.card import render_model_card

    rows = _rows(ANSWERS)
    base = torch.full((2, 8), 2.0)
    section = recall_by_distance({"base": base, "adapted": base + 0.5}, rows, 8)
    report = {"bins": [0, 8], "base": {"loss_by_position": [2.0]}, "adapted": {"loss_by_position": [2.5]},
              "recall_by_distance": section, "recall_file": {
                  "file": "facts.jsonl", "rows": 3, "rows_measured": 2, "answer_not_in_document": 1,
                  "answer_cut_off": 0, "truncated": 0, "max_tokens": 64, "recall_by_distance": section}}
    recipe = build_recipe({"model": {"name_or_path": str(files["base"])}, "data": {"path": str(files["corpus"])},
                           "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1}})
    card = render_model_card(load_model(files["adapted"]).config, recipe, {"step": 1, "tokens": 64},
                             tmp_path / "run" / "checkpoint-1", report=report)
    assert markdown_table(report) in card
    assert card.count(f"**WARNING: {section['flag']}**") == 2  # the documents of the training length, the file
    assert "Recall file facts.jsonl: 3 rows, 2 measured (1 answer not in the document" in card
