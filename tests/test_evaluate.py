"""Evaluation: position bins, the report (converted == base, adapted differs only after the first chunk), seeded
synthetic tasks with their needles in place, scoring, left-padded generation, the plot, one-line errors and the
CLI, and (when lm_eval is installed) the exported model under lm-evaluation-harness."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_ttt, script_main
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from ttt_adapt import TTTConfig, convert
from ttt_adapt.config import RecipeError, build_recipe
from ttt_adapt.evaluate import (
    TASKS,
    EvalError,
    EvalSettings,
    bin_means,
    filler_sentences,
    generate,
    make_samples,
    markdown_table,
    position_bins,
    run_evaluation,
    score,
    tokenize_documents,
    write_lm_eval_task,
)

REPO = Path(__file__).resolve().parents[1]
CHUNK = 16
PROSE = [
    "The weather in Tolmar was grey, so Brissa stayed home.",
    "At dawn, Kelvo carried the old lantern near the river.",
    "Brissa asked Kelvo about the bell, and Kelvo said it was quiet.",
    "Everyone in Tolmar said the bridge was narrow.",
    "Kelvo and Brissa walked from Tolmar to Vessa.",
    "In the afternoon, Brissa polished the silver kettle by the mill.",
]


def byte_tokenizer():
    """Byte-level, no merges: every byte is one token, so decode -> encode gives the same ids back."""
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<eos>": 0, "<pad>": 1, **{c: i + 2 for i, c in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def document(i: int) -> str:
    rng = random.Random(i)
    prose = " ".join(rng.choice(PROSE) for _ in range(3))
    return f"Vault Kor{i} holds code {4000 + i}.\n{prose}\nQ: What code opens vault Kor{i}? A: {4000 + i}.\n"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny random Qwen3 with a byte tokenizer, its TTT version with non-trivial TTT weights, and a corpus."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    root = tmp_path_factory.mktemp("evaluate")
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=1, eos_token_id=0,
    )
    base = Qwen3ForCausalLM(config).eval()
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    adapted = randomize_ttt(convert(base, TTTConfig(layers=[1], chunk_size=CHUNK)), scale=0.1)
    adapted.save_pretrained(root / "adapted")
    tokenizer.save_pretrained(root / "adapted")
    with open(root / "eval.jsonl", "w") as f:
        for i in range(5):
            f.write(json.dumps({"text": document(i)}) + "\n")
    (root / "empty.jsonl").write_text("")
    return {"root": root, "base": root / "base", "adapted": root / "adapted", "corpus": root / "eval.jsonl",
            "empty": root / "empty.jsonl", "tokenizer": tokenizer}


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
    for name in ("base", "converted", "adapted"):
        assert len(r[name]["loss_by_position"]) == n_bins
        assert len(r[name]["recall_loss_by_position"]) == n_bins
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
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == len(TASKS) * 2 * 3 and {"base_generation", "adapted_generation"} <= set(samples[0])


def test_converted_equals_base_adapted_differs_after_first_chunk(report):
    r = report["report"]
    assert r["converted"]["equals_base"] is True and r["converted"]["max_abs_loss_diff"] == 0.0
    assert r["converted"]["loss_by_position"] == r["base"]["loss_by_position"]
    base, adapted = r["base"]["loss_by_position"], r["adapted"]["loss_by_position"]
    assert adapted[0] == pytest.approx(base[0], abs=1e-6)  # bin 0 is the first TTT chunk: no update reaches it
    assert all(abs(a - b) > 1e-4 for a, b in zip(adapted[1:], base[1:]))


def test_token_losses_match_full_logits(files, monkeypatch):
    from transformers import AutoModelForCausalLM

    import ttt_adapt.evaluate as evaluate

    model = AutoModelForCausalLM.from_pretrained(files["adapted"]).eval()
    rows = tokenize_documents(files["tokenizer"], [document(1), document(2)[:50]], 96, pad_id=1)
    monkeypatch.setattr(evaluate, "LOGIT_SLICE", 7)  # several slices, the last one partial
    losses = evaluate.token_losses(model, rows, batch_size=2)
    with torch.no_grad():
        logits = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"].long()).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), rows["input_ids"][:, 1:],
                                                 reduction="none")
    mask = rows["attention_mask"]
    assert losses[:, 0].eq(0).all() and losses[1][~mask[1]].eq(0).all()
    torch.testing.assert_close(losses[:, 1:][mask[:, 1:]], expected[mask[:, 1:]])


def test_in_memory_models_as_training_passes_them(files, tmp_path):
    """train.py hands over the trained model in memory (in train mode): it is evaluated, then left in train mode."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(files["base"]).eval()
    adapted = AutoModelForCausalLM.from_pretrained(files["adapted"]).train()
    settings = EvalSettings(corpus=str(files["corpus"]), seq_len=64, lengths=[128], tasks=["kv_retrieval"],
                            num_samples=2)
    r = run_evaluation(settings, base, adapted, tmp_path, tokenizer=files["tokenizer"], log=lambda m: None)
    assert adapted.training and r["converted"]["equals_base"] and set(r["adapted"]["tasks"]) == {"kv_retrieval"}
    assert r["models"] == {"base": "Qwen3ForCausalLM (in memory)", "adapted": "TTTQwen3ForCausalLM (in memory)"}


