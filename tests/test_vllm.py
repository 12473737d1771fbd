"""Serving in vLLM (ttt_adapt.vllm_plugin) is exact: vLLM's tokens and log-probabilities equal greedy decoding by
full forwards in transformers, with requests batched together, prompts cut by chunked prefill and several
sequences per request; vLLM's transformers backend (plugin not loaded) refuses an export instead of serving it
wrong; the OpenAI-compatible server answers. Runs where vLLM is installed (CI's vLLM environment)."""

import gc
import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.request
from contextlib import contextmanager

import pytest
import torch

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from conftest import free_port
from ttt_adapt import TTTConfig, convert
from ttt_adapt.modeling import FAMILIES
from ttt_adapt.vllm_plugin import ARCHITECTURES

try:
    import vllm  # noqa: F401

    NO_VLLM = None
except ImportError as e:
    NO_VLLM = f"vLLM is not installed ({e}): the serving tests run in CI's vLLM environment (.ci/run)"
needs_vllm = pytest.mark.skipif(NO_VLLM is not None, reason=NO_VLLM or "")

PROMPT_LENGTHS = (5, 13, 22, 37)
NEW_TOKENS = 16
VOCAB = 128
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
os.environ.update(ENV)


def test_plugin_registers_the_architecture_names_exports_write():
    """The names vLLM resolves exports by (config.json `architectures`) are the TTT causal LM classes' names; the
    entry point vLLM loads is `register`."""
    from importlib.metadata import entry_points

    assert set(ARCHITECTURES) == {lm.__name__ for lm in FAMILIES.values()}  # every family is served
    plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert plugins.get("ttt_adapt") == "ttt_adapt.vllm_plugin:register"


# Each family's tiny base, with its own details switched on. Windows of 16 tokens: prompts (up to 37) plus the 16
# generated tokens run past them. Qwen2 slides on every layer (vLLM's Qwen2 refuses a mix), Mistral always does;
# Gemma 3's TTT layer 1 slides and TTT layer 3 is global (and its embeddings are tied, as in Gemma 3 checkpoints).
WINDOW = 16
FAMILY_BASES = {
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {}),
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM,
              dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=WINDOW)),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, dict(
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "full_attention"],
        sliding_window=WINDOW, query_pre_attn_scalar=16, final_logit_softcapping=5.0, tie_word_embeddings=True)),
}


def tiny_ttt(arch, **ttt):
    """A tiny base converted with TTT on layers 1 and 3, per-token rates, non-zero conv (head_dim 32: the smallest
    vLLM's CPU attention takes). Chunk 8 for Qwen3 (the plugin's buffer of known targets: K = 2 rows), 16 for the
    other families (K = 5, which does not divide the chunk). `ttt`: more TTTConfig settings."""
    config_cls, lm_cls, extra = FAMILY_BASES[arch]
    torch.manual_seed(0)
    config = config_cls(**{
        **dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=2,
               num_key_value_heads=1, head_dim=32, max_position_embeddings=512, pad_token_id=0, eos_token_id=1,
               bos_token_id=2, tie_word_embeddings=False),
        **extra,
    })
    chunk = 8 if arch == "qwen3" else 16
    model = convert(lm_cls(config).eval(), TTTConfig(layers=[1, 3], chunk_size=chunk, lr_mode="token", **ttt))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ttt." in name and not name.endswith(".lr"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    assert all(m.ttt.conv.weight.abs().sum() > 0 for m in model.ttt_modules().values())
    return model


