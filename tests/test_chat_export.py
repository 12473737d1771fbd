"""The tiny chat default end to end, a few steps: it trains on the assistant tokens, evaluates base vs adapted on the
held-out conversations, exports the chat template, tokenizer and stop tokens, and the export reloads in a fresh
process without ttt_adapt and answers a chat prompt in the template's format, stopping at the end-of-turn token."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import BLOCK_TTT_ADAPT

from ttt_adapt.pipeline import adapt
from ttt_adapt.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).parents[1]

CHAT = BLOCK_TTT_ADAPT + textwrap.dedent(
    """
    import json, re
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    folder, conversation = sys.argv[1], json.loads(sys.argv[2])
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    prompt = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    assert tokenizer.decode(prompt["input_ids"][0]).endswith("?<|endoftext|>\\nassistant:\\n")
    out = model.generate(**prompt, max_new_tokens=24, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    end_of_turn = model.generation_config.eos_token_id
    assert out[-1].item() == end_of_turn and len(out) < 24, tokenizer.decode(out)  # stopped at the end of its turn
    answer = tokenizer.decode(out, skip_special_tokens=True)
    assert re.fullmatch(r"A: [^\\n]+\\.", answer), answer  # the template's format: one answer line
    chat = pipeline("text-generation", model=folder, trust_remote_code=True)
    reply = chat(conversation, max_new_tokens=24, do_sample=False)[0]["generated_text"][-1]
    assert reply == {"role": "assistant", "content": answer}, reply
    print("chat ok", repr(answer))
    """
)


def test_the_tiny_chat_default_trains_evaluates_exports_and_chats(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the recipe's paths are relative to the repository root
    recipe = load_recipe("recipes/tiny_qwen3_chat.yaml", [
        f"train.output_dir={tmp_path / 'run'}", f"export.dir={tmp_path / 'export'}", "train.max_steps=4",
        "train.warmup_steps=1", "train.save_every=0", "train.eval_every=0", "eval.max_docs=4",
        f"data.cache_dir={tmp_path / 'cache'}"])
    adapt(recipe)
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    assert report["kind"] == "chat" and report["converted"]["equals_base"]
    for model in ("base", "adapted", "adapted_swapped_state", "adapted_no_state"):
        assert report[model]["answers"] > 0 and 0 <= report[model]["answer_accuracy"] <= 1
        assert 0 <= report[model]["assistant_token_accuracy"] <= 1
        assert any(v is not None for v in report[model]["assistant_loss_by_position"])
    export = tmp_path / "export"
    assert (export / "chat_template.jinja").read_text() == (REPO / recipe.data.chat_template_path).read_text()
    card = (export / "README.md").read_text()
    assert 'pipeline("text-generation"' in card and "answer accuracy" in card
    held_out = json.loads((REPO / recipe.data.eval_path).read_text().splitlines()[0])["messages"]
    conversation = held_out[:-1]  # up to the last question
    run = subprocess.run([sys.executable, "-c", CHAT, str(export), json.dumps(conversation)], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0 and "chat ok" in run.stdout, run.stderr[-3000:]
