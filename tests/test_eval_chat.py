"""The chat evaluation (ttt_adapt.eval.chat): its answer accuracy is what greedy generate() does, its rows mark the
assistant turns the template marks, and its report renders in the evaluation table."""

from pathlib import Path

import pytest
import torch
from conftest import randomize_ttt
from transformers import AutoModelForCausalLM, AutoTokenizer

from ttt_adapt import TTTConfig, convert
from ttt_adapt.data.chat import render, set_chat_template
from ttt_adapt.eval.chat import answer_accuracy, conversation_rows, read_conversations, read_conversations_with
from ttt_adapt.eval.report import markdown_table
from ttt_adapt.eval.settings import EvalError

pytestmark = pytest.mark.usefixtures("one_thread")
ASSETS = Path(__file__).parents[1] / "ttt_adapt" / "assets"
MESSAGES = [{"role": "user", "content": "Vault Drelvok holds code 4821. The weather was cold. " * 3 + "Q: the code?"},
            {"role": "assistant", "content": "A: 4821."}, {"role": "user", "content": "Q: again?"},
            {"role": "assistant", "content": "A: 4821 again."}]


@pytest.fixture(scope="module")
def chat():
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny_qwen3_base")
    set_chat_template(tokenizer, ASSETS / "chat" / "chat_template.jinja")
    base = AutoModelForCausalLM.from_pretrained(ASSETS / "tiny_qwen3_base")
    return randomize_ttt(convert(base, TTTConfig(layers=[1, 3], chunk_size=8)), scale=0.05).eval(), tokenizer


def test_rows_mark_each_assistant_turn_as_the_template_does(chat):
    _, tokenizer = chat
    rows = conversation_rows(tokenizer, [MESSAGES], 256, {})
    ids, mask = render(tokenizer, MESSAGES, {})
    assert rows["input_ids"][0, : len(ids)].tolist() == ids
    assert rows["assistant"][0, : len(ids)].tolist() == [bool(m) for m in mask]
    turns = rows["turn"][0][rows["assistant"][0]]
    assert tokenizer.decode(rows["input_ids"][0][rows["turn"][0] == 1]) == "A: 4821 again.<|endoftext|>"
    assert sorted(set(turns.tolist())) == [0, 1]


def test_answer_accuracy_is_what_greedy_generation_writes(chat):
    """A turn counts as answered when every token is the argmax given the conversation before it: exactly when
    greedy generate() (with its cache, across TTT chunks) writes it."""
    model, tokenizer = chat
    prompt = tokenizer.apply_chat_template(MESSAGES[:1], add_generation_prompt=True, return_dict=True,
                                           return_tensors="pt")
    n = prompt["input_ids"].shape[1]
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=12, do_sample=False, use_cache=True,
                                   eos_token_id=None, pad_token_id=tokenizer.pad_token_id)[0]
    length = len(generated)
    rows = {"input_ids": generated[None], "attention_mask": torch.ones(1, length, dtype=torch.bool),
            "assistant": torch.zeros(1, length, dtype=torch.bool), "turn": torch.full((1, length), -1)}
    rows["assistant"][0, n:], rows["turn"][0, n:] = True, 0
    assert n > 16  # the answer is written after two TTT chunks have updated the fast weights
    _, hit = read_conversations_with(model, rows, batch_size=1)
    assert answer_accuracy(hit, rows) == {"answer_accuracy": 1.0, "answers": 1, "assistant_token_accuracy": 1.0}
    wrong = dict(rows, input_ids=rows["input_ids"].clone())
    wrong["input_ids"][0, -1] = (wrong["input_ids"][0, -1] + 1) % len(tokenizer)
    _, hit = read_conversations_with(model, wrong, batch_size=1)
    result = answer_accuracy(hit, wrong)
    assert result["answer_accuracy"] == 0.0
    assert result["assistant_token_accuracy"] == pytest.approx(1 - 1 / (length - n))


def test_the_chat_report_renders_in_the_evaluation_table():
    entry = {"assistant_loss_by_position": [None, 2.0], "answer_accuracy": 0.25, "answers": 8,
             "assistant_token_accuracy": 0.5}
    report = {"kind": "chat", "bins": [0, 64, 128], "base": entry, "adapted": dict(entry, answer_accuracy=0.5)}
    table = markdown_table(report)
    assert "| assistant-token loss, positions 64-128 | 2.0000 | 2.0000 | +0.0000 |" in table
    assert "| answer accuracy (greedy reproduces the reference; 8 answers) | 0.2500 | 0.5000 | +0.2500 |" in table


def test_bad_chat_corpora_are_one_line_errors(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(EvalError, match=r"chat.jsonl:1: not a conversation \(has no assistant turn\)"):
        read_conversations(path)
    with pytest.raises(EvalError, match="cannot read the chat corpus"):
        read_conversations(tmp_path / "missing.jsonl")