def word_tokenizer():
    """A word-level tokenizer over the tiny vocabulary ("w4".."w127"), so the server can take text."""
    vocab = {"[PAD]": 0, "[EOS]": 1, "[BOS]": 2, "[UNK]": 3, **{f"w{i}": i for i in range(4, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", bos_token="[BOS]",
                                   unk_token="[UNK]")


def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def full_forward_logprobs(model, prompt, continuation):
    """log p(continuation[j] | prompt + continuation[:j]) by one full forward (no cache), fp32."""
    ids = torch.tensor([prompt + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids, use_cache=False).logits[0].float(), -1)
    return [float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(continuation)]


def greedy_by_full_forwards(model, prompt, n=NEW_TOKENS):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_exports")
    out = {}
    variants = {arch: (arch, {}) for arch in FAMILY_BASES}
    # the state decays before each chunk's update, and updates are clipped (norms 14-29 here: some chunks are)
    variants["qwen3_decay"] = ("qwen3", dict(state_decay=0.6, clip_update_norm=20.0))
    for name, (arch, ttt) in variants.items():
        model = tiny_ttt(arch, **ttt)
        model.save_pretrained(root / name)
        word_tokenizer().save_pretrained(root / name)
        out[name] = (root / name, model)
    return out


def run_llm(folder, requests, **engine):
    """Generate with a fresh vLLM engine on the export; [(token ids, logprobs) per sequence] per request."""
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    engine = {"max_num_seqs": 8, "max_model_len": 128, **engine}
    llm = LLM(str(folder), dtype="float32", enforce_eager=True, seed=0, **engine)
    try:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p, _ in requests], [s for _, s in requests],
                            use_tqdm=False)
        if not engine.get("disable_log_stats", True):
            run_llm.preemptions = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return [[(list(c.token_ids), [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)]) for c in o.outputs]
            for o in outs]


def greedy(n=1, **kw):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0, logprobs=0, ignore_eos=True, n=n, **kw)


def check_exact(model, requests, results):
    """Every sequence's log-probabilities equal the full forward's (1e-3); greedy sequences equal its argmax."""
    worst = 0.0
    for (prompt, params), seqs in zip(requests, results):
        assert len(seqs) == params.n
        for tokens, logprobs in seqs:
            assert len(tokens) == NEW_TOKENS
            if params.temperature == 0:
                assert tokens == greedy_by_full_forwards(model, prompt)
            ref = full_forward_logprobs(model, prompt, tokens)
            worst = max(worst, max(abs(a - b) for a, b in zip(logprobs, ref)))
    assert worst < 1e-3, worst
    return worst


def ttt_matters(model, requests, results):
    """The same tokens scored with the fast weights switched off differ: the tests exercise the TTT state."""
    with torch.no_grad():
        saved = {i: m.ttt.conv.weight.clone() for i, m in model.ttt_modules().items()}
        for m in model.ttt_modules().values():
            m.ttt.conv.weight.zero_()
        try:
            (prompt, _), ((tokens, logprobs), *_) = requests[-1], results[-1]
            base = full_forward_logprobs(model, prompt, tokens)
        finally:
            for i, m in model.ttt_modules().items():
                m.ttt.conv.weight.copy_(saved[i])
    return max(abs(a - b) for a, b in zip(logprobs, base))


def window_matters(model, requests, results):
    """The same tokens scored with the sliding windows widened past the sequences differ: the windows matter."""
    attns = [m for name, m in model.named_modules() if name.endswith("self_attn")]
    saved = model.config.sliding_window, [getattr(a, "sliding_window", None) for a in attns]
    model.config.sliding_window = 10**6
    for a in attns:
        if getattr(a, "sliding_window", None) is not None:
            a.sliding_window = 10**6
    try:
        (prompt, _), ((tokens, logprobs), *_) = requests[-1], results[-1]
        wide = full_forward_logprobs(model, prompt, tokens)
    finally:
        model.config.sliding_window = saved[0]
        for a, w in zip(attns, saved[1]):
            if w is not None:
                a.sliding_window = w
    return max(abs(a - b) for a, b in zip(logprobs, wide))


