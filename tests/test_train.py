"""The training loop: what each mode trains, the loss it reports, resume, checkpoints, metrics, export, the CLI."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from conftest import script_main

from ttt_adapt.config import RecipeError, load_recipe
from ttt_adapt.checkpoints import latest_checkpoint
from ttt_adapt.model_setup import build_model
from ttt_adapt.stopping import Diverged
from ttt_adapt.train import RowStream, check_run, collate, lr_factor, train

REPO = Path(__file__).resolve().parents[1]
TTT_LAYERS = [1, 3]


def make_tiny_files(root: Path) -> dict:
    """A tiny random Qwen3 (4 layers, tied embeddings) with a character tokenizer, and a jsonl corpus."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    chars = "abcdefghijklmnopqrstuvwxyz .,\n"
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )
    base = root / "base"
    Qwen3ForCausalLM(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))) for _ in range(40)]
    for name, n in (("train.jsonl", 24), ("eval.jsonl", 4)):
        with open(root / name, "w") as f:
            for _ in range(n):
                f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 90)))}) + "\n")
    return {"base": base, "train": root / "train.jsonl", "eval": root / "eval.jsonl", "root": root}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_tiny_files(tmp_path_factory.mktemp("tiny"))


pytestmark = pytest.mark.usefixtures("one_thread")


def recipe_dict(files, out: Path, **train) -> dict:
    return {
        "model": {"name_or_path": str(files["base"])},
        "ttt": {"layers": TTT_LAYERS, "chunk_size": 32},
        "data": {"path": str(files["train"]), "eval_path": str(files["eval"]), "seq_len": 96,
                 "cache_dir": str(files["root"] / "cache")},
        "train": {"output_dir": str(out / "run"), "max_steps": 2, "batch_size": 2, "grad_accum": 2, "lr": 1e-2,
                  "weight_decay": 0.0, "log_every": 1, "warmup_steps": 0, "eval_batches": 2, **train},
        "export": {"dir": None},
    }


