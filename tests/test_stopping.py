"""How a run stops early (`ttt_adapt.training.stopping`): divergence (one line, exit 3, nothing non-finite
saved, or skipped steps) and preemption (the step in flight checkpointed, exit 75, the same command resumes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from conftest import (DIVERGE, REPO, adapt_main, changed_keys, checkpoint_weights, load, nonfinite_tensors,
                      recipe_dict, strict_metrics, write_recipe)

from ttt_adapt.pipeline import adapt
from ttt_adapt.training.stopping import Diverged

pytestmark = pytest.mark.usefixtures("one_thread")


def test_divergence_stops_with_one_line_and_keeps_the_last_good_checkpoint(files, tmp_path, capsys):
    raw = recipe_dict(files, tmp_path, max_steps=20, warmup_steps=20)  # as recipes/tiny_qwen3.yaml: lr 5e36 at step 1
    raw["export"] = {"dir": str(tmp_path / "export"), "dtype": "float32"}
    path = write_recipe(tmp_path / "tiny.yaml", raw)
    assert adapt_main()([str(path), *DIVERGE]) == 3
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    run = tmp_path / "run"
    assert last.startswith("adapt.py: error: training diverged at step 2: ") and "Traceback" not in err
    # checkpoint-1's weights (lr 5e36 at step 1) gave step 2's loss: set aside, so a rerun does not resume from it,
    # and the message does not tell the user to resume from a checkpoint that does not exist
    assert f"its weights came from a checkpoint now set aside as {run / 'checkpoint-1.diverged'}" in last
    assert last.endswith("no good checkpoint was written before it (lower train.lr or set train.clip_grad_norm, "
                         "then rerun to start over)") and "resume" not in last
    assert [p.name for p in run.iterdir() if p.is_dir()] == ["checkpoint-1.diverged"]  # nothing diverged saved
    assert not (tmp_path / "export").exists()
    assert nonfinite_tensors(run) == [] and len(list(run.rglob("*.safetensors"))) == 1
    lines = [m for m in strict_metrics(run) if "eval_loss" not in m]  # checkpoint-1 was evaluated (keep_best)
    assert [m["step"] for m in lines] == [1, 2]
    assert lines[1]["diverged"] is True and lines[1]["nonfinite"] and all(lines[1][k] is None
                                                                          for k in lines[1]["nonfinite"])


def test_weights_are_checked_finite_before_every_save(files, tmp_path):
    """lr 1e39 overflows the fp32 update: step 1's loss and gradients are finite, the weights after it not."""
    recipe = load(files, tmp_path, [*DIVERGE, "train.lr=1e39"])
    with pytest.raises(Diverged, match=r"^training diverged at step 1: the weights or optimizer state are not "
                                       r"finite; no good checkpoint was written before it \(.*then rerun to start over\)$"):
        adapt(recipe)
    assert [p.name for p in Path(recipe.train.output_dir).iterdir()] == ["metrics.jsonl", "recipe.yaml"]


def poison_step(monkeypatch, bad_step: int):
    """Make the loss (hence every gradient) of step `bad_step` NaN, as a numerical blow-up would."""
    import ttt_adapt.training.loop as train_module

    calls = {"step": 0}
    real_train_step, real_loss_sum = train_module.train_step, train_module.loss_sum

    def train_step(run, step, signals):
        calls["step"] = step
        return real_train_step(run, step, signals)

    def loss_sum(model, local, shard):
        out = real_loss_sum(model, local, shard)
        return out * float("nan") if calls["step"] == bad_step else out

    monkeypatch.setattr(train_module, "train_step", train_step)
    monkeypatch.setattr(train_module, "loss_sum", loss_sum)


