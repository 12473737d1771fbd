"""Evaluation past the training length: the bins, the documents, the one-line flag where the adapted model is worse
than its base (it fires on a model whose fast weights grow past what it can read, not on one equal to its base)."""

import dataclasses
import json

import pytest
from eval_fixtures import files  # noqa: F401 (a fixture)

from ttt_adapt.eval import EvalError, EvalSettings, load_model, markdown_table, run_evaluation
from ttt_adapt.eval.long_context import (
    long_bins,
    long_documents,
    measure_long_context,
    worse_than_base,
    worse_within_training_length,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bins_mark_the_training_length_and_double_past_it():
    assert long_bins(1024, 8192) == [0, 128, 512, 1024, 2048, 4096, 8192]
    assert long_bins(1024, 3000) == [0, 128, 512, 1024, 2048, 3000]
    assert long_bins(64, 100) == [0, 8, 32, 64, 100]
    assert long_bins(4, 9) == [0, 1, 2, 4, 8, 9]


def test_synthetic_documents_reach_max_length_and_are_reproducible(files):
    settings = EvalSettings(seq_len=64, max_length=300, long_corpus="synthetic", long_docs=3)
    docs = long_documents(settings, ["short"])
    assert len(docs) == 3 and docs == long_documents(settings, [])
    assert all(len(files["tokenizer"](d)["input_ids"]) >= 300 for d in docs)
    assert long_documents(EvalSettings(seq_len=64, long_docs=2), ["a", "bbb", "cc"]) == ["bbb", "cc"]


def _section(files, adapted, **kw):
    settings = EvalSettings(seq_len=64, max_length=256, long_corpus="synthetic", long_docs=3, batch_size=4, **kw)
    docs = long_documents(settings, [])
    base = load_model(files["base"])
    return measure_long_context(base, adapted, files["tokenizer"], docs, settings, log=lambda m: None)


def test_flag_fires_on_a_collapsing_model_not_on_one_equal_to_its_base(files):
    adapted = load_model(files["adapted"])
    for m in adapted.modules():  # a fast weight that grows with every chunk, far past what a model can read
        if hasattr(m, "ttt") and hasattr(m.ttt, "lr"):
            m.ttt.lr.data.fill_(300.0)
    section = _section(files, adapted)
    assert section["bins"] == [0, 8, 32, 64, 128, 256] and section["documents"] == 3
    assert section["change_vs_base_percent"][0] == 0.0  # the first chunk (16 tokens) reads no fast weight
    assert section["flag"] is not None and section["flag"].startswith("worse than the base past ")
    assert "\n" not in section["flag"] and "trained on 64-token rows" in section["flag"]
    for m in adapted.modules():  # TTT learning rate 0: the adapted model is its base
        if hasattr(m, "ttt") and hasattr(m.ttt, "lr"):
            m.ttt.lr.data.zero_()
    section = _section(files, adapted)
    assert section["flag"] is None and all(abs(c) < 1e-4 for c in section["change_vs_base_percent"])
    assert all(abs(d["mean"]) < 1e-6 for d in section["adapted_minus_base"])


def test_flag_names_the_first_worse_bin_and_the_worst_change():
    section = {"bins": [0, 128, 512, 1024, 2048, 4096, 8192], "train_length": 1024,
               "change_vs_base_percent": [0.0, -1.0, -1.6, 0.5, 34.0, 116.0]}
    assert worse_than_base(section) == ("worse than the base past 1024 tokens: +116.0 % (positions 4096-8192; "
                                        "trained on 1024-token rows)")
    assert worse_within_training_length(section) is None
    section["change_vs_base_percent"] = [0.0, -2.3, -3.2, -3.5, -3.5, -3.5]
    assert worse_than_base(section) is None and worse_within_training_length(section) is None
    section["change_vs_base_percent"] = [0.0, 0.9, 0.5, -2.9, -3.0, -2.9]  # in-length bins: a line of their own
    assert worse_than_base(section) is None
    assert worse_within_training_length(section) == ("worse than the base within the training length on the long "
                                                     "documents: +0.9 % (positions 128-512; trained on 1024-token rows)")


def test_report_table_plot_and_skip(files):
    out = files["root"] / "long"
    settings = EvalSettings(corpus=str(files["corpus"]), seq_len=64, lengths=[], tasks=[], long_corpus="synthetic",
                            max_length=192, long_docs=2, batch_size=4)
    report = run_evaluation(settings, files["base"], files["adapted"], out, log=lambda m: None)
    section = report["long_context"]
    assert section["bins"] == [0, 8, 32, 64, 128, 192]
    assert json.loads((out / "report.json").read_text())["long_context"]["bins"] == section["bins"]
    md = (out / "report.md").read_text()
    assert "| 64-128 * |" in md and "| 0-8 |" in md  # bins past the training length marked
    assert (out / "loss_past_training_length.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for line in (section["flag"], section["worse_within_training_length"]):
        assert (f"WARNING: {line}" in md) == (line is not None)
    # documents that never pass the training length: said so, nothing measured
    short = run_evaluation(dataclasses.replace(settings, long_corpus=None, seq_len=256, max_length=512), files["base"],
                           files["adapted"],
                           files["root"] / "short", log=lambda m: None)
    assert "no held-out document is longer than the training length" in short["long_context"]["skipped"]


@pytest.mark.parametrize("kw,match", [({"max_length": 64}, "max_length: must be longer than seq_len"),
                                      ({"long_docs": 0}, "long_docs")])
def test_bad_settings_one_line(kw, match):
    with pytest.raises(EvalError, match=match):
        EvalSettings.from_dict({"seq_len": 64, **kw})


def test_no_long_measurement_when_max_length_is_zero(files):
    settings = EvalSettings(corpus=str(files["corpus"]), seq_len=64, lengths=[], tasks=[], max_length=0)
    report = run_evaluation(settings, files["base"], files["adapted"], files["root"] / "zero", log=lambda m: None)
    assert "long_context" not in report and "Past the training length" not in markdown_table(report)
