"""Model-level invariants: step-0 equality, decoding, padding, packing, generation, bad input."""

import pytest
import torch
from conftest import CACHE_KW, DEVICE, FAMILY_ARCHS, randomize_ttt, tiny_base
from transformers import AutoModelForCausalLM, DynamicCache, GPT2Config, GPT2LMHeadModel

from ttt_adapt import TTTConfig, convert
from ttt_adapt.compat import enable_activation_checkpointing


def ttt_model(arch="qwen3", chunk_size=4, layers=(0, 2), seed=0, **kw):
    config = TTTConfig(layers=list(layers), chunk_size=chunk_size, **kw)
    model = convert(tiny_base(arch, seed=seed, device=DEVICE), config)
    return randomize_ttt(model).eval()


ARCHS = list(FAMILY_ARCHS)
pytestmark = pytest.mark.usefixtures("one_thread")


def gen_positions(mask):
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("ttt_kw", [{}, {"lr_mode": "token", "target": "input_embed", "state_decay": 0.7},
                                    {"write_rule": "delta", "key_norm": True}])
def test_converted_equals_base_at_step_zero(arch, ttt_kw):
    tie = arch in ("llama", "gemma3")
    base = tiny_base(arch, tie=tie, device=DEVICE)
    ids = torch.randint(3, 97, (2, 37)).to(DEVICE)
    with torch.no_grad():
        ref = base(ids).logits
        model = convert(base, TTTConfig(layers=[0, 3], chunk_size=8, **ttt_kw))
        assert torch.equal(model(ids).logits, ref)
    # the base weights are shared, not copied
    assert model.model.embed_tokens.weight is base.model.embed_tokens.weight
    assert model.model.layers[0].mlp.down_proj.weight is base.model.layers[0].mlp.down_proj.weight
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("arch", ARCHS)
def test_ttt_model_holds_what_the_stock_model_holds(arch):
    """The TTT causal LM is built without the stock __init__ (TTTCausalLMMixin): it must still hold every stock
    submodule (of the stock type or a subclass; TTT MLPs aside) and every public attribute, so a family whose
    causal LM builds more than `model` + `lm_head` fails here."""
    base = tiny_base(arch)
    model = convert(base, TTTConfig(layers=[0, 2], chunk_size=4))
    stock, ttt = dict(base.named_modules()), dict(model.named_modules())
    ttt_mlps = {f"model.layers.{i}.mlp" for i in (0, 2)}
    assert set(stock) <= set(ttt) and all(".mlp.ttt" in n for n in set(ttt) - set(stock))
    for name, module in stock.items():
        assert name in ttt_mlps or isinstance(ttt[name], type(module)), (name, type(ttt[name]), type(module))
    public = lambda m: {k for k in vars(m) if not k.startswith("_")}  # noqa: E731
    assert public(model) == public(base) and public(model.model) == public(base.model)
    assert model.config.model_type == "ttt_" + base.config.model_type


@pytest.mark.parametrize("arch", ARCHS)
def test_input_embed_target_is_what_the_decoder_receives(arch):
    """Gemma 3 scales its embeddings inside `embed_tokens`: the `input_embed` target is the decoder's input,
    scale included, for every family."""
    model = ttt_model(arch, target="input_embed")
    ids = torch.randint(3, 97, (2, 9)).to(DEVICE)
    seen = {}

    def decoder_input(module, args, kwargs):
        seen["decoder_input"] = args[0] if args else kwargs["hidden_states"]

    def target_source(module, args):
        seen["target_source"] = module.ttt_context.inputs_embeds

    model.model.layers[0].register_forward_pre_hook(decoder_input, with_kwargs=True)
    model.model.layers[2].mlp.register_forward_pre_hook(target_source)
    with torch.no_grad():
        model(ids)
    assert torch.equal(seen["target_source"], seen["decoder_input"])
    if arch == "gemma3":  # the scale really is in it
        raw = model.model.embed_tokens.weight[ids]
        torch.testing.assert_close(seen["target_source"], raw * model.config.hidden_size**0.5)


def test_ttt_changes_only_later_chunks():
    model = ttt_model(chunk_size=8)
    base_logits = None
    ids = torch.randint(3, 97, (1, 24)).to(DEVICE)
    with torch.no_grad():
        got = model(ids).logits
        for m in model.ttt_modules().values():
            m.ttt.conv.weight.zero_()
        base_logits = model(ids).logits
    assert torch.equal(got[:, :8], base_logits[:, :8])  # chunk 0 reads no update
    assert not torch.allclose(got[:, 8:], base_logits[:, 8:])