def write_recipe(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def load(files, tmp_path, overrides=(), train=None):
    """The tiny recipe with `train` settings merged in, written to tmp_path and loaded with `overrides`."""
    raw = recipe_dict(files, tmp_path, **(train or {}))
    return load_recipe(write_recipe(tmp_path / "recipe.yaml", raw), list(overrides))


def checkpoint_weights(recipe, step):
    return load_file(Path(recipe.train.output_dir) / f"checkpoint-{step}" / "model.safetensors")


def changed_keys(before: dict, after: dict) -> set:
    assert set(after) <= set(before), set(after) - set(before)
    return {k for k in after if not torch.equal(before[k], after[k])}


def metrics(recipe) -> list[dict]:
    return [json.loads(line) for line in (Path(recipe.train.output_dir) / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- what is trained
# Two steps, not one: the TTT conv starts at zero, so in step 1 only the conv gets a gradient; from step 2 on,
# every TTT parameter (target projection, learned rate) does.


def test_ttt_mode_trains_exactly_the_ttt_parameters(files, tmp_path):
    recipe = load(files, tmp_path, train={"trainable": "ttt"})
    initial = {k: v.clone() for k, v in build_model(recipe).state_dict().items()}
    train(recipe)
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
    train(recipe)
    after = checkpoint_weights(recipe, 2)
    assert changed_keys(initial, after) == set(after)


def test_lora_trains_adapters_and_ttt_modules_only_and_exports_merged(files, tmp_path):
    recipe = load(files, tmp_path, train={"lora": {"r": 4, "alpha": 8}, "ttt_lr": 2e-2})
    recipe.export.dir = str(tmp_path / "export")
    recipe.export.dtype = "float32"
    initial = {k: v.clone() for k, v in build_model(recipe).state_dict().items()}
    train(recipe)
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
        train(recipe)
        runs.append(checkpoint_weights(recipe, 2))
    for k in runs[0]:
        torch.testing.assert_close(runs[1][k], runs[0][k], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- loss, schedule


def test_logged_loss_is_the_mean_over_the_global_batch_real_tokens(files, tmp_path):
    recipe = load(files, tmp_path, train={"max_steps": 1, "batch_size": 3, "grad_accum": 2})
    model = build_model(recipe)
    from ttt_adapt.data import build_datasets
    from ttt_adapt.model_setup import load_tokenizer

    rows, _ = build_datasets(recipe.data, load_tokenizer(recipe))
    batch = collate(RowStream(rows, recipe.train.seed).take(0, 6), "cpu")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    labels = batch["labels"][:, 1:]
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)
    train(recipe)
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


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(files, tmp_path):
    """4 steps == 2 steps, stop, resume, 2 more (cosine schedule, LoRA dropout RNG, eval in between)."""
    train_cfg = {"max_steps": 4, "save_every": 2, "keep_last": 3, "eval_every": 2, "lr": 5e-3,
                 "lora": {"r": 4, "dropout": 0.1}, "warmup_steps": 1}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = load(files, tmp_path / "a", train=train_cfg)
    train(whole)
    resumed = load(files, tmp_path / "b", train=train_cfg)
    Path(resumed.train.output_dir).mkdir()
    shutil.copytree(Path(whole.train.output_dir) / "checkpoint-2", Path(resumed.train.output_dir) / "checkpoint-2")
    summary = train(resumed)
    assert summary["step"] == 4
    a, b = checkpoint_weights(whole, 4), checkpoint_weights(resumed, 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = {m["step"]: m["loss"] for m in metrics(whole) if "loss" in m}
    assert {m["step"]: m["loss"] for m in metrics(resumed) if "loss" in m} == {3: losses[3], 4: losses[4]}
    assert [m["step"] for m in metrics(whole) if "eval_loss" in m] == [2, 4]


def test_checkpoints_are_rotated_and_incomplete_ones_ignored(files, tmp_path):
    recipe = load(files, tmp_path, train={"max_steps": 3, "save_every": 1, "keep_last": 2})
    train(recipe)
    out = Path(recipe.train.output_dir)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-2", "checkpoint-3"]
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["rows"] == 3 * 4
    (out / "checkpoint-9").mkdir()  # a crash mid-save leaves a folder without trainer_state.json
    (out / ".tmp-checkpoint-4").mkdir()
    assert latest_checkpoint(out).name == "checkpoint-3"


def test_metrics_jsonl(files, tmp_path):
    recipe = load(files, tmp_path, train={"max_steps": 3, "log_every": 2, "eval_every": 2})
    summary = train(recipe)
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


def test_two_processes_match_one_process_on_the_same_global_batch(files, tmp_path):
    """DDP averages gradients over processes; the loop undoes it, so 2 processes x 2 micro-batches train the
    same model as 1 process x 4 micro-batches (gloo on CPU), and log the same losses."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    common = {"trainable": "full", "batch_size": 1, "max_steps": 2, "weight_decay": 0.1}
    one = load(files, tmp_path / "one", train={**common, "grad_accum": 4})
    train(one)
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
        train(load(files, tmp_path, ["parallel.cp_size=3"]))
    assert not (tmp_path / "run").exists()


def test_unreadable_corpus_is_a_one_line_error(files, tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": oops\n')
    other = tmp_path / "other.jsonl"
    other.write_text('{"body": "no text field"}\n')
    for path, expected in ((broken, f"data: cannot read {broken}"), (other, "data.text_field: ")):
        with pytest.raises(RecipeError) as err:
            train(load(files, tmp_path, [f"data.path={path}", "data.eval_path=null", "data.eval_fraction=0"]))
        assert str(err.value).startswith(expected) and "\n" not in str(err.value)


def test_training_continues_from_a_ttt_export_with_its_layout(files, tmp_path):
    """Stage 2 (e.g. 32k -> 128k) starts from stage 1's export: no second conversion, same TTT layout."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    first = load(files, tmp_path / "one", [f"export.dir={tmp_path / 'stage1'}", "export.dtype=float32"])
    train(first)
    stage1 = checkpoint_weights(first, 2)
    second = load(files, tmp_path / "two", [f"model.name_or_path={tmp_path / 'stage1'}", "data.seq_len=128"])
    assert check_run(second).model_type == "ttt_qwen3"
    initial = build_model(second).state_dict()
    for k, v in stage1.items():  # the export's weights, TTT ones included, are the starting point
        assert torch.equal(initial[k], v), k
    assert train(second)["step"] == 2
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


def adapt_main():
    return script_main("adapt")


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

    main = adapt_main()
    assert main([str(path), "train.max_steps=3", "export.overwrite=true"]) == 0
    assert f"resuming from {out / 'checkpoint-2'}" in capsys.readouterr().out
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps if "loss" in m] == [1, 2, 3]

    assert main([str(path), "train.resume=false", "export.overwrite=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.output_dir" in err and "train.resume=true" in err


# ---------------------------------------------------------------------------------------------- divergence


DIVERGE = ["train.trainable=full", "train.lr=1e38", "ttt.clip_update_norm=null", "train.clip_grad_norm=null",
           "train.save_every=1", "train.keep_last=2"]


def strict_metrics(run: Path) -> list[dict]:
    """metrics.jsonl parsed as strict JSON: NaN / Infinity are refused, not read back as floats."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return [json.loads(line, parse_constant=refuse) for line in (run / "metrics.jsonl").read_text().splitlines()]


def nonfinite_tensors(folder: Path) -> list[str]:
    """Every tensor in the safetensors and torch files under `folder` that holds a NaN or an infinity."""
    bad = []
    for path in list(folder.rglob("*.safetensors")) + list(folder.rglob("*.bin")):
        tensors = load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
        stack = [(str(path), tensors)]
        while stack:
            name, value = stack.pop()
            if isinstance(value, torch.Tensor):
                if value.is_floating_point() and not torch.isfinite(value).all():
                    bad.append(name)
            elif isinstance(value, dict):
                stack += [(f"{name}/{k}", v) for k, v in value.items()]
            elif isinstance(value, (list, tuple)):
                stack += [(f"{name}/{i}", v) for i, v in enumerate(value)]
    return bad


def test_divergence_stops_with_one_line_and_keeps_the_last_good_checkpoint(files, tmp_path, capsys):
    raw = recipe_dict(files, tmp_path, max_steps=20, warmup_steps=20)  # as recipes/tiny_qwen3.yaml: lr 5e36 at step 1
    raw["export"] = {"dir": str(tmp_path / "export"), "dtype": "float32"}
    path = write_recipe(tmp_path / "tiny.yaml", raw)
    assert adapt_main()([str(path), *DIVERGE]) == 3
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    run = tmp_path / "run"
    assert last.startswith("adapt.py: error: training diverged at step 2: ") and "Traceback" not in err
    assert f"the last good checkpoint is {run / 'checkpoint-1'}" in last
    assert [p.name for p in run.iterdir() if p.is_dir()] == ["checkpoint-1"]  # kept; nothing diverged saved
    assert not (tmp_path / "export").exists()
    assert nonfinite_tensors(run) == [] and len(list(run.rglob("*.safetensors"))) == 1
    lines = strict_metrics(run)
    assert [m["step"] for m in lines] == [1, 2]
    assert lines[1]["diverged"] is True and lines[1]["nonfinite"] and all(lines[1][k] is None
                                                                          for k in lines[1]["nonfinite"])


def test_weights_are_checked_finite_before_every_save(files, tmp_path):
    """lr 1e39 overflows the fp32 update: step 1's loss and gradients are finite, the weights after it not."""
    recipe = load(files, tmp_path, [*DIVERGE, "train.lr=1e39"])
    with pytest.raises(Diverged, match=r"^training diverged at step 1: the weights or optimizer state are not "
                                       r"finite; no checkpoint was written"):
        train(recipe)
    assert [p.name for p in Path(recipe.train.output_dir).iterdir()] == ["metrics.jsonl", "recipe.yaml"]


def poison_step(monkeypatch, bad_step: int):
    """Make the loss (hence every gradient) of step `bad_step` NaN, as a numerical blow-up would."""
    import ttt_adapt.train as train_module

    calls = {"step": 0}
    real_train_step, real_loss_sum = train_module.train_step, train_module.loss_sum

    def train_step(run, recipe, step, signals):
        calls["step"] = step
        return real_train_step(run, recipe, step, signals)

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
    summary = train(recipe)
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
                                       r"\(nan\) are not finite; the last good checkpoint is .*checkpoint-1 "):
        train(stop)


def test_skip_mode_stops_after_too_many_skips_in_a_row(files, tmp_path, capsys):
    path = write_recipe(tmp_path / "tiny.yaml", recipe_dict(files, tmp_path, max_steps=20, warmup_steps=20))
    overrides = [*DIVERGE, "train.on_nonfinite=skip", "train.max_nonfinite_skips=2"]
    assert adapt_main()([str(path), *overrides]) == 3
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("adapt.py: error: training diverged at step 4: ") and "3 steps in a row" in last
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["checkpoint-2", "checkpoint-3"]
    assert nonfinite_tensors(run) == []
    lines = strict_metrics(run)
    assert [(m["step"], m.get("skipped")) for m in lines if m["step"] > 1] == [(2, True), (3, True), (4, False)]


# ---------------------------------------------------------------------------------------------- preemption


PREEMPT = """
import importlib.util, os, signal, sys
sys.path.insert(0, {repo!r})
import ttt_adapt.train as train_module

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
    train(whole)
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
