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


# ---------------------------------------------------------------------------------------------- resuming with changes


def test_resume_applies_the_changed_recipe_and_logs_the_applied_lr(files, tmp_path, capsys):
    """2 steps at lr 1e-2, then the same run with train.lr=1e-30 up to step 4: the optimizer state restored from
    checkpoint-2 must not bring its own learning rate back (the weights stay put) and the logged lr is the one
    applied; the change is printed."""
    from ttt_adapt.training.loop import lr_factor

    adapt(load(files, tmp_path, train={"warmup_steps": 1}))
    capsys.readouterr()
    resumed = load(files, tmp_path, ["train.lr=1e-30", "train.max_steps=4", "train.weight_decay=0.5"],
                   train={"warmup_steps": 1})
    adapt(resumed)
    out = capsys.readouterr().out
    assert ("resuming checkpoint-2 with a changed recipe: train.max_steps 2 -> 4, train.lr 0.01 -> 1e-30, "
            "train.weight_decay 0.0 -> 0.5") in out, out
    before, after = checkpoint_weights(resumed, 2), checkpoint_weights(resumed, 4)
    assert max(float((after[k] - before[k]).abs().max()) for k in before) < 1e-12
    lines = {m["step"]: m for m in metrics(resumed) if "loss" in m}
    for step in (3, 4):
        assert lines[step]["lr"] == pytest.approx(1e-30 * lr_factor(step, resumed), rel=1e-12)
        assert lines[step]["ttt_param_lr"] == pytest.approx(1e-30 * lr_factor(step, resumed), rel=1e-12)
    # weight decay 0.5 is applied too: a decayed matrix shrinks by lr * wd (1e-30 * 0.5: nothing in fp32), and the
    # optimizer of a resumed run holds the recipe's values
    state = torch.load(Path(resumed.train.output_dir) / "checkpoint-4" / "optimizer.bin", weights_only=True)
    groups = {g["name"]: g for g in state["param_groups"]}
    assert groups["ttt"]["weight_decay"] == 0.5 and groups["ttt_no_decay"]["weight_decay"] == 0.0
    assert groups["ttt"]["base_lr"] == 1e-30


def test_resume_refuses_changes_it_cannot_honour(files, tmp_path, capsys):
    from conftest import adapt_main, recipe_dict, write_recipe

    path = write_recipe(tmp_path / "tiny.yaml", recipe_dict(files, tmp_path, max_steps=1))
    assert adapt_main()([str(path)]) == 0
    capsys.readouterr()
    for override, named in (("ttt.chunk_size=16", "ttt.chunk_size: "), ("model.dtype=bfloat16", "model.dtype: "),
                            ("data.seq_len=64", "data.seq_len: "), ("train.trainable=full", "train.trainable: "),
                            ("train.lora.r=4", "train.lora.r: "), ("train.seed=1", "train.seed: ")):
        assert adapt_main()([str(path), "train.max_steps=2", override]) == 2, override
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"adapt.py: error: {named}") and "cannot change it" in err and "\n" not in err, err
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-1"
    # the TTT learning-rate warmup and update clipping are honoured
    assert adapt_main()([str(path), "train.max_steps=2", "ttt.lr_warmup_steps=4", "ttt.clip_update_norm=0.5"]) == 0
    assert "with a changed recipe: train.max_steps 1 -> 2, ttt.clip_update_norm None -> 0.5, ttt.lr_warmup_steps 0 -> 4" \
        in capsys.readouterr().out


def test_resume_with_a_huge_lr_diverges_cleanly(files, tmp_path, capsys):
    """2 steps at lr 1e-2, then train.lr=1e38 train.ttt_lr=1e38: exit 3, one line, checkpoint-2 kept, nothing
    non-finite on disk, no export."""
    from conftest import adapt_main, nonfinite_tensors, recipe_dict, write_recipe

    raw = recipe_dict(files, tmp_path)
    raw["export"] = {"dir": str(tmp_path / "export"), "dtype": "float32"}
    path = write_recipe(tmp_path / "tiny.yaml", raw)
    assert adapt_main()([str(path), "export.dir=null"]) == 0
    capsys.readouterr()
    assert adapt_main()([str(path), "train.max_steps=4", "train.lr=1e38", "train.ttt_lr=1e38"]) == 3
    err = capsys.readouterr().err.strip()
    last, run = err.splitlines()[-1], tmp_path / "run"
    assert last.startswith("adapt.py: error: training diverged at step ") and "Traceback" not in err, err
    assert f"the last good checkpoint is {run / 'checkpoint-2'}" in last
    assert [p.name for p in run.iterdir() if p.is_dir()] == ["checkpoint-2"]
    assert nonfinite_tensors(run) == [] and not (tmp_path / "export").exists()


# ---------------------------------------------------------------------------------------------- the best checkpoint


def test_the_best_checkpoint_survives_retention_and_is_exported(files, tmp_path, capsys):
    """lr 1 on every weight, no clipping (spikes only warned): the eval loss is lowest after step 1 and rises. With
    keep_last 1, checkpoint-1 is kept as the best; `export.checkpoint: best` and `export.py --best` export it and
    the model card names its step."""
    from conftest import adapt_main, recipe_dict, script_main, write_recipe
    from safetensors.torch import load_file

    raw = recipe_dict(files, tmp_path)
    raw["export"] = {"dir": str(tmp_path / "export"), "dtype": "float32", "checkpoint": "best"}
    path = write_recipe(tmp_path / "tiny.yaml", raw)
    overrides = ["train.trainable=full", "train.lr=1", "ttt.clip_update_norm=null", "train.clip_grad_norm=null",
                 "train.max_steps=4", "train.save_every=1", "train.keep_last=1", "train.on_spike=warn"]
    assert adapt_main()([str(path), *overrides]) == 0
    run = tmp_path / "run"
    states = {p.name: json.loads((p / "trainer_state.json").read_text()) for p in run.iterdir() if p.is_dir()}
    evals = {m["step"]: m["eval_loss"] for m in metrics(load(files, tmp_path)) if "eval_loss" in m}
    assert sorted(evals) == [1, 2, 3, 4]  # every checkpoint is evaluated (keep_best: on, as the run has eval data)
    best = min(evals, key=evals.get)
    assert best < 4 and f"checkpoint-{best}" in states and "checkpoint-4" in states
    assert states["checkpoint-4"]["best_checkpoint"] == best and states[f"checkpoint-{best}"]["eval_loss"] == evals[best]
    exported = load_file(tmp_path / "export" / "model.safetensors")
    trained = load_file(run / f"checkpoint-{best}" / "model.safetensors")
    assert all(torch.equal(exported[k], trained[k]) for k in trained)
    card = (tmp_path / "export" / "README.md").read_text()
    assert f"| checkpoint | checkpoint-{best} (step {best}, the lowest eval loss of the run) |" in card

    export = script_main("export")
    capsys.readouterr()
    assert export(["--checkpoint", str(run), "--best", "--out", str(tmp_path / "cli"), "--dtype", "float32"]) == 0
    assert f"step {best}, the lowest eval loss" in (tmp_path / "cli" / "README.md").read_text()
    assert export(["--checkpoint", str(run / "checkpoint-4"), "--best", "--out", str(tmp_path / "x")]) == 2
    assert "--best picks a checkpoint of a run" in capsys.readouterr().err
