"""The evaluation run: position bins, token losses, the report (converted == base, adapted differs only after the
first chunk, the state controls; the swapped-state control tells in-context memory from a fixed bias), the table,
settings, one-line errors and the CLI."""

import copy
import json
import random
import string
import subprocess
import sys

import pytest
import torch
from conftest import DEVICE, script_main
from eval_fixtures import CHUNK, REPO, document, files  # noqa: F401 (a fixture)

from ttt_adapt import TTTConfig, convert
from ttt_adapt.recipe import RecipeError, build_recipe
from ttt_adapt.eval import (
    HAYSTACK_CORPUS,
    TASKS,
    EvalError,
    EvalSettings,
    bin_means,
    filler_sentences,
    markdown_table,
    position_bins,
    run_evaluation,
    tokenize_documents,
)

pytestmark = pytest.mark.usefixtures("one_thread")


SETTINGS = dict(seq_len=256, bin_edges=[0, CHUNK, 64, 128, 256], lengths=[200, 320], num_samples=3, batch_size=4,
                max_new_tokens=4)


@pytest.fixture(scope="module")
def report(files):
    out = files["root"] / "out"
    result = run_evaluation(EvalSettings(corpus=str(files["corpus"]), **SETTINGS), files["base"], files["adapted"], out,
                            log=lambda m: None)
    return {"report": result, "out": out}