@needs_vllm
def test_qwen3_batched_requests_and_several_sequences_equal_full_forwards(exports):
    from vllm import SamplingParams

    folder, model = exports["qwen3"]
    requests = [(p, greedy()) for p in prompts()]
    # two sampled sequences of one request: each has its own fast weights
    requests.append((prompts()[2], SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, seed=3, n=2, logprobs=0,
                                                  ignore_eos=True)))
    results = run_llm(folder, requests, skip_tokenizer_init=True)
    check_exact(model, requests, results)
    assert results[-1][0][0] != results[-1][1][0]  # the two samples differ
    assert ttt_matters(model, requests[:4], results[:4]) > 1e-2


@needs_vllm
def test_qwen3_chunked_prefill_cutting_prompts_anywhere_equals_full_forwards(exports):
    folder, model = exports["qwen3"]
    requests = [(p, greedy()) for p in prompts()]
    # 7 tokens per step: every prompt but the shortest is cut, at offsets that are not chunk (8) boundaries
    results = run_llm(folder, requests, skip_tokenizer_init=True, max_num_batched_tokens=7,
                      max_num_seqs=4, enable_chunked_prefill=True)
    check_exact(model, requests, results)


def decay_matters(model, requests, results):
    """The same tokens scored with the state decay switched off (the plain sum) differ: the decay is applied."""
    (prompt, _), ((tokens, logprobs), *_) = requests[-1], results[-1]
    saved = {i: m.state_decay for i, m in model.ttt_modules().items()}
    try:
        for m in model.ttt_modules().values():
            m.state_decay = None
        plain = full_forward_logprobs(model, prompt, tokens)
    finally:
        for i, m in model.ttt_modules().items():
            m.state_decay = saved[i]
    return max(abs(a - b) for a, b in zip(logprobs, plain))


@needs_vllm
def test_state_decay_with_chunked_prefill_and_batched_decode_equals_full_forwards(exports):
    """`ttt.state_decay` (with clipped updates): the state decays at every chunk close, in prefill steps that cut
    prompts anywhere (7 tokens a step, chunk 8) and in decode steps of batched requests crossing chunk ends."""
    folder, model = exports["qwen3_decay"]
    requests = [(p, greedy()) for p in prompts()]
    results = run_llm(folder, requests, skip_tokenizer_init=True, max_num_batched_tokens=7, max_num_seqs=4,
                      enable_chunked_prefill=True)
    worst = check_exact(model, requests, results)
    print(f"state_decay: worst logprob difference {worst:.2e}")
    assert decay_matters(model, requests, results) > 1e-2
    assert ttt_matters(model, requests, results) > 1e-2


@needs_vllm
def test_preempted_and_recomputed_requests_equal_full_forwards(exports):
    """Too few cache blocks for three long requests: vLLM preempts some when they grow into a new block and
    recomputes them later in a slot whose state belongs to whoever used it last."""
    folder, model = exports["qwen3"]
    g = torch.Generator().manual_seed(5)
    requests = [(torch.randint(4, VOCAB, (n,), generator=g).tolist(), greedy()) for n in (250, 247, 252)]
    results = run_llm(folder, requests, skip_tokenizer_init=True, max_model_len=512, max_num_seqs=3,
                      max_num_batched_tokens=512, num_gpu_blocks_override=8, disable_log_stats=False)
    assert run_llm.preemptions > 0
    check_exact(model, requests, results)


@needs_vllm
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma3"])
def test_family_equals_full_forwards(exports, arch):
    """Every other family, batched and cut by chunked prefill; the sequences run past the sliding windows."""
    folder, model = exports[arch]
    requests = [(p, greedy()) for p in prompts()]
    results = run_llm(folder, requests, skip_tokenizer_init=True, max_num_batched_tokens=16,
                      enable_chunked_prefill=True)
    worst = check_exact(model, requests, results)
    print(f"{arch}: worst logprob difference {worst:.2e}")
    assert ttt_matters(model, requests, results) > 1e-2
    if arch != "llama":
        assert window_matters(model, requests, results) > 1e-2