@pytest.mark.parametrize("task", TASKS)
def test_task_samples_are_seeded_and_hold_the_answer_at_their_depth(files, task):
    tokenizer = files["tokenizer"]
    filler = [tokenizer(" " + s, add_special_tokens=False)["input_ids"] for s in PROSE]
    samples = make_samples(task, 300, 4, tokenizer, filler, seed=0)
    assert samples == make_samples(task, 300, 4, tokenizer, filler, seed=0)
    assert samples != make_samples(task, 300, 4, tokenizer, filler, seed=1)
    longest_piece = max(map(len, filler)) if task != "kv_retrieval" else 50  # tokens (= bytes here)
    for s in samples:
        ids, answer = s["input_ids"], s["answers"][0]
        assert len(ids) == 300 and s["prompt"] == tokenizer.decode(ids) and s["prompt"].endswith("? A:")
        question = s["prompt"].rsplit("\n\nQ: ", 1)[1]
        # a needle sits at the haystack piece boundary nearest its depth; the haystack is the prompt less the needles
        # (each its text and a space or newline, one token per byte) and the question
        sizes = [len(n["text"]) + 1 for n in s["needles"]]
        haystack = 300 - sum(sizes) - len("\n\nQ: " + question)
        for needle in s["needles"]:
            at = needle["position"]
            assert tokenizer.decode(ids[at:]).lstrip().startswith(needle["text"])
            before = sum(size for n, size in zip(s["needles"], sizes) if n["position"] < at)
            assert abs(at - before - needle["depth"] * haystack) <= longest_piece / 2 + 1
        holder = s["needles"][0]["text"] if task == "variable_tracking" else f"code {answer}."
        assert answer in holder and s["prompt"].count(holder) == 1
        if task == "variable_tracking":  # each chain's lines come in order; the question names chain 0's last variable
            first, second = s["needles"][:4], s["needles"][4:]
            assert all(a["position"] < b["position"] for chain in (first, second) for a, b in zip(chain, chain[1:]))
            assert question == f"What is the value of {first[-1]['text'].split()[1]}? A:"
        else:
            key = question.split("vault ")[1].split("?")[0]
            assert f"Vault {key} holds code {answer}." in s["prompt"]


def test_filler_keeps_plain_prose_only():
    text = ("The cat sat on the old mat by the door. Vault Dra holds code 1234. let x = 5; Q: What is it? A: 5.\n\n"
            "Everyone in Tolmar said the bridge was narrow. Bressa repeated the motto: zo ka.")
    assert filler_sentences([text, text]) == ["The cat sat on the old mat by the door.",
                                              "Everyone in Tolmar said the bridge was narrow."]


