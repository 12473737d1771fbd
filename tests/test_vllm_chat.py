"""A chat export served by vLLM through the plugin: `/v1/chat/completions` renders the export's own chat template
and answers with exactly the tokens greedy decoding by full forwards in transformers gives, stopping at the
template's end-of-turn token. Runs where vLLM is installed (CI's vLLM environment).

The export is tiny and random (tests/test_vllm.py's Qwen3, head_dim 32): vLLM's CPU attention takes head sizes
32, 64, 80, ... but not the 48 of the shipped tiny base, so the tiny chat default's own export cannot be served
on CPU; its template has the same structure (role header, message, end-of-turn token, generation marks)."""

import torch
from test_vllm import needs_vllm, openai_server, tiny_ttt, word_tokenizer

EOT = 1  # [EOS]: the end-of-turn token of the template below
TEMPLATE = (
    "{%- for m in messages -%}{{- ('w4 ' if m['role'] == 'user' else 'w5 ') -}}"
    "{%- if m['role'] == 'assistant' -%}{%- generation -%}{{- m['content'] + eos_token -}}{%- endgeneration -%}"
    "{%- else -%}{{- m['content'] + eos_token -}}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'w5 ' -}}{%- endif -%}"
)
MAX_TOKENS = 12
TOKENIZER = word_tokenizer()
TOKENIZER.chat_template = TEMPLATE


def chat_export(folder, prompt):
    """The tiny Qwen3 TTT model with a word tokenizer whose chat template marks assistant turns, saved as an export
    is (config, weights, tokenizer with its template, generation config stopping at the end-of-turn token). Its
    end-of-turn row of lm_head is made a little larger than that of the third token it would answer `prompt` with,
    so the answer ends with the end-of-turn token within a few tokens."""
    model = tiny_ttt("qwen3")
    third = greedy_until_end_of_turn(model, prompt)[2]
    with torch.no_grad():
        model.lm_head.weight[EOT] = 1.05 * model.lm_head.weight[third]
    model.generation_config.eos_token_id = EOT
    model.save_pretrained(folder)
    TOKENIZER.save_pretrained(folder)
    return model


def greedy_until_end_of_turn(model, prompt):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            ids.append(int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
            if ids[-1] == EOT:
                break
    return ids[len(prompt):]


@needs_vllm
def test_chat_completions_answer_with_the_full_forward_greedy_tokens(tmp_path):
    messages = [{"role": "user", "content": " ".join(f"w{t}" for t in range(20, 60, 3))},
                {"role": "assistant", "content": "w7 w8 w9"},
                {"role": "user", "content": "w11 w12 w13 w90 w91"}]
    tokenizer = TOKENIZER
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    assert tokenizer.decode(prompt[-1:]) == "w5" and prompt.count(EOT) == 3  # a header, each turn ended
    folder = tmp_path / "chat_export"
    model = chat_export(folder, prompt)
    expected = greedy_until_end_of_turn(model, prompt)
    assert len(prompt) > 16 and EOT in expected  # past two TTT chunks of 8; the answer ends its turn
    with openai_server(folder, "ttt-chat", tmp_path) as post:
        answer = post("/v1/chat/completions", {"model": "ttt-chat", "messages": messages, "max_tokens": MAX_TOKENS,
                                               "temperature": 0, "logprobs": True})
    choice = answer["choices"][0]
    served = [tokenizer.convert_tokens_to_ids(t["token"]) for t in choice["logprobs"]["content"]]
    assert served == expected, (served, expected)
    assert expected[-1] == EOT and choice["finish_reason"] == "stop"  # it stopped at the end-of-turn token
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].split() == [f"w{t}" for t in expected[:-1]]
