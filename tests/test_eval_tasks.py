"""Synthetic tasks (seeded, needles at their depths), the haystack's prose, scoring, left-padded generation, and
lm-evaluation-harness: our tasks written as a local task folder, and its own RULER tasks offline on an export."""

import json
import os
import subprocess
import sys

import pytest
from conftest import DEVICE, randomize_ttt
from eval_fixtures import PROSE, REPO, document, files  # noqa: F401 (a fixture)

from ttt_adapt import TTTConfig, convert
from ttt_adapt.eval import TASKS, EvalError, filler_sentences, generate, make_samples, score, write_lm_eval_task

pytestmark = pytest.mark.usefixtures("one_thread")


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



def test_generate_left_padded_batch_matches_one_by_one(files):
    from transformers import AutoModelForCausalLM

    tokenizer = files["tokenizer"]
    prompts = [tokenizer(t)["input_ids"] for t in (document(1)[:90], document(2)[:37], document(3)[:61])]
    for folder in (files["base"], files["adapted"]):
        model = AutoModelForCausalLM.from_pretrained(folder).eval().to(DEVICE)
        batched = generate(model, tokenizer, prompts, batch_size=3, max_new_tokens=6)
        assert batched == [generate(model, tokenizer, [p], batch_size=1, max_new_tokens=6)[0] for p in prompts]



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



RULER_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3")  # the RULER tasks that download nothing



def test_lm_eval_ruler_runs_offline_on_an_export_at_small_lengths(tmp_path):
    """lm-evaluation-harness's own RULER tasks against an exported TTT model with its local tokenizer, offline: the
    lengths come from `--metadata '{"max_seq_lengths": [...]}'` (the spelling its task code reads), every prompt is
    sized by the export's tokenizer, and nltk's punkt download (needed only for essay haystacks) is never tried."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("wonderwords")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shipped = REPO / "ttt_adapt" / "assets" / "tiny_qwen3_base"
    tokenizer = AutoTokenizer.from_pretrained(shipped)
    model = randomize_ttt(convert(AutoModelForCausalLM.from_pretrained(shipped), TTTConfig(layers=[1], chunk_size=64)),
                          scale=0.02)
    export = tmp_path / "export"
    model.save_pretrained(export)
    tokenizer.save_pretrained(export)
    (tmp_path / "nltk" / "tokenizers" / "punkt_tab").mkdir(parents=True)
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
         f"pretrained={export},trust_remote_code=True,dtype=float32", "--tasks", ",".join(RULER_TASKS),
         "--metadata", json.dumps({"max_seq_lengths": [512]}), "--limit", "2", "--device", "cpu", "--batch_size", "2",
         "--output_path", str(tmp_path / "results"), "--log_samples"],
        capture_output=True, text=True, cwd=tmp_path, timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "NLTK_DATA": str(tmp_path / "nltk")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "punkt" not in proc.stdout + proc.stderr
    results = json.loads(next((tmp_path / "results").rglob("results_*.json")).read_text())["results"]
    for task in RULER_TASKS:
        assert 0 <= results[task]["512,none"] <= 1 and results[task]["4096,none"] == -1  # the default length unused
        records = [json.loads(line) for line in next((tmp_path / "results").rglob(f"samples_{task}_*.jsonl")).open()]
        assert len(records) == 2
        for r in records:  # RULER sizes its input with our tokenizer, 128 tokens left for the answer
            doc = r["doc"]
            assert doc["max_length"] == 512 and 256 < doc["length"] <= 512
            assert doc["length"] == len(tokenizer(doc["input"])["input_ids"]) + 128
            assert doc["input"] in r["arguments"]["gen_args_0"]["arg_0"]


def test_attention_reach_is_the_stacked_sliding_window_only_when_every_layer_slides():
    from transformers import AutoConfig, Qwen3Config

    from ttt_adapt.eval.tasks import attention_reach

    tiny = AutoConfig.from_pretrained(REPO / "ttt_adapt" / "assets" / "tiny_qwen3_base")
    assert attention_reach(tiny) == 4 * 64  # 64-token window in each of its 4 layers
    sliding = dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=32, max_window_layers=0)
    assert attention_reach(Qwen3Config(**sliding)) == 96
    assert attention_reach(Qwen3Config(**{**sliding, "max_window_layers": 1})) is None  # layer 0 attends to all
    assert attention_reach(Qwen3Config(num_hidden_layers=3)) is None
    assert attention_reach(type("Old", (), dict(sliding_window=16, num_hidden_layers=2, use_sliding_window=True,
                                                max_window_layers=0))()) == 32  # no layer_types


@pytest.mark.parametrize("task", TASKS)
def test_needles_lie_beyond_the_attention_window_and_record_their_distance(files, task):
    tokenizer = files["tokenizer"]
    filler = [tokenizer(" " + s, add_special_tokens=False)["input_ids"] for s in PROSE]
    plain = make_samples(task, 300, 4, tokenizer, filler, seed=0)
    far = make_samples(task, 300, 4, tokenizer, filler, seed=0, min_distance=100)
    for samples, reach in ((plain, None), (far, 100)):
        for s in samples:
            ids = s["input_ids"]
            question = s["prompt"].rindex("\n\nQ: ")  # one token per byte: character index = token index
            assert len(ids) == 300 and s["min_distance"] == reach
            for needle in s["needles"]:
                last = needle["position"] + len(needle["text"])  # a space then the text, or the text then "\n"
                assert needle["distance"] == question - last
                assert reach is None or needle["distance"] >= reach
    assert any(n["distance"] < 100 for s in plain for n in s["needles"])  # without a window: anywhere
    assert [s["answers"] for s in far] == [s["answers"] for s in plain]  # the same draws, other places
    with pytest.raises(EvalError, match=r"task length 300 is too short for .* beyond the attention window.*"
                                        r"use lengths of \d+\+ tokens"):
        make_samples(task, 300, 1, tokenizer, filler, seed=0, min_distance=290)


def test_evaluation_of_a_sliding_window_model_builds_its_prompts_beyond_the_window(files, tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from ttt_adapt.eval import EvalSettings, run_evaluation

    tokenizer = files["tokenizer"]
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                         use_sliding_window=True, sliding_window=24, max_window_layers=0, pad_token_id=1,
                         eos_token_id=0)
    base = Qwen3ForCausalLM(config).eval()
    adapted = randomize_ttt(convert(base, TTTConfig(layers=[1], chunk_size=16)), scale=0.1)
    settings = EvalSettings(corpus=str(files["corpus"]), seq_len=64, lengths=[320], tasks=["niah_multikey"],
                            num_samples=2, max_length=0, max_new_tokens=2)
    run_evaluation(settings, base, adapted, tmp_path, tokenizer=tokenizer, log=lambda m: None)
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").open()]
    assert [s["min_distance"] for s in samples] == [48, 48]  # 2 layers x a 24-token window
    assert all(n["distance"] >= 48 for s in samples for n in s["needles"])