@pytest.mark.parametrize(
    "arch,kw",
    [("qwen3", {"lr_mode": "token"}), ("llama", {}), ("qwen3", {"target": "input_embed", "clip_update_norm": 0.5}),
     ("qwen2", {"lr_mode": "token"}), ("mistral", {}), ("gemma3", {}), ("gemma3", {"target": "input_embed"}),
     ("qwen3", {"state_decay": 0.6, "lr_mode": "token"}), ("gemma3", {"state_decay": 0.5, "target": "input_embed"}),
     ("qwen3", {"write_rule": "delta", "key_norm": True, "lr_mode": "token"}), ("llama", {"key_norm": True}),
     ("gemma3", {"write_rule": "delta", "state_decay": 0.8, "target": "input_embed"})],
)
def test_incremental_decoding_equals_full_forward(arch, kw):
    model = ttt_model(arch, chunk_size=4, **kw)
    ids = torch.randint(3, 97, (2, 19)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on row 1
    pos = gen_positions(mask)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :5], attention_mask=mask[:, :5], position_ids=pos[:, :5], **{CACHE_KW: cache}, use_cache=True).logits]
        for j in range(5, 19):
            out = model(ids[:, j : j + 1], attention_mask=mask[:, : j + 1], position_ids=pos[:, j : j + 1], **{CACHE_KW: cache}, use_cache=True)
            steps.append(out.logits)
        inc = torch.cat(steps, dim=1)
    real = mask.bool()
    torch.testing.assert_close(inc[real], full[real], rtol=1e-4, atol=1e-5)


RULES = {"sum": {}, "decay": {"state_decay": 0.6}, "delta": {"write_rule": "delta", "key_norm": True}}


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("arch", ARCHS)
def test_multi_token_continuation_with_cache_equals_full_forward(arch, rule):
    model = ttt_model(arch, chunk_size=4, **RULES[rule])
    ids = torch.randint(3, 97, (2, 23)).to(DEVICE)
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        parts = []
        for a, b in [(0, 6), (6, 7), (7, 13), (13, 16), (16, 23)]:  # prefill, a step, then chunks mid-way
            pos = torch.arange(a, b).to(DEVICE).unsqueeze(0).expand(2, -1)
            parts.append(model(ids[:, a:b], position_ids=pos, **{CACHE_KW: cache}, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-5)


def test_continuation_without_fast_weight_state_refused():
    """A call that continues sequences (positions past 0) without the cache that holds their fast weights -- a
    caller dropping the cache, or vLLM's transformers backend (new tokens of every request flattened into one row,
    their positions, no cache) -- would silently drop the updates of earlier chunks: it raises instead."""
    model = ttt_model("qwen3", chunk_size=4)
    ids = torch.randint(3, 97, (2, 9)).to(DEVICE)
    msg = "continues a sequence .* without its fast-weight state"
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(ids[:, :8], **{CACHE_KW: cache}, use_cache=True)
        for kw in ({"use_cache": False}, {"use_cache": True}, {CACHE_KW: DynamicCache(config=model.config)}):
            with pytest.raises(ValueError, match=msg):  # a decode step that dropped (or replaced) the cache
                model(ids[:, 8:], position_ids=torch.tensor([[8], [8]]).to(DEVICE), **kw)
        # vLLM: a new prompt's prefill, another's decode, a third
        flat = torch.tensor([[0, 1, 2, 3, 12, 0, 1]]).to(DEVICE)
        with pytest.raises(ValueError, match=msg):
            model(ids[:1, :7], position_ids=flat, use_cache=False)
        with pytest.raises(ValueError, match=msg):  # a prompt's second prefill chunk
            model(ids[:, 4:], position_ids=torch.arange(4, 9).to(DEVICE).expand(2, 5), use_cache=False)
        # What stays allowed: the cached step, fresh sequences, packed rows, left pads carrying any position.
        model(ids[:, 8:], position_ids=torch.tensor([[8], [8]]).to(DEVICE), **{CACHE_KW: cache}, use_cache=True)
        model(ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]).to(DEVICE).expand(2, 9), use_cache=False)
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        model(ids, attention_mask=mask, position_ids=torch.arange(9).to(DEVICE).expand(2, 9), use_cache=False)
        model(ids, attention_mask=mask, position_ids=gen_positions(mask))


