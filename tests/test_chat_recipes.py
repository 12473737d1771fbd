"""The shipped chat recipes: the instruct recipes keep the published TTT settings and train the instruct setting on
a text + chat mix; their training templates render the checkpoints' formats and mark exactly what the assistant
says; the tiny chat default loads."""

from pathlib import Path

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from ttt_adapt._util import RecipeError
from ttt_adapt.recipe import load_recipe
from ttt_adapt.training.preflight import check_files

REPO = Path(__file__).parents[1]
INSTRUCT = {"qwen3_4b_instruct.yaml": 36, "llama3_1_8b_instruct.yaml": 32}
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A long document. Q?"},
                {"role": "assistant", "content": "A: 42."}, {"role": "user", "content": "And?"},
                {"role": "assistant", "content": "A: 7."}]


@pytest.mark.parametrize("name, num_layers", INSTRUCT.items())
def test_instruct_recipes_keep_the_published_settings_and_train_the_instruct_setting(tmp_path, name, num_layers):
    text, chat = tmp_path / "docs.jsonl", tmp_path / "chat.jsonl"
    text.write_text('{"text": "a long document"}\n')
    chat.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    path = REPO / "recipes" / name
    mix = f"data.mix=[{{path: {text}, format: text, weight: 0.3}}, {{path: {chat}, format: chat, weight: 0.7}}]"
    recipe = load_recipe(path, [mix, f"data.eval_path={chat}", f"train.output_dir={tmp_path / 'run'}"])
    check_files(recipe)
    assert recipe.ttt.resolved_layers(num_layers) == list(range(0, num_layers, 6))
    assert (recipe.ttt.chunk_size, recipe.ttt.lr_init, recipe.data.seq_len) == (4096, 3.0, 32768)
    t = recipe.train
    assert (t.trainable, t.lr, t.weight_decay, t.clip_grad_norm, t.warmup_ratio) == ("instruct", 5e-6, 0.1, 1.0, 0.02)
    assert (t.mixed_precision, t.gradient_checkpointing) == ("bf16", True)
    assert [s.format for s in recipe.data.mix] == ["text", "chat"] and recipe.data.format == "chat"
    assert (REPO / recipe.data.chat_template_path).is_file()
    with pytest.raises(RecipeError, match=r"^data.mix\[0\].path: no such file or folder"):  # the placeholders
        check_files(load_recipe(path))


def spans(rendered: str, indices) -> list[str]:
    return [rendered[a:b] for a, b in indices]


def test_the_qwen3_training_template_renders_chatml_and_marks_the_assistant_turns():
    template = (REPO / "recipes" / "chat_templates" / "qwen3_instruct.jinja").read_text()
    (rendered,), (indices,) = render_jinja_template(conversations=[CONVERSATION], chat_template=template,
                                                    return_assistant_tokens_mask=True)
    assert rendered == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nA long document. Q?<|im_end|>\n"
                        "<|im_start|>assistant\nA: 42.<|im_end|>\n<|im_start|>user\nAnd?<|im_end|>\n"
                        "<|im_start|>assistant\nA: 7.<|im_end|>\n")
    assert spans(rendered, indices) == ["A: 42.<|im_end|>", "A: 7.<|im_end|>"]
    (prompt,), _ = render_jinja_template(conversations=[CONVERSATION[:2]], chat_template=template,
                                         add_generation_prompt=True)
    assert prompt.endswith("A long document. Q?<|im_end|>\n<|im_start|>assistant\n")


def test_the_llama3_1_training_template_renders_its_headers_and_marks_the_assistant_turns():
    template = (REPO / "recipes" / "chat_templates" / "llama3_1_instruct.jinja").read_text()
    (rendered,), (indices,) = render_jinja_template(conversations=[CONVERSATION], chat_template=template,
                                                    return_assistant_tokens_mask=True, bos_token="<|begin_of_text|>")
    assert rendered == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nA long document. "
        "Q?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA: 42.<|eot_id|><|start_header_id|>user"
        "<|end_header_id|>\n\nAnd?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA: 7.<|eot_id|>")
    assert spans(rendered, indices) == ["A: 42.<|eot_id|>", "A: 7.<|eot_id|>"]


def test_the_tiny_chat_default_loads_and_its_files_exist(monkeypatch):
    monkeypatch.chdir(REPO)
    recipe = load_recipe("recipes/tiny_qwen3_chat.yaml")
    check_files(recipe)
    assert (recipe.data.format, recipe.train.trainable, recipe.eval.tasks) == ("chat", "instruct", [])


def test_the_shipped_chat_corpus_is_the_generators():
    from ttt_adapt.data.corpus import TINY_CHAT, generate_conversations

    import json

    for split, stream in (("train", 2 * TINY_CHAT["seed"]), ("eval", 2 * TINY_CHAT["seed"] + 1)):
        lines = (REPO / "ttt_adapt" / "assets" / "chat" / f"{split}.jsonl").read_text().splitlines()
        assert len(lines) == TINY_CHAT[f"n_{split}"]
        first = generate_conversations(3, stream, min_chars=TINY_CHAT["min_chars"], max_chars=TINY_CHAT["max_chars"])
        assert [json.loads(line)["messages"] for line in lines[:3]] == first
