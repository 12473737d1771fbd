"""Training on conversations: the assistant-only loss gives masked tokens no gradient, a packed row of
conversations has the loss of each conversation alone, and `train.trainable: instruct` trains exactly the TTT
parameters and the TTT layers' down_proj."""

from pathlib import Path

import pytest
import torch
from conftest import TTT_LAYERS, changed_keys, checkpoint_weights, load, randomize_ttt
from transformers import AutoModelForCausalLM, AutoTokenizer

from ttt_adapt import TTTConfig, convert
from ttt_adapt.attention import use_packed_attention
from ttt_adapt.data.chat import render, set_chat_template
from ttt_adapt.data.mix import pack_units
from ttt_adapt.loss import IGNORE_INDEX, loss_sum, shift_labels
from ttt_adapt.model_setup import build_model
from ttt_adapt.pipeline import adapt
from ttt_adapt.training.loop import collate

pytestmark = pytest.mark.usefixtures("one_thread")
ASSETS = Path(__file__).parents[1] / "ttt_adapt" / "assets"


@pytest.fixture(scope="module")
def chat():
    """The shipped tiny base, converted (TTT layers 1-3, chunks of 8 tokens, non-trivial TTT weights), its tokenizer
    with the tiny chat template, and three rendered conversations."""
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny_qwen3_base")
    set_chat_template(tokenizer, ASSETS / "chat" / "chat_template.jinja")
    base = AutoModelForCausalLM.from_pretrained(ASSETS / "tiny_qwen3_base", dtype=torch.float64)
    model = randomize_ttt(convert(base, TTTConfig(layers=[1, 2, 3], chunk_size=8)), scale=0.05).eval()
    use_packed_attention(model)
    convs = []
    for i in range(3):
        messages = [{"role": "user", "content": f"The code of vault {'ABC'[i]} is {4821 + 7 * i}. " * (i + 1)}]
        messages += [{"role": "assistant", "content": "Noted."},
                     {"role": "user", "content": f"What is the code of vault {'ABC'[i]}?"},
                     {"role": "assistant", "content": f"A: {4821 + 7 * i}."}]
        ids, mask = render(tokenizer, messages, {})
        convs.append((ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)], True))
    return model, tokenizer, convs


def test_a_packed_row_of_conversations_has_the_loss_of_each_conversation_alone(chat):
    model, tokenizer, convs = chat
    seq_len = sum(len(ids) for ids, _, _ in convs) + 5  # three conversations and some padding in one row
    rows = list(pack_units(convs, seq_len, tokenizer.pad_token_id))
    assert len(rows) == 1 and rows[0]["attention_mask"][-5:] == [0] * 5
    with torch.no_grad():
        packed = loss_sum(model, shift_labels(collate(rows, "cpu")))
        alone = [loss_sum(model, shift_labels(collate(list(pack_units([c], len(c[0]), 1)), "cpu"))) for c in convs]
    assert all(chunk > 8 for chunk in (len(c[0]) for c in convs))  # each spans several TTT chunks
    torch.testing.assert_close(packed, sum(alone), rtol=1e-10, atol=1e-10)


def test_masked_tokens_carry_no_gradient(chat):
    model, tokenizer, convs = chat
    batch = shift_labels(collate(list(pack_units(convs, sum(len(c[0]) for c in convs), 1)), "cpu"))
    kept = {}

    def keep(module, args, out):
        out.retain_grad()
        kept["hidden"] = out

    handle = model.model.norm.register_forward_hook(keep)
    try:
        loss_sum(model, batch).backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    grad = kept["hidden"].grad[0].abs().sum(-1)  # d loss / d final hidden state, per position
    labelled = batch["labels"][0] != IGNORE_INDEX
    assert int(labelled.sum()) == sum(sum(lab != IGNORE_INDEX for lab in c[1][1:]) for c in convs)
    assert torch.all(grad[~labelled] == 0) and torch.all(grad[labelled] > 0)
    # what is predicted at the labelled positions is exactly what the assistant says, end-of-turn tokens included
    said = tokenizer.decode(batch["labels"][0][labelled])
    assert said == "".join(f"Noted.<|endoftext|>A: {4821 + 7 * i}.<|endoftext|>" for i in range(3))


def test_instruct_trains_the_ttt_parameters_and_the_ttt_layers_down_proj(files, tmp_path):
    chat_rows = tmp_path / "chat.jsonl"
    import json

    with open(chat_rows, "w") as f:
        for i in range(12):
            f.write(json.dumps({"messages": [{"role": "user", "content": "abc def " * (1 + i % 4)},
                                             {"role": "assistant", "content": "ghi jk."}]}) + "\n")
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] + ': ' }}{% if m['role'] == 'assistant' %}"
                        "{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}{% else %}"
                        "{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
    data = [f"data.path={chat_rows}", "data.format=chat", f"data.chat_template_path={template}", "data.eval_path=null",
            "data.eval_fraction=0.2"]
    recipe = load(files, tmp_path, overrides=data, train={"trainable": "instruct"})
    model = build_model(recipe)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    down = {f"model.layers.{i}.mlp.down_proj.weight" for i in TTT_LAYERS}
    assert trained == {n for n in initial if ".mlp.ttt." in n} | down
    adapt(recipe)
    assert changed_keys(initial, checkpoint_weights(recipe, 2)) == trained