def test_position_bins_and_means():
    assert position_bins(1024) == [0, 64, 128, 256, 512, 1024]
    assert position_bins(100) == [0, 64, 100]
    assert position_bins(48) == [0, 48]
    losses = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0], [0.0, 5.0, 6.0, 7.0, 8.0]])
    weights = torch.tensor([[0, 1, 1, 0, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    assert bin_means(losses, weights, [0, 2, 3, 5]) == [3.0, 2.0, None]


def test_report_schema_and_files(report):
    r, out = report["report"], report["out"]
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(r))
    assert r["bins"] == SETTINGS["bin_edges"] and r["settings"]["lengths"] == SETTINGS["lengths"]
    n_bins = len(r["bins"]) - 1
    assert len(r["tokens_per_bin"]) == n_bins and all(n > 0 for n in r["tokens_per_bin"])
    assert sum(r["recall_tokens_per_bin"]) > 0
    for name in ("base", "converted", "adapted", "adapted_swapped_state", "adapted_no_state"):
        assert len(r[name]["loss_by_position"]) == n_bins
        assert len(r[name]["recall_loss_by_position"]) == n_bins
    control = r["own_minus_swapped"]
    # 5 documents of different lengths (< seq_len): the longest has no partner as long
    assert control["documents"] == r["adapted_swapped_state"]["documents"] == 4
    for key in ("loss_by_position", "recall_loss_by_position"):
        assert len(control[key]) == n_bins
        assert all(d is None or d["low"] <= d["mean"] <= d["high"] for d in control[key])
    assert control["loss_by_position"][0] == {"mean": 0.0, "low": 0.0, "high": 0.0}  # the first chunk reads nothing
    for name in ("base", "adapted"):
        assert set(r[name]["tasks"]) == set(TASKS)
        for task in TASKS:
            accuracies = r[name]["tasks"][task]
            assert set(accuracies) == {"200", "320"} and all(0 <= a <= 1 for a in accuracies.values())
    assert "tasks" not in r["converted"]
    assert (out / "loss_by_position.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "report.md").read_text() == markdown_table(r)
    table = markdown_table(r)
    assert "| loss, positions 0-16 |" in table and "| niah_single @ 320 tokens (accuracy) |" in table
    assert table.startswith("| metric | base | adapted | adapted, swapped state | adapted, no state | adapted - base | "
                            "own - swapped (95% CI) |\n")
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == len(TASKS) * 2 * 3 and {"base_generation", "adapted_generation"} <= set(samples[0])


def test_converted_equals_base_adapted_differs_after_first_chunk(report):
    r = report["report"]
    assert r["converted"]["equals_base"] is True and r["converted"]["max_abs_loss_diff"] == 0.0
    assert r["converted"]["loss_by_position"] == r["base"]["loss_by_position"]
    base, adapted = r["base"]["loss_by_position"], r["adapted"]["loss_by_position"]
    assert adapted[0] == pytest.approx(base[0], abs=1e-6)  # bin 0 is the first TTT chunk: no update reaches it
    assert all(abs(a - b) > 1e-4 for a, b in zip(adapted[1:], base[1:]))


def repeating_document(i: int, period: int = 24, length: int = 200) -> str:
    rng = random.Random(f"repeat/{i}")
    unit = "".join(rng.choice(string.ascii_lowercase) for _ in range(period))
    return (unit * (length // period + 1))[:length]


def induction_memory(model, layer: int, lr: float = 20.0):
    """Fast weights as an associative memory: each token writes the embedding of the token after it (conv tap +1 of
    the input embeddings, identity target projection), keyed by its h; a later occurrence of the token reads it
    back. A document's own fast weights then predict its repeats; another document's do not."""
    mlp = model.model.ttt_modules()[layer]
    with torch.no_grad():
        mlp.ttt.conv.weight.zero_()
        mlp.ttt.conv.weight[:, 0, mlp.ttt.conv.weight.shape[-1] // 2 + 1] = 1.0
        mlp.ttt.target_proj.weight.copy_(torch.eye(mlp.hidden_size))
        mlp.ttt.lr.fill_(lr)
    return model


def test_swapped_state_control_tells_in_context_memory_from_a_fixed_bias(files, tmp_path):
    """Acceptance (issue 21): a model whose fast weights carry what the document said (an associative memory of its
    tokens) and one whose TTT path is a fixed, document-independent change of down_proj. Both differ from the base;
    the control's own - swapped interval excludes 0 for the first and includes it for the second."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = files["tokenizer"]
    torch.manual_seed(0)
    base = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=1, eos_token_id=0,
    )).eval()
    corpus = tmp_path / "repeats.jsonl"
    corpus.write_text("".join(json.dumps({"text": repeating_document(i)}) + "\n" for i in range(16)))
    config = TTTConfig(layers=[1], chunk_size=16, target="input_embed")
    memory = induction_memory(convert(base, config), layer=1)
    fixed = convert(copy.deepcopy(base), config)  # step-0 TTT weights: the fast weights are never written
    with torch.no_grad():
        down = fixed.model.layers[1].mlp.down_proj.weight
        down += 0.05 * torch.randn(down.shape, generator=torch.Generator().manual_seed(3))
    settings = EvalSettings(corpus=str(corpus), seq_len=192, bin_edges=[0, 16, 64, 192], tasks=[], batch_size=8)
    reports = {name: run_evaluation(settings, base, model, tmp_path / name, tokenizer=tokenizer, log=lambda m: None)
               for name, model in (("memory", memory), ("fixed", fixed))}
    for r in reports.values():
        assert r["own_minus_swapped"]["documents"] == 16
        assert abs(r["adapted"]["loss_by_position"][-1] - r["base"]["loss_by_position"][-1]) > 1e-3
    far = reports["memory"]["own_minus_swapped"]["loss_by_position"][-1]
    assert far["low"] <= far["mean"] <= far["high"] < 0  # the own state helps: beyond the interval
    assert reports["memory"]["adapted_no_state"]["loss_by_position"] == reports["memory"]["base"]["loss_by_position"]
    far = reports["fixed"]["own_minus_swapped"]["loss_by_position"][-1]
    assert far["low"] <= 0 <= far["high"]
    r = reports["fixed"]
    assert r["adapted_swapped_state"]["loss_by_position"] == r["adapted"]["loss_by_position"] \
        == r["adapted_no_state"]["loss_by_position"]
    assert "| adapted, swapped state | adapted, no state |" in (tmp_path / "memory" / "report.md").read_text()


def test_token_losses_match_full_logits(files, monkeypatch):
    from transformers import AutoModelForCausalLM

    import ttt_adapt.eval.loss_by_position as loss_by_position

    model = AutoModelForCausalLM.from_pretrained(files["adapted"]).eval().to(DEVICE)
    rows = tokenize_documents(files["tokenizer"], [document(1), document(2)[:50]], 96, pad_id=1)
    monkeypatch.setattr(loss_by_position, "LOGIT_SLICE", 7)  # several slices, the last one partial
    losses = loss_by_position.token_losses(model, rows, batch_size=2)
    with torch.no_grad():
        logits = model(input_ids=rows["input_ids"].to(DEVICE),
                       attention_mask=rows["attention_mask"].long().to(DEVICE)).logits.cpu()
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), rows["input_ids"][:, 1:],
                                                 reduction="none")
    mask = rows["attention_mask"]
    assert losses[:, 0].eq(0).all() and losses[1][~mask[1]].eq(0).all()
    torch.testing.assert_close(losses[:, 1:][mask[:, 1:]], expected[mask[:, 1:]])


def test_in_memory_models_as_training_passes_them(files, tmp_path):
    """train.py hands over the trained model in memory (in train mode): it is evaluated, then left in train mode."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(files["base"]).eval().to(DEVICE)
    adapted = AutoModelForCausalLM.from_pretrained(files["adapted"]).train().to(DEVICE)
    settings = EvalSettings(corpus=str(files["corpus"]), seq_len=64, lengths=[128], tasks=["kv_retrieval"],
                            num_samples=2)
    r = run_evaluation(settings, base, adapted, tmp_path, tokenizer=files["tokenizer"], log=lambda m: None)
    assert adapted.training and r["converted"]["equals_base"] and set(r["adapted"]["tasks"]) == {"kv_retrieval"}
    assert r["models"] == {"base": "Qwen3ForCausalLM (in memory)", "adapted": "TTTQwen3ForCausalLM (in memory)"}


def test_recall_tokens_are_the_answers(files):
    tokenizer = files["tokenizer"]
    rows = tokenize_documents(tokenizer, [document(7)], 256, pad_id=1)
    marked = rows["input_ids"][0][rows["recall"][0]].tolist()
    assert tokenizer.decode(marked) == "4007"


def test_settings_are_checked():
    with pytest.raises(EvalError, match=r"^eval.lenghts: unknown key"):
        EvalSettings.from_dict({"lenghts": [512]})
    with pytest.raises(EvalError, match=r"^eval.tasks: unknown task 'ruler'"):
        EvalSettings.from_dict({"tasks": ["ruler"]})
    with pytest.raises(EvalError, match=r"^eval.bin_edges: must be increasing"):
        EvalSettings.from_dict({"seq_len": 128, "bin_edges": [0, 64, 100]})
    with pytest.raises(EvalError, match=r"^eval.num_samples: expected an integer"):
        EvalSettings.from_dict({"num_samples": "8"})


def test_recipe_eval_section(files, tmp_path):
    raw = {
        "model": {"name_or_path": str(files["base"])},
        "data": {"path": str(files["corpus"]), "eval_path": str(files["corpus"]), "seq_len": 128},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1},
        "eval": {"lengths": [64], "num_samples": 2},
    }
    settings = build_recipe(raw).eval
    assert (settings.corpus, settings.seq_len, settings.lengths, settings.num_samples) == \
        (str(files["corpus"]), 128, [64], 2)
    raw["eval"] = {"lengths": [600]}
    from transformers import AutoConfig

    from ttt_adapt.training.preflight import check_eval

    with pytest.raises(RecipeError, match=r"task length 600 .* max_position_embeddings .* \(512\)$"):
        check_eval(build_recipe(raw), AutoConfig.from_pretrained(files["base"]))


@pytest.mark.parametrize("case", ["missing model", "empty corpus", "too long", "not ttt"])
def test_bad_input_is_one_line(files, tmp_path, case):
    settings = dict(corpus=str(files["corpus"]), seq_len=64, lengths=[128], tasks=["niah_single"], num_samples=1)
    base, adapted = files["base"], files["adapted"]
    if case == "missing model":
        adapted, expected = tmp_path / "nope", "no such adapted model folder"
    elif case == "empty corpus":
        settings["corpus"], expected = str(files["empty"]), "the corpus holds no documents"
    elif case == "too long":
        settings["lengths"] = [510]
        expected = "task length 510 (+8 generated tokens) exceeds the max_position_embeddings"
    else:
        adapted, expected = base, "is not an In-Place TTT model"
    with pytest.raises(EvalError) as e:
        run_evaluation(EvalSettings(**settings), base, adapted, tmp_path / "out", log=lambda m: None)
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def _cli(*args):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


@pytest.fixture(scope="module")
def cli_main():
    """`main` of scripts/evaluate.py, imported once (a subprocess per case costs seconds of imports)."""
    return script_main("evaluate")


def test_cli_bad_input_exits_2_with_one_line(files, tmp_path, cli_main, capsys):
    proc = _cli("--base", tmp_path / "nope", "--adapted", files["adapted"], "--corpus", files["corpus"],
                "--out", tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == f"evaluate.py: error: no such base model folder: {tmp_path / 'nope'}\n"
    models = ["--base", files["base"], "--adapted", files["adapted"], "--out", tmp_path / "out"]
    cases = [
        (models + ["--corpus", files["empty"]], "the corpus holds no documents"),
        (models + ["--corpus", files["corpus"], "--seq-len", "64", "--lengths", "1024"],
         "task length 1024 (+8 generated tokens) exceeds"),
        (models + ["--corpus", files["corpus"], "--seq-len", "600", "--tasks", "none"], "seq_len 600 exceeds"),
        (models + ["--corpus", files["corpus"], "--lengths", "64"], "task length 64 is too short for niah_single"),
        (["--base", files["base"], "--adapted", files["base"], "--corpus", files["corpus"], "--out", tmp_path / "out",
          "--seq-len", "64", "--tasks", "none"], "is not an In-Place TTT model"),
        (["--lengths", "5,x"], "--lengths: expected comma-separated integers"),
        (["--corpus", files["corpus"]], "--base is required"),
        (["--recipe", tmp_path / "none.yaml"], "no such recipe file"),
    ]
    for args, expected in cases:
        code = cli_main([str(a) for a in args])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and expected in err, (args, err)
    assert not (tmp_path / "out").exists()


def test_cli_runs_and_prints_the_table(files, tmp_path, cli_main, capsys):
    out = tmp_path / "out"
    args = ["--base", files["base"], "--adapted", files["adapted"], "--corpus", files["corpus"], "--out", out,
            "--seq-len", "64", "--lengths", "128", "--tasks", "niah_single", "--num-samples", "2"]
    assert cli_main([str(a) for a in args]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["bins"] == [0, 64] and list(report["base"]["tasks"]) == ["niah_single"]
    assert capsys.readouterr().out == (out / "report.md").read_text()


def test_cli_lm_eval_task_needs_no_corpus(files, tmp_path, cli_main, capsys):
    """--lm-eval-task evaluates nothing: without --corpus the haystacks come from the shipped held-out corpus."""
    args = ["--lm-eval-task", tmp_path / "tasks", "--adapted", files["adapted"], "--lengths", "200",
            "--tasks", "niah_single", "--num-samples", "2"]
    assert cli_main([str(a) for a in args]) == 0
    assert "wrote 1 tasks (ttt_niah_single_200)" in capsys.readouterr().out
    prompts = [json.loads(line)["prompt"] for line in (tmp_path / "tasks" / "ttt_niah_single_200.jsonl").open()]
    prose = set(filler_sentences([json.loads(line)["text"] for line in HAYSTACK_CORPUS.open()]))
    assert len(prompts) == 2 and any(sentence in prompts[0] for sentence in prose)


def test_markdown_table_leaves_out_bins_without_tokens():
    report = {
        "bins": [0, 8, 16],
        "base": {"loss_by_position": [3.0, 2.5], "recall_loss_by_position": [None, 2.0], "tasks": {"kv_retrieval": {"64": 0.5}}},
        "adapted": {"loss_by_position": [3.0, 2.25], "recall_loss_by_position": [None, 1.5], "tasks": {"kv_retrieval": {"64": 0.75}}},
    }
    table = markdown_table(report)
    assert "recall-answer loss, positions 0-8" not in table
    assert "| recall-answer loss, positions 8-16 |" in table and "| loss, positions 0-8 |" in table
    assert "| kv_retrieval @ 64 tokens (accuracy) | 0.5000 | 0.7500 | +0.2500 |" in table
    assert table.startswith("| metric | base | adapted | adapted - base |\n")  # a report without the controls
    report.update(
        adapted_swapped_state={"loss_by_position": [3.0, 2.5], "recall_loss_by_position": [None, 2.0]},
        adapted_no_state={"loss_by_position": [3.0, 2.5]},
        own_minus_swapped={"documents": 4, "resamples": 10, "confidence": 0.95,
                           "loss_by_position": [{"mean": 0.0, "low": 0.0, "high": 0.0},
                                                {"mean": -0.25, "low": -0.375, "high": -0.125}]},
    )
    table = markdown_table(report)
    assert "| loss, positions 8-16 | 2.5000 | 2.2500 | 2.5000 | 2.5000 | -0.2500 | -0.2500 [-0.3750, -0.1250] |" in table
    assert "| recall-answer loss, positions 8-16 | 2.0000 | 1.5000 | 2.0000 |  | -0.5000 |  |" in table
    assert "| kv_retrieval @ 64 tokens (accuracy) | 0.5000 | 0.7500 |  |  | +0.2500 |  |" in table
    assert "each of 4 documents read with the fast weights another" in table