def test_skip_mode_drops_the_update_of_a_nonfinite_step_and_goes_on(files, tmp_path, monkeypatch):
    import signal

    handler = signal.getsignal(signal.SIGTERM)
    poison_step(monkeypatch, bad_step=2)
    recipe = load(files, tmp_path, ["train.on_nonfinite=skip", "train.save_every=1", "train.keep_last=5",
                                    "train.max_steps=3"])
    summary = adapt(recipe)
    assert summary["step"] == 3 and signal.getsignal(signal.SIGTERM) is handler  # handlers restored
    first, second = checkpoint_weights(recipe, 1), checkpoint_weights(recipe, 2)
    assert all(torch.equal(first[k], second[k]) for k in first)  # step 2 changed nothing
    assert changed_keys(second, checkpoint_weights(recipe, 3))  # step 3 trained again
    lines = strict_metrics(Path(recipe.train.output_dir))
    skipped = [m for m in lines if m.get("skipped")]
    assert [m["step"] for m in skipped] == [2] and skipped[0]["loss"] is None and "loss" in skipped[0]["nonfinite"]
    assert [m["step"] for m in lines if m.get("loss") is not None] == [1, 3]
    state = json.loads((Path(recipe.train.output_dir) / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["nonfinite_in_a_row"] == 0

    (tmp_path / "stop").mkdir()
    stop = load(files, tmp_path / "stop", ["train.save_every=1", "train.max_steps=3"])  # on_nonfinite: stop
    with pytest.raises(Diverged, match=r"^training diverged at step 2: the loss \(nan\) and the gradient norm "
                                       r"\(nan\) are not finite; its weights came from a checkpoint now set aside "
                                       r"as .*checkpoint-1.diverged; no good checkpoint"):
        adapt(stop)


def test_skip_mode_stops_after_too_many_skips_in_a_row(files, tmp_path, capsys):
    path = write_recipe(tmp_path / "tiny.yaml", recipe_dict(files, tmp_path, max_steps=20, warmup_steps=20))
    overrides = [*DIVERGE, "train.on_nonfinite=skip", "train.max_nonfinite_skips=2"]
    assert adapt_main()([str(path), *overrides]) == 3
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("adapt.py: error: training diverged at step 4: ") and "3 steps in a row" in last
    run = tmp_path / "run"
    # checkpoint-1, the lowest eval loss, is kept besides the last 2 (train.keep_best: on with eval data)
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["checkpoint-1", "checkpoint-2",
                                                                   "checkpoint-3.diverged"]
    assert nonfinite_tensors(run) == []
    lines = [m for m in strict_metrics(run) if "eval_loss" not in m]
    assert [(m["step"], m.get("skipped")) for m in lines if m["step"] > 1] == [(2, True), (3, True), (4, False)]


# ---------------------------------------------------------------------------------------------- preemption


PREEMPT = """
import importlib.util, os, signal, sys
sys.path.insert(0, {repo!r})
import ttt_adapt.training.loop as train_module

take = train_module.RowStream.take
def take_then_signal(self, cursor, count):  # a signal arrives while step {step} is in flight
    if cursor == ({step} - 1) * count and os.environ.get("RANK", "0") == {rank!r}:
        os.kill(os.getpid(), signal.{signal})
    return take(self, cursor, count)
train_module.RowStream.take = take_then_signal

spec = importlib.util.spec_from_file_location("adapt", os.path.join({repo!r}, "scripts", "adapt.py"))
adapt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(adapt)
sys.exit(adapt.main(sys.argv[1:]))
"""


def test_sigterm_checkpoints_the_step_in_flight_and_the_same_command_finishes_bit_exact(files, tmp_path):
    """SIGTERM during step 8 of 40 (checkpoints only at the end): exit 75 with checkpoint-8; rerunning the same
    command logs each step once and ends with the uninterrupted run's weights, bit for bit."""
    settings = {"max_steps": 40, "batch_size": 1, "grad_accum": 1, "save_every": 0, "warmup_steps": 2}
    (tmp_path / "whole").mkdir()
    whole = load(files, tmp_path / "whole", train=settings)
    adapt(whole)
    path = write_recipe(tmp_path / "tiny.yaml", recipe_dict(files, tmp_path, **settings))
    script = tmp_path / "preempt.py"
    script.write_text(PREEMPT.format(repo=str(REPO), step=8, rank="0", signal="SIGTERM"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    killed = subprocess.run([sys.executable, str(script), str(path)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    run = tmp_path / "run"
    assert killed.returncode == 75, killed.stderr[-3000:]
    assert killed.stderr.strip().splitlines()[-1] == (
        f"adapt.py: stopped by SIGTERM after step 8, saved in {run / 'checkpoint-8'}; rerun the same command to resume")
    assert [p.name for p in run.iterdir() if p.is_dir()] == ["checkpoint-8"]
    assert [m["step"] for m in strict_metrics(run)] == list(range(1, 9))

    assert adapt_main()([str(path)]) == 0  # the same command
    assert [m["step"] for m in strict_metrics(run) if "loss" in m] == list(range(1, 41))
    a, b = checkpoint_weights(whole, 40), load_file(run / "checkpoint-40" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_process_stops_at_the_same_step_when_one_gets_the_signal(files, tmp_path):
    """2 gloo processes, one context-parallel group: only rank 1 gets SIGUSR1 (configured), during step 3."""
    raw = recipe_dict(files, tmp_path, max_steps=6, batch_size=1, grad_accum=1, save_every=0,
                      preempt_signals=["SIGTERM", "SIGUSR1"])
    raw["data"]["seq_len"] = 128  # whole 32-token chunks on each of 2 ranks
    raw["parallel"] = {"cp_size": 2}
    path = write_recipe(tmp_path / "tiny.yaml", raw)
    script = tmp_path / "preempt.py"
    script.write_text(PREEMPT.format(repo=str(REPO), step=3, rank="1", signal="SIGUSR1"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(path)]
    # without agreement the rank that stops alone leaves the other waiting in a collective: a timeout
    result = subprocess.run(launch, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    run = tmp_path / "run"
    assert "adapt.py: stopped by a stop signal to another process after step 3" in result.stderr, result.stderr[-3000:]
    assert [p.name for p in run.iterdir() if p.is_dir()] == ["checkpoint-3"]
    assert json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())["step"] == 3
    assert [m["step"] for m in strict_metrics(run)] == [1, 2, 3]


# ---------------------------------------------------------------------------------------------- loss spikes


def test_the_default_spike_guard_fires_on_the_issues_blow_up_and_not_before():
    """Full fine-tuning without clipping, as reported: 2.07 -> 5.4 -> 7.2 -> 13.6 -> 15.0, all finite."""
    from ttt_adapt.recipe import TrainConfig
    from ttt_adapt.training.stopping import spike_ratio

    t = TrainConfig(output_dir="unused", max_steps=5)
    recent, fired = [], []
    for step, loss in enumerate([2.07, 5.4, 7.2, 13.6, 15.0], start=1):
        ratio = spike_ratio(loss, recent, t.spike_warmup)
        if ratio is not None and ratio > t.spike_factor:
            fired.append(step)
            break
        recent = [*recent, loss][-t.spike_window:]
    assert fired == [4]  # 13.6 > 2 x median(2.07, 5.4, 7.2)


BLOW_UP = ["train.trainable=full", "train.lr=1", "ttt.clip_update_norm=null", "train.clip_grad_norm=null",
           "train.grad_accum=1", "train.max_steps=8", "train.save_every=1", "train.keep_last=1"]


def test_a_finite_loss_blow_up_stops_the_run_and_keeps_the_last_good_checkpoint(files, tmp_path, capsys):
    """lr 1, every weight trained, no clipping: loss 4.19 -> 5.98 -> 12.8 (finite). The default guard stops at
    step 3 before its update; checkpoint-2 (whose weights gave 12.8) is set aside, and checkpoint-1, the last good
    one, survives `keep_last: 1`; nothing is exported."""
    raw = recipe_dict(files, tmp_path)
    raw["export"] = {"dir": str(tmp_path / "export"), "dtype": "float32"}
    path = write_recipe(tmp_path / "tiny.yaml", raw)
    assert adapt_main()([str(path), *BLOW_UP]) == 3
    err = capsys.readouterr().err
    last, run = err.strip().splitlines()[-1], tmp_path / "run"
    assert last.startswith("adapt.py: error: training diverged at step 3: the loss spiked to ") and \
        "x the median" in last and "Traceback" not in err, err
    assert f"set aside as {run / 'checkpoint-2.diverged'}; the last good checkpoint is {run / 'checkpoint-1'}" in last
    assert last.endswith("then rerun to resume from it)")
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["checkpoint-1", "checkpoint-2.diverged"]
    assert not (tmp_path / "export").exists()
    lines = strict_metrics(run)
    assert lines[-1]["step"] == 3 and lines[-1]["diverged"] is True and lines[-1]["spike_ratio"] > 2
    # rerunning with a lower learning rate resumes from checkpoint-1
    assert adapt_main()([str(path), *BLOW_UP, "train.lr=1e-3", "train.max_steps=3", "export.dir=null"]) == 0
    assert "resuming from " + str(run / "checkpoint-1") in capsys.readouterr().out


def test_spike_skip_drops_the_update_and_warn_trains_on(files, tmp_path, capsys):
    (tmp_path / "skip").mkdir()
    recipe = load(files, tmp_path / "skip", [*BLOW_UP, "train.on_spike=skip", "train.max_steps=4",
                                             "train.keep_last=5"])
    assert adapt(recipe)["step"] == 4
    skipped = [m["step"] for m in strict_metrics(Path(recipe.train.output_dir)) if m.get("skipped")]
    assert skipped and skipped[0] == 3
    before, after = checkpoint_weights(recipe, 2), checkpoint_weights(recipe, 3)
    assert all(torch.equal(before[k], after[k]) for k in before)  # step 3 changed nothing
    (tmp_path / "warn").mkdir()
    recipe = load(files, tmp_path / "warn", [*BLOW_UP, "train.on_spike=warn", "train.max_steps=4",
                                             "train.keep_last=5"])
    capsys.readouterr()
    assert adapt(recipe)["step"] == 4
    assert "warning: step 3: the loss spiked to " in capsys.readouterr().out
    assert changed_keys(checkpoint_weights(recipe, 2), checkpoint_weights(recipe, 3))  # step 3's update applied


# ---------------------------------------------------------------------------------------------- stops outside the steps


STOP_AT = """
import contextlib, importlib.util, os, signal, sys
sys.path.insert(0, {repo!r})
import ttt_adapt.export.folder as export_module
import ttt_adapt.training.loop as train_module

if {phase!r} == "set-up":  # while the corpus is packed
    build = train_module.build_datasets
    def build_then_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return build(*args, **kwargs)
    train_module.build_datasets = build_then_signal
else:  # the export's files written, not yet renamed into place
    staging = export_module.staging
    @contextlib.contextmanager
    def staging_then_signal(out, overwrite):
        with staging(out, overwrite) as tmp:
            yield tmp
            os.kill(os.getpid(), signal.SIGTERM)
    export_module.staging = staging_then_signal

spec = importlib.util.spec_from_file_location("adapt", os.path.join({repo!r}, "scripts", "adapt.py"))
adapt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(adapt)
sys.exit(adapt.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("phase", ["set-up", "export"])
def test_a_stop_signal_outside_the_steps_stops_cleanly_and_the_same_command_finishes(files, tmp_path, phase):
    """SIGTERM while the corpus is packed: exit 75, one line, nothing written. SIGTERM during the export: exit 75,
    no export and no half-written folder, the run resumable; the same command then exports without training."""
    raw = recipe_dict(files, tmp_path)
    raw["export"] = {"dir": str(tmp_path / "export"), "dtype": "float32"}
    path = write_recipe(tmp_path / "tiny.yaml", raw)
    script = tmp_path / "stop.py"
    script.write_text(STOP_AT.format(repo=str(REPO), phase=phase))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    stopped = subprocess.run([sys.executable, str(script), str(path)], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
    run = tmp_path / "run"
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    last = stopped.stderr.strip().splitlines()[-1]
    assert "Traceback" not in stopped.stderr
    if phase == "set-up":
        assert last == "adapt.py: stopped by SIGTERM during set-up: nothing was trained or written; rerun the same " \
                       "command"
        assert not run.exists() or not any(p.is_dir() for p in run.iterdir())
    else:
        assert last == (f"adapt.py: stopped by SIGTERM during the final evaluation or export: training is complete in "
                        f"{run / 'checkpoint-2'}; rerun the same command to evaluate and export it")
        assert sorted(p.name for p in tmp_path.iterdir() if "export" in p.name) == []  # nothing half-written
    trained = [m["step"] for m in strict_metrics(run) if "loss" in m] if (run / "metrics.jsonl").exists() else []
    assert trained == ([] if phase == "set-up" else [1, 2])
    before = load_file(run / "checkpoint-2" / "model.safetensors") if phase == "export" else None

    assert adapt_main()([str(path)]) == 0  # the same command
    assert [m["step"] for m in strict_metrics(run) if "loss" in m] == [1, 2]  # each step trained once
    assert (tmp_path / "export" / "model.safetensors").is_file()
    if before is not None:  # not retrained: the checkpoint is the one written before the stop
        after = load_file(run / "checkpoint-2" / "model.safetensors")
        assert all(torch.equal(before[k], after[k]) for k in before)
