"""Checkpoints (`ttt_adapt.training.checkpoints`): a resumed run reproduces the uninterrupted one bit for bit,
the last K are kept, incomplete ones are never resumed."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import checkpoint_weights, load, metrics

from ttt_adapt.pipeline import adapt
from ttt_adapt.training.checkpoints import latest_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(files, tmp_path):
    """4 steps == 2 steps, stop, resume, 2 more (cosine schedule, LoRA dropout RNG, eval in between)."""
    train_cfg = {"max_steps": 4, "save_every": 2, "keep_last": 3, "eval_every": 2, "lr": 5e-3,
                 "lora": {"r": 4, "dropout": 0.1}, "warmup_steps": 1}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = load(files, tmp_path / "a", train=train_cfg)
    adapt(whole)
    resumed = load(files, tmp_path / "b", train=train_cfg)
    Path(resumed.train.output_dir).mkdir()
    shutil.copytree(Path(whole.train.output_dir) / "checkpoint-2", Path(resumed.train.output_dir) / "checkpoint-2")
    summary = adapt(resumed)
    assert summary["step"] == 4
    a, b = checkpoint_weights(whole, 4), checkpoint_weights(resumed, 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = {m["step"]: m["loss"] for m in metrics(whole) if "loss" in m}
    assert {m["step"]: m["loss"] for m in metrics(resumed) if "loss" in m} == {3: losses[3], 4: losses[4]}
    assert [m["step"] for m in metrics(whole) if "eval_loss" in m] == [2, 4]


def test_checkpoints_are_rotated_and_incomplete_ones_ignored(files, tmp_path):
    recipe = load(files, tmp_path, train={"max_steps": 3, "save_every": 1, "keep_last": 2})
    adapt(recipe)
    out = Path(recipe.train.output_dir)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-2", "checkpoint-3"]
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["rows"] == 3 * 4
    (out / "checkpoint-9").mkdir()  # a crash mid-save leaves a folder without trainer_state.json
    (out / ".tmp-checkpoint-4").mkdir()
    assert latest_checkpoint(out).name == "checkpoint-3"