def test_score():
    assert score(" 4821.\nQ: What", ["4821"]) == 1.0
    assert score("the RED heron", ["a red heron", "red"]) == 0.5
    assert score(" 4812.", ["4821"]) == 0.0


def test_recall_tokens_are_the_answers(files):
    tokenizer = files["tokenizer"]
    rows = tokenize_documents(tokenizer, [document(7)], 256, pad_id=1)
    marked = rows["input_ids"][0][rows["recall"][0]].tolist()
    assert tokenizer.decode(marked) == "4007"


def test_generate_left_padded_batch_matches_one_by_one(files):
    from transformers import AutoModelForCausalLM

    tokenizer = files["tokenizer"]
    prompts = [tokenizer(t)["input_ids"] for t in (document(1)[:90], document(2)[:37], document(3)[:61])]
    for folder in (files["base"], files["adapted"]):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        batched = generate(model, tokenizer, prompts, batch_size=3, max_new_tokens=6)
        assert batched == [generate(model, tokenizer, [p], batch_size=1, max_new_tokens=6)[0] for p in prompts]


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

    from ttt_adapt.preflight import check_eval

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


def test_lm_eval_task_matches_own_generation(files, tmp_path):
    """The exported model under lm-evaluation-harness on the local task: the same greedy answers as `generate`, and
    the same substring scoring (references made from our own generations: 2 of 3 must match)."""
    pytest.importorskip("lm_eval")
    from transformers import AutoModelForCausalLM

    tokenizer = files["tokenizer"]
    filler = [tokenizer(" " + s, add_special_tokens=False)["input_ids"] for s in PROSE]
    samples = make_samples("niah_multikey", 240, 3, tokenizer, filler, seed=0)
    model = AutoModelForCausalLM.from_pretrained(files["adapted"]).eval()
    ours = generate(model, tokenizer, [s["input_ids"] for s in samples], batch_size=2, max_new_tokens=5)
    for s, answers in zip(samples, ([ours[0]], [ours[1] + "#"], [ours[2].upper()])):
        s["answers"] = answers
    assert write_lm_eval_task(tmp_path / "tasks", samples, max_new_tokens=5) == ["ttt_niah_multikey_240"]
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
         f"pretrained={files['adapted']},trust_remote_code=True,dtype=float32",
         "--include_path", str(tmp_path / "tasks"),
         "--tasks", "ttt_synthetic", "--device", "cpu", "--batch_size", "2", "--output_path", str(tmp_path / "results"),
         "--log_samples"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = next((tmp_path / "results").rglob("samples_ttt_niah_multikey_240_*.jsonl"))
    records = [json.loads(line) for line in logged.read_text().splitlines()]
    theirs = {r["doc"]["prompt"]: r["resps"][0][0] for r in records}
    assert theirs == {s["prompt"]: g for s, g in zip(samples, ours)}
    results = json.loads(next((tmp_path / "results").rglob("results_*.json")).read_text())["results"]
    assert results["ttt_niah_multikey_240"]["contains,none"] == pytest.approx(2 / 3)


def test_markdown_table_leaves_out_bins_without_tokens():
    report = {
        "bins": [0, 8, 16],
        "base": {"loss_by_position": [3.0, 2.5], "recall_loss_by_position": [None, 2.0], "tasks": {"kv_retrieval": {"64": 0.5}}},
        "adapted": {"loss_by_position": [3.0, 2.25], "recall_loss_by_position": [None, 1.5], "tasks": {"kv_retrieval": {"64": 0.75}}},
    }
    table = markdown_table(report)
    assert "recall-answer loss, positions 0-8" not in table
    assert "| recall-answer loss, positions 8-16 |" in table and "| loss, positions 0-8 |" in table
    assert "| kv_retrieval @ 64 tokens (accuracy) |" in table