@needs_vllm
@pytest.mark.parametrize("state_decay", [None, 0.7])
def test_batched_decode_step_equals_the_per_request_step_across_buffer_and_chunk_ends(state_decay):
    """The plugin's batched decode step (requests at different positions, the common case) equals its one-request
    path token for token, through buffer flushes (K = 21, chunk 64) and chunk closes (with the state decaying at
    each close, where set). The one-request path itself is checked against full forwards above."""
    from types import SimpleNamespace

    from vllm.config import VllmConfig, set_current_vllm_config

    from ttt_adapt.vllm_plugin import ttt_mlp

    d, H, C, n = 16, 24, 64, 200
    config = SimpleNamespace(hidden_size=d, intermediate_size=H, ttt=dict(
        chunk_size=C, conv_kernel_size=5, clip_update_norm=1.0, use_proj=True, lr_mode="token",
        state_decay=state_decay))
    torch.manual_seed(0)
    mlp = SimpleNamespace(gate_up_proj=None, down_proj=None, act_fn=None)
    with set_current_vllm_config(VllmConfig()):
        layer = ttt_mlp.TTTMLP(mlp, config, 0, prefix="model.layers.0.mlp")
    for p in layer.ttt.parameters():
        p.data.normal_(0, 0.3)
    assert ttt_mlp.pending_rows(C) == 21
    prompt = (3, 60, 21)  # each request's prompt length: sequence starts, a chunk's last token, a full buffer
    x, h = torch.randn(3, n, d), torch.randn(3, n, H)

    def fresh_state():
        layer.kv_cache = tuple(torch.zeros(4, *shape) for shape in layer.get_state_shape())

    fresh_state()  # alone: each request's prompt, then one token at a time, through the one-request path
    alone = [torch.cat([layer._advance(r, 0, x[r, :prompt[r]], h[r, :prompt[r]])]
                       + [layer._advance(r, t, x[r, t : t + 1], h[r, t : t + 1]) for t in range(prompt[r], n)])
             for r in range(3)]
    fresh_state()  # together: the prompts, then one batched step per token, as vLLM's forward hands them
    together = [[layer._advance(r + 1, 0, x[r, :prompt[r]], h[r, :prompt[r]])] for r in range(3)]
    steady_steps = 0
    for step in range(n - max(prompt)):
        pos = [prompt[r] + step for r in range(3)]
        metadata = SimpleNamespace(num_decode_tokens=3, num_prefill_tokens=0, num_prefills=0,
                                   state_indices_tensor_d=torch.tensor([[1], [2], [3]]))
        plan = ttt_mlp._BatchPlan(metadata, torch.tensor(pos), C, layer.pad, layer.pending)
        xs, hs = x[[0, 1, 2], pos], h[[0, 1, 2], pos]
        o = torch.zeros(3, d)
        if plan.steady:
            steady_steps += 1
            layer._decode_steady(plan, xs, hs, o)
        for (s, e), slot, start in plan.general:
            o[s:e] = layer._advance(slot, start, xs[s:e], hs[s:e])
        for r in range(3):
            together[r].append(o[r : r + 1])
    assert steady_steps > 100
    for r in range(3):
        ref, got = alone[r][: len(together[r]) - 1 + prompt[r]], torch.cat(together[r])
        assert ref.abs().max() > 0.1  # fast weights are read
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@needs_vllm
def test_prefix_caching_refused_in_one_line(exports):
    from vllm import LLM

    with pytest.raises(Exception, match="do not support prefix caching"):
        LLM(str(exports["qwen3"][0]), dtype="float32", max_model_len=128, enforce_eager=True,
            skip_tokenizer_init=True, enable_prefix_caching=True)


