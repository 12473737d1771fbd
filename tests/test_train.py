"""The training loop: what each mode trains, the loss it reports, the run checks, the CLI, several processes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from conftest import (REPO, TTT_LAYERS, adapt_main, changed_keys, checkpoint_weights, load, metrics, recipe_dict,
                      write_recipe)

from ttt_adapt.model_setup import build_model
from ttt_adapt.pipeline import adapt
from ttt_adapt.recipe import RecipeError
from ttt_adapt.training.checkpoints import latest_checkpoint
from ttt_adapt.training.loop import RowStream, collate, lr_factor
from ttt_adapt.training.preflight import check_run

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- what is trained
# Two steps, not one: the TTT conv starts at zero, so in step 1 only the conv gets a gradient; from step 2 on,
# every TTT parameter (target projection, learned rate) does.


def test_ttt_mode_trains_exactly_the_ttt_parameters(files, tmp_path):
    recipe = load(files, tmp_path, train={"trainable": "ttt"})
    initial = {k: v.clone() for k, v in build_model(recipe).state_dict().items()}
    adapt(recipe)
    after = checkpoint_weights(recipe, 2)
    ttt_keys = {k for k in initial if ".mlp.ttt." in k}
    assert ttt_keys and all(f"layers.{i}.mlp.ttt.conv.weight" in " ".join(ttt_keys) for i in TTT_LAYERS)
    assert changed_keys(initial, after) == ttt_keys
    base = load_file(files["base"] / "model.safetensors")  # base weights bit-identical to the files on disk
    assert set(base) - set(after) <= {"lm_head.weight"}  # tied to the embeddings, stored once
    for k in set(base) & set(after):
        assert torch.equal(after[k], base[k]), k


def test_full_mode_trains_every_parameter(files, tmp_path):
    recipe = load(files, tmp_path, train={"trainable": "full"})
    initial = {k: v.clone() for k, v in build_model(recipe).state_dict().items()}
    adapt(recipe)
    after = checkpoint_weights(recipe, 2)
    assert changed_keys(initial, after) == set(after)


def test_lora_trains_adapters_and_ttt_modules_only_and_exports_merged(files, tmp_path):
    recipe = load(files, tmp_path, train={"lora": {"r": 4, "alpha": 8}, "ttt_lr": 2e-2})
    recipe.export.dir = str(tmp_path / "export")
    recipe.export.dtype = "float32"
    initial = {k: v.clone() for k, v in build_model(recipe).state_dict().items()}
    adapt(recipe)
    after = checkpoint_weights(recipe, 2)
    lora = {k for k in initial if ".lora_A." in k or ".lora_B." in k}
    ttt = {k for k in initial if ".mlp.ttt.modules_to_save." in k}
    # LoRA reaches the down_proj of the TTT layers too (the fast weight adds to its output)
    assert any(f"layers.{TTT_LAYERS[0]}.mlp.down_proj.lora_B" in k for k in lora)
    assert len(ttt) == len({k for k in initial if ".mlp.ttt.original_module." in k}) > 0
    assert changed_keys(initial, after) == lora | ttt

    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(recipe.export.dir)
    names = [n for n, _ in exported.named_parameters()]
    assert not [n for n in names if "lora" in n or "modules_to_save" in n or "original_module" in n]
    assert not list(Path(recipe.export.dir).glob("adapter_*"))
    conv = f"layers.{TTT_LAYERS[0]}.mlp.ttt"
    trained = next(v for k, v in after.items() if f"{conv}.modules_to_save.default.conv.weight" in k)
    assert torch.equal(exported.get_parameter(f"model.{conv}.conv.weight"), trained)


def test_gradient_checkpointing_trains_the_same_model(files, tmp_path):
    runs = []
    for flag in (False, True):
        (tmp_path / str(flag)).mkdir()
        recipe = load(files, tmp_path / str(flag), train={"gradient_checkpointing": flag, "trainable": "full"})
        adapt(recipe)
        runs.append(checkpoint_weights(recipe, 2))
    for k in runs[0]:
        torch.testing.assert_close(runs[1][k], runs[0][k], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- loss, schedule


def test_logged_loss_is_the_mean_over_the_global_batch_real_tokens(files, tmp_path):
    recipe = load(files, tmp_path, train={"max_steps": 1, "batch_size": 3, "grad_accum": 2})
    model = build_model(recipe)
    from ttt_adapt.data import build_datasets
    from ttt_adapt.model_setup import recipe_tokenizer

    rows, _ = build_datasets(recipe.data, recipe_tokenizer(recipe))
    batch = collate(RowStream(rows, recipe.train.seed).take(0, 6), "cpu")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    labels = batch["labels"][:, 1:]
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)
    adapt(recipe)
    (first,) = [m for m in metrics(recipe) if "loss" in m]
    assert first["loss"] == pytest.approx(float(expected), rel=1e-6)
    assert first["tokens"] == int(batch["attention_mask"].sum())


def test_warmup_then_cosine(files, tmp_path):
    recipe = load(files, tmp_path, train={"max_steps": 10, "warmup_steps": 2, "min_lr_ratio": 0.1})
    factors = [lr_factor(s, recipe) for s in range(1, 11)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert all(a > b for a, b in zip(factors[2:], factors[3:]))
    assert 0.1 < factors[-1] < 0.2


def test_row_order_depends_only_on_seed_and_cursor(files, tmp_path):
    rows = [{"i": [i]} for i in range(7)]
    a, b = RowStream(rows, seed=3), RowStream(rows, seed=3)
    whole = a.take(0, 20)
    assert b.take(8, 12) == whole[8:]
    assert sorted(r["i"][0] for r in whole[:7]) == list(range(7))  # each pass is a permutation
    assert RowStream(rows, seed=4).take(0, 7) != whole[:7]

    class Stream:  # a streaming dataset: iterable, no length
        def __iter__(self):
            return iter(rows)

    streamed = RowStream(Stream(), seed=3)
    assert streamed.take(0, 5) + streamed.take(5, 5) == rows + rows[:3]  # read in order, passes repeat
    assert RowStream(Stream(), seed=3).take(9, 3) == rows[2:5]  # a resumed run skips what was consumed


# ---------------------------------------------------------------------------------------------- checkpoints

def test_two_processes_match_one_process_on_the_same_global_batch(files, tmp_path):
    """DDP averages gradients over processes; the loop undoes it, so 2 processes x 2 micro-batches train the
    same model as 1 process x 4 micro-batches (gloo on CPU), and log the same losses."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    common = {"trainable": "full", "batch_size": 1, "max_steps": 2, "weight_decay": 0.1}
    one = load(files, tmp_path / "one", train={**common, "grad_accum": 4})
    adapt(one)
    two = load(files, tmp_path / "two", train={**common, "grad_accum": 2})
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              str(REPO / "scripts" / "adapt.py"), two.path]
    result = subprocess.run(launch, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 process(es)" in result.stdout
    a, b = metrics(one), metrics(two)
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        for key in ("loss", "grad_norm", "eval_loss", "tokens", "eval_tokens"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-6), (key, x, y)
    wa, wb = checkpoint_weights(one, 2), checkpoint_weights(two, 2)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- run checks


def test_run_checks_refuse_bad_bases_and_finished_runs(files, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(files["base"], no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*"))
    cases = {
        "'gpt2'": [f"model.name_or_path={gpt2}"],
        "ttt.layers": ["ttt.layers=[1,4]"],
        "tokenizer": [f"model.name_or_path={no_tokenizer}"],
        "data.seq_len: 96 tokens cannot be cut into 2 shards of whole 32-token chunks; use a multiple of 64":
            ["parallel.cp_size=2"],
        "eval.nope: unknown key": ["eval.nope=1"],
        "eval.corpus: no such file": ["eval.corpus=/no/such.jsonl"],
    }
    if not _installed("tensorboard"):
        cases["not installed"] = ["train.trackers=[tensorboard]"]
    for expected, overrides in cases.items():
        with pytest.raises(RecipeError, match=expected) as err:
            check_run(load(files, tmp_path, overrides))
        assert "\n" not in str(err.value)
    run = tmp_path / "run"
    (run / "checkpoint-1").mkdir(parents=True)
    (run / "checkpoint-1" / "trainer_state.json").write_text("{}")
    with pytest.raises(RecipeError, match="train.resume=true"):
        check_run(load(files, tmp_path, ["train.resume=false"]))
    with pytest.raises(RecipeError, match=r"^train.lora.target_modules: .*qproj"):
        build_model(load(files, tmp_path, ["train.lora.r=4", "train.lora.target_modules=[qproj]"]))


def test_cp_size_must_divide_the_process_count(files, tmp_path):
    with pytest.raises(RecipeError, match=r"^parallel.cp_size: 3 does not divide the 1 process\(es\); launch a multiple"):
        adapt(load(files, tmp_path, ["parallel.cp_size=3"]))
    assert not (tmp_path / "run").exists()


def test_unreadable_corpus_is_a_one_line_error(files, tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": oops\n')
    other = tmp_path / "other.jsonl"
    other.write_text('{"body": "no text field"}\n')
    for path, expected in ((broken, f"data: cannot read {broken}"), (other, "data.text_field: ")):
        with pytest.raises(RecipeError) as err:
            adapt(load(files, tmp_path, [f"data.path={path}", "data.eval_path=null", "data.eval_fraction=0"]))
        assert str(err.value).startswith(expected) and "\n" not in str(err.value)


def test_training_continues_from_a_ttt_export_with_its_layout(files, tmp_path):
    """Stage 2 (e.g. 32k -> 128k) starts from stage 1's export: no second conversion, same TTT layout."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    first = load(files, tmp_path / "one", [f"export.dir={tmp_path / 'stage1'}", "export.dtype=float32"])
    adapt(first)
    stage1 = checkpoint_weights(first, 2)
    second = load(files, tmp_path / "two", [f"model.name_or_path={tmp_path / 'stage1'}", "data.seq_len=128"])
    assert check_run(second).config.model_type == "ttt_qwen3"
    initial = build_model(second).state_dict()
    for k, v in stage1.items():  # the export's weights, TTT ones included, are the starting point
        assert torch.equal(initial[k], v), k
    assert adapt(second)["step"] == 2
    other_chunks = load(files, tmp_path / "two", [f"model.name_or_path={tmp_path / 'stage1'}", "ttt.chunk_size=64"])
    with pytest.raises(RecipeError, match=r"^ttt.chunk_size: .* TTT model with chunk_size=32; the recipe says 64$"):
        check_run(other_chunks)


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ---------------------------------------------------------------------------------------------- the CLI


def run_cli(*args, cwd=REPO):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "scripts" / "adapt.py"), *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def test_cli_end_to_end_then_resume_then_refuse(files, tmp_path, capsys):
    raw = recipe_dict(files, tmp_path, max_steps=4, save_every=1)
    raw["export"] = {"dir": str(tmp_path / "export"), "dtype": "float32"}
    raw["eval"] = {"bin_edges": [0, 32, 96], "tasks": [], "lengths": [], "max_docs": 4}  # loss by position only
    path = write_recipe(tmp_path / "tiny.yaml", raw)
    first = run_cli(path, "train.max_steps=2")
    assert first.returncode == 0, first.stderr[-2000:]
    out = tmp_path / "run"
    assert latest_checkpoint(out).name == "checkpoint-2"
    assert (tmp_path / "export" / "config.json").is_file() and list((tmp_path / "export").glob("*.safetensors"))
    assert (tmp_path / "export" / "tokenizer_config.json").is_file()
    report = json.loads((out / "eval" / "report.json").read_text())  # evaluated before the export: in its card
    assert {"base", "adapted"} <= set(report) and "## Evaluation" in (tmp_path / "export" / "README.md").read_text()
    exported_ttt = json.loads((tmp_path / "export" / "config.json").read_text())["ttt"]  # the guard's reference
    norms = report["adapted"]["state_norms"]
    assert norms["layers"] == exported_ttt["layers"] and exported_ttt["state_norm_limit"] == norms["max"]
    assert all(v > 0 for v in norms["max"])

    main = adapt_main()
    assert main([str(path), "train.max_steps=3", "export.overwrite=true"]) == 0
    assert f"resuming from {out / 'checkpoint-2'}" in capsys.readouterr().out
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps if "loss" in m] == [1, 2, 3]

    assert main([str(path), "train.resume=false", "export.overwrite=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.output_dir" in err and "train.resume=true" in err


# ---------------------------------------------------------------------------------------------- divergence

def test_training_attends_packed_rows_in_blocks_without_a_dense_mask(files, tmp_path, monkeypatch):
    import ttt_adapt.attention as attention

    def no_dense_mask(*args, **kwargs):
        raise AssertionError("a dense attention mask was built for packed training rows")

    calls = []
    blocked = attention.blocked_sdpa
    monkeypatch.setattr(attention, "sdpa_mask", no_dense_mask)
    monkeypatch.setattr(attention, "blocked_sdpa", lambda *a, **k: calls.append(1) or blocked(*a, **k))
    recipe = load(files, tmp_path, train={"max_steps": 1, "eval_every": 1})
    adapt(recipe)
    assert len(calls) >= 4 and "eval_loss" in metrics(recipe)[-1]  # every layer of the step and of the eval loss
