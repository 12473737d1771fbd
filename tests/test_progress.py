"""Progress lines (`ttt_adapt.training.progress`): what metrics.jsonl holds, and when."""

import pytest
from conftest import TTT_LAYERS, load, metrics

from ttt_adapt.pipeline import adapt

pytestmark = pytest.mark.usefixtures("one_thread")


def test_metrics_jsonl(files, tmp_path):
    recipe = load(files, tmp_path, train={"max_steps": 3, "log_every": 2, "eval_every": 2})
    summary = adapt(recipe)
    lines = metrics(recipe)
    steps = [m for m in lines if "loss" in m]
    assert [m["step"] for m in steps] == [2, 3] and summary["metrics"] == steps
    for m in steps:
        assert {"step", "loss", "lr", "tokens", "tokens_per_s", "grad_norm", "ttt_learning_rates"} <= set(m)
        assert sorted(map(int, m["ttt_learning_rates"])) == TTT_LAYERS
        assert m["loss"] > 0 and m["tokens_per_s"] > 0 and m["grad_norm"] > 0
    assert steps[1]["tokens"] > steps[0]["tokens"]
    evals = [m for m in lines if "eval_loss" in m]
    assert [m["step"] for m in evals] == [2, 3] and all(m["eval_tokens"] > 0 for m in evals)