@needs_vllm
@pytest.mark.parametrize("arch, setting, message", [
    ("qwen2", {"layer_types": ["full_attention"] * 2 + ["sliding_attention"] * 2, "max_window_layers": 2},
     "vLLM's Qwen2 slides its attention window on every layer or none"),
    ("gemma3", {"attn_logit_softcapping": 50.0}, "vLLM's Gemma 3 does not apply attention logit softcapping"),
    ("gemma3", {"use_bidirectional_attention": True}, "serves causal Gemma 3 exports"),
], ids=["qwen2-some-layers-slide", "gemma3-attn-softcapping", "gemma3-bidirectional"])
def test_family_settings_vllm_serves_differently_are_refused_in_one_line(exports, tmp_path, arch, setting, message):
    """Settings transformers follows and vLLM's stock model would not: refused before any model is built."""
    import shutil

    from vllm import LLM

    folder = shutil.copytree(exports[arch][0], tmp_path / arch)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **setting}))
    with pytest.raises(Exception, match=message):
        LLM(str(folder), dtype="float32", max_model_len=128, enforce_eager=True, skip_tokenizer_init=True)


TRANSFORMERS_BACKEND = textwrap.dedent(
    """
    import sys
    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        llm = LLM(sys.argv[1], model_impl="transformers", trust_remote_code=True, skip_tokenizer_init=True,
                  dtype="float32", max_model_len=128, enforce_eager=True)
        out = llm.generate([TokensPrompt(prompt_token_ids=list(range(4, 17)))], SamplingParams(max_tokens=8))
        print("SERVED", out[0].outputs[0].token_ids)
    """
)


@needs_vllm
def test_transformers_backend_without_the_plugin_refuses_the_export(exports, tmp_path):
    """vLLM's generic transformers backend calls the model once per step with the new tokens and no cache; the
    export's own guard stops it with the one line instead of serving wrong tokens."""
    script = tmp_path / "serve_transformers_backend.py"
    script.write_text(TRANSFORMERS_BACKEND)
    env = {**os.environ, **ENV, "VLLM_PLUGINS": "no-such-plugin"}  # ttt-adapt's plugin not loaded
    run = subprocess.run([sys.executable, str(script), str(exports["qwen3"][0])], capture_output=True, text=True,
                         env=env, timeout=600)
    out = run.stdout + run.stderr
    assert "SERVED" not in out
    assert "continues a sequence (positions past 0) without its fast-weight state" in out, out[-3000:]
    assert "ttt-adapt vLLM plugin" in out


@contextmanager
def openai_server(folder, name, tmp_path):
    """vLLM's OpenAI server on `folder` (served as `name`), started and healthy; yields `post(path, body)`, which
    returns the JSON answer. The server's log is in `tmp_path/server.log`."""
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--port", str(port),
           "--dtype", "float32", "--max-model-len", "128", "--enforce-eager", "--served-model-name", name]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **ENV})

    def post(path, body):
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        return json.load(urllib.request.urlopen(req, timeout=120))

    try:
        deadline = time.time() + 600
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.time() < deadline, "the server did not start"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        yield post
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


@needs_vllm
def test_openai_server_answers_a_completion_exactly(exports, tmp_path):
    folder, model = exports["qwen3"]
    prompt = prompts()[3]
    with openai_server(folder, "ttt", tmp_path) as post:
        answer = post("/v1/completions", {"model": "ttt", "prompt": " ".join(f"w{t}" for t in prompt),
                                          "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    expected = greedy_by_full_forwards(model, prompt, 8)
    assert answer["choices"][0]["text"].split() == [f"w{t}" for t in expected]


@needs_vllm
def test_a_request_passing_a_saved_state_is_refused_in_one_line():
    from vllm import SamplingParams

    from ttt_adapt.vllm_plugin import register

    register()
    with pytest.raises(ValueError, match="cannot start a request from a saved fast-weight state") as e:
        SamplingParams(max_tokens=4, extra_args={"ttt_state": "state.safetensors"})
    assert "\n" not in str(e.value)
    SamplingParams(max_tokens=4, extra_args={"other": 1})  # other extra arguments pass