def left_padded_rows(lengths=(14, 9, 5)):
    """Random rows of `lengths` tokens, and the left-padded batch of them: (rows, ids, attention mask)."""
    rows = [torch.randint(3, 97, (n,)).to(DEVICE) for n in lengths]
    L = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long).to(DEVICE)
    mask = torch.zeros(len(rows), L, dtype=torch.long).to(DEVICE)
    for i, r in enumerate(rows):
        ids[i, L - len(r) :], mask[i, L - len(r) :] = r, 1
    return rows, ids, mask


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_equals_rows_alone(arch, rule):
    model = ttt_model(arch, chunk_size=4, **RULES[rule])
    rows, ids, mask = left_padded_rows()
    L = ids.shape[1]
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, position_ids=gen_positions(mask)).logits
        for i, r in enumerate(rows):
            alone = model(r.unsqueeze(0)).logits[0]
            torch.testing.assert_close(batch[i, L - len(r) :], alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("arch", ARCHS)
def test_packed_documents_equal_each_alone(arch, rule):
    model = ttt_model(arch, chunk_size=4, **RULES[rule])
    docs = [torch.randint(3, 97, (n,)).to(DEVICE) for n in (9, 3, 12)]
    ids = torch.cat(docs).unsqueeze(0)
    pos = torch.cat([torch.arange(len(d)).to(DEVICE) for d in docs]).unsqueeze(0)
    with torch.no_grad():
        packed = model(ids, position_ids=pos, use_cache=False).logits[0]  # as transformers: packing needs no cache
        start = 0
        for d in docs:
            alone = model(d.unsqueeze(0)).logits[0]
            torch.testing.assert_close(packed[start : start + len(d)], alone, rtol=1e-4, atol=1e-5)
            start += len(d)


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_left_padded_batch_matches_rows_alone(arch):
    model = ttt_model(arch, chunk_size=4)
    rows = [torch.randint(3, 97, (n,)).to(DEVICE) for n in (7, 3)]
    ids = torch.zeros(2, 7, dtype=torch.long).to(DEVICE)
    mask = torch.zeros(2, 7, dtype=torch.long).to(DEVICE)
    for i, r in enumerate(rows):
        ids[i, 7 - len(r) :] = r
        mask[i, 7 - len(r) :] = 1
    kw = dict(max_new_tokens=11, do_sample=False, pad_token_id=0, eos_token_id=None)
    batch = model.generate(ids, attention_mask=mask, **kw)
    for i, r in enumerate(rows):
        alone = model.generate(r.unsqueeze(0), attention_mask=torch.ones(1, len(r), dtype=torch.long).to(DEVICE), **kw)
        assert torch.equal(batch[i, 7:], alone[0, len(r) :])


def test_generate_greedy_equals_argmax_of_full_forward():
    model = ttt_model(chunk_size=4)
    ids = torch.randint(3, 97, (1, 6)).to(DEVICE)
    out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        logits = model(out).logits
    assert torch.equal(out[0, 6:], logits[0, 5:-1].argmax(-1))


def test_beam_search_sampling_and_return_sequences_run():
    model = ttt_model(chunk_size=3)
    ids = torch.randint(3, 97, (2, 5)).to(DEVICE)
    common = dict(max_new_tokens=9, pad_token_id=0, eos_token_id=None)
    beams = model.generate(ids, num_beams=3, num_return_sequences=2, do_sample=False, **common)
    assert beams.shape == (4, 14)
    torch.manual_seed(0)
    sampled = model.generate(ids, do_sample=True, num_return_sequences=3, top_k=5, **common)
    assert sampled.shape == (6, 14)
    # beam search with one beam is greedy
    one = model.generate(ids, num_beams=1, do_sample=False, **common)
    greedy = model.generate(ids, do_sample=False, **common)
    assert torch.equal(one, greedy)


@pytest.mark.parametrize("arch", ARCHS)
def test_beam_search_reorders_fast_weights(arch):
    """Beam search must give the same best sequence as scoring candidates by full forwards would allow:
    checked by comparing beam scores with the full-forward log-probability of the returned beams."""
    model = ttt_model(arch, chunk_size=3)
    ids = torch.randint(3, 97, (1, 4)).to(DEVICE)
    out = model.generate(
        ids, num_beams=3, num_return_sequences=3, do_sample=False, max_new_tokens=8, pad_token_id=0,
        eos_token_id=None, output_scores=True, return_dict_in_generate=True, length_penalty=0.0,
    )
    with torch.no_grad():
        logp = torch.log_softmax(model(out.sequences).logits.float(), -1)
    seq_scores = logp[:, 3:-1].gather(-1, out.sequences[:, 4:, None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(seq_scores, out.sequences_scores, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("how", ["assistant_model", "prompt_lookup", "generation_config", "model_default"])
def test_speculative_decoding_refused_before_any_token(how):
    """Assisted and prompt-lookup decoding would crop the cache after the fast weights read rejected drafts: refused
    in one line by our own check (transformers 5.25 no longer refuses stateful models), before either model runs."""
    from transformers import GenerationConfig

    model, assistant = ttt_model(), ttt_model(seed=1)
    calls = []
    for m in (model, assistant):
        m.register_forward_pre_hook(lambda mod, args: calls.append(type(mod).__name__))
    ids = torch.randint(3, 97, (1, 5)).to(DEVICE)
    kwargs = dict(max_new_tokens=3, pad_token_id=0)
    if how == "assistant_model":
        kwargs["assistant_model"] = assistant
    elif how == "prompt_lookup":
        kwargs["prompt_lookup_num_tokens"] = 2
    elif how == "generation_config":
        kwargs["generation_config"] = GenerationConfig(prompt_lookup_num_tokens=2, max_new_tokens=3, pad_token_id=0)
    else:
        model.generation_config.prompt_lookup_num_tokens = 2
    with pytest.raises(ValueError, match="stateful") as err:
        model.generate(ids, **kwargs)
    assert "\n" not in str(err.value) and calls == []


def test_gradient_checkpointing_gives_same_gradients():
    model = ttt_model(chunk_size=4).train()
    ids = torch.randint(3, 97, (2, 13)).to(DEVICE)
    pos = torch.cat([torch.arange(6).to(DEVICE), torch.arange(7).to(DEVICE)]).unsqueeze(0).expand(2, -1)

    def grads():
        model.zero_grad()
        model(ids, position_ids=pos, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if ".ttt." in n}

    ref = grads()
    enable_activation_checkpointing(model)
    got = grads()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("target", ["hidden_states", "input_embed"])
def test_reentrant_gradient_checkpointing_gives_same_gradients(arch, target):
    """What Trainer and peft users pass: transformers' own switch with `use_reentrant=True`. Reentrant checkpointing
    carries gradients back through a layer's positional tensor arguments only, so the `input_embed` target reaches
    the TTT layer as one (not only through the TTT context)."""
    model = ttt_model(arch, chunk_size=4, target=target, lr_mode="token").train()
    ids = torch.randint(3, 97, (2, 13)).to(DEVICE)
    pos = torch.cat([torch.arange(6).to(DEVICE), torch.arange(7).to(DEVICE)]).unsqueeze(0).expand(2, -1)

    def grads():
        model.zero_grad()
        model(ids, position_ids=pos, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    got = grads()
    assert got.keys() == ref.keys() and any(".ttt.conv" in n for n in got)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7, msg=n)


def test_auto_classes_resolve_ttt_model_types(tmp_path):
    model = ttt_model()
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).to(DEVICE)
    assert type(again).__name__ == "TTTQwen3ForCausalLM"
    ids = torch.randint(3, 97, (1, 11)).to(DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    "cfg,match",
    [
        (TTTConfig(layers=[4]), "out of range"),
        (TTTConfig(layers=[1, 1]), "repeated"),
        (TTTConfig(chunk_size=0), "chunk_size"),
        (TTTConfig(conv_kernel_size=4), "odd"),
        (TTTConfig(lr_mode="vector"), "lr_mode"),
        (TTTConfig(target="logits"), "target"),
        (TTTConfig(layers=[]), "empty"),
        (TTTConfig(state_decay=0.0), "state_decay"),
        (TTTConfig(state_decay=1.5), "state_decay"),
    ],
)
def test_bad_config_rejected(cfg, match):
    with pytest.raises(ValueError, match=match):
        convert(tiny_base(), cfg)


def test_not_gated_multimodal_bidirectional_and_already_converted_rejected():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    supported = ("In-Place TTT takes Qwen3ForCausalLM (qwen3), Qwen2ForCausalLM (qwen2), LlamaForCausalLM (llama), "
                 "MistralForCausalLM (mistral), Gemma3ForCausalLM (gemma3_text)")
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="not gated") as err:
        convert(gpt2, TTTConfig(layers=[0]))
    assert str(err.value).endswith(supported) and "\n" not in str(err.value)
    text = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    multimodal = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4))
    with pytest.raises(ValueError, match=r"^Gemma3ForConditionalGeneration is a multimodal model \(gemma3\)") as err:
        convert(multimodal, TTTConfig(layers=[0]))
    assert str(err.value).endswith(supported) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="bidirectional attention"):
        convert(tiny_base("gemma3", use_bidirectional_attention=True), TTTConfig(layers=[0]))
    model = ttt_model()
    with pytest.raises(ValueError, match="already an In-Place TTT model"):
        convert(model, TTTConfig(layers=[0]))


def test_bf16_model_accumulates_fast_weights_in_fp32():
    model32 = ttt_model(chunk_size=4)
    model16 = ttt_model(chunk_size=4).to(torch.bfloat16)
    ids = torch.randint(3, 97, (1, 18)).to(DEVICE)
    with torch.no_grad():
        cache = DynamicCache(config=model16.config)
        out16 = model16(ids, **{CACHE_KW: cache}, use_cache=True).logits
        out32 = model32(ids).logits
    state = cache.layers[0].ttt_state
    assert state.S.dtype == torch.float32 and state.buf_x.dtype == torch.bfloat16
    assert int(state.n[0]) == 18 % 4
    torch.testing.assert_close(out16.float(), out32, rtol=0.1, atol=0.1)
