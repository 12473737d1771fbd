"""Fast-weight memory (`TTTState`): reading text into a state, keeping it in a file and starting from it later.

Invariants: one pass == pieces == generate(); state + the prefix's KV cache == the full forward; state alone == a
float64 token-by-chunk reference whose fast weights start at that state; a saved state used in a fresh process
without ttt_adapt gives the same tokens; bad inputs fail in one line and write nothing. With and without state_decay.
"""

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import BLOCK_TTT_ADAPT, CACHE_KW, randomize_ttt, tiny_base

from ttt_adapt import TTTConfig, convert
from ttt_adapt.modeling.ttt_state import TTTState

DECAYS = [None, 0.7]
WRITES = [*DECAYS, "delta"]  # "delta": the delta rule with normalised keys (and a decay)
CHUNK = 4


def ttt_model(decay, seed=1, **kw):
    if decay == "delta":
        decay, kw = 0.8, {"write_rule": "delta", "key_norm": True, **kw}
    config = TTTConfig(layers=[0, 2], chunk_size=CHUNK, state_decay=decay, **kw)
    return randomize_ttt(convert(tiny_base(), config), seed=seed).eval()


def assert_same_state(a: TTTState, b: TTTState, rtol=1e-5):
    assert sorted(a.layers) == sorted(b.layers)
    for i in a.layers:
        assert sorted(a.layers[i]) == sorted(b.layers[i])
        for k, t in a.layers[i].items():
            u = b.layers[i][k]
            assert t.shape == u.shape and t.dtype == u.dtype, (i, k)
            if k == "n":
                assert torch.equal(t, u)
            else:
                scale = float(t.abs().max()) or 1.0
                assert float((t - u).abs().max()) <= rtol * scale, (i, k, float((t - u).abs().max()), scale)


def greedy(model, ids, **kw):
    return model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None, **kw)


@pytest.mark.parametrize("decay", WRITES)
def test_one_pass_pieces_and_generate_read_the_same_state(decay, one_thread):
    model = ttt_model(decay)
    doc = torch.randint(3, 97, (23,), generator=torch.Generator().manual_seed(0))
    whole = model.read_state(doc)
    assert whole.layers[0]["n"].tolist() == [23 % CHUNK] and whole.tokens == [23]
    assert float(whole.layers[0]["S"].abs().max()) > 0 and whole.layers[0]["S"].dtype == torch.float32
    for piece in (1, 5, 8):
        assert_same_state(model.read_state(doc, piece_tokens=piece), whole)
    out = model.generate(doc[None], max_new_tokens=1, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert_same_state(model.state_from_cache(getattr(out, CACHE_KW)), whole)

    # a left-padded batch of two documents: each row's state == that document read alone
    other = torch.randint(3, 97, (14,), generator=torch.Generator().manual_seed(1))
    ids = torch.zeros(2, 23, dtype=torch.long)
    mask = torch.zeros(2, 23, dtype=torch.long)
    ids[0], mask[0] = doc, 1
    ids[1, 9:], mask[1, 9:] = other, 1
    batch = model.read_state(ids, attention_mask=mask, piece_tokens=6)
    assert batch.tokens == [23, 14]
    assert_same_state(batch.rows([0]), whole)
    assert_same_state(batch.rows([1]), model.read_state(other))

    # a stream of documents: the fast weights go on, each document's attention starts afresh
    stream = model.read_state([doc, other])
    assert_same_state(stream, model.read_state(other, state=whole))
    assert stream.tokens == [37]
    # "piece" attention drops the keys and values after each piece: == reading the pieces as separate documents
    assert_same_state(model.read_state(doc, piece_tokens=8, attention="piece"),
                      model.read_state([doc[:8], doc[8:16], doc[16:]]))


@pytest.mark.parametrize("decay", WRITES)
@pytest.mark.parametrize("target", ["hidden_states", "input_embed"])
def test_loaded_state_with_the_prefix_cache_equals_the_full_forward(decay, target, tmp_path, one_thread):
    model = ttt_model(decay, target=target, lr_mode="token" if target == "input_embed" else "scalar")
    g = torch.Generator().manual_seed(2)
    prefix, rest = torch.randint(3, 97, (2, 10), generator=g), torch.randint(3, 97, (2, 9), generator=g)
    with torch.no_grad():
        full = model(torch.cat([prefix, rest], 1), use_cache=False).logits
        cache = getattr(model(prefix, use_cache=True), CACHE_KW)
        model.state_from_cache(cache).save(tmp_path / "s.safetensors")
        loaded = model.load_state(tmp_path / "s.safetensors")
        assert ("buf_t" in loaded.layers[0]) == (target == "input_embed")
        assert_same_state(loaded, model.read_state(prefix, piece_tokens=3))
        for i in model.config.ttt["layers"]:  # forget the cache's own fast weights: only the file's remain
            cache.layers[i].ttt_state.reset()
        model.state_cache(loaded, 2, cache)
        cont = model(rest, use_cache=True, **{CACHE_KW: cache}).logits
    torch.testing.assert_close(cont, full[:, 10:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma3"])
def test_every_family_reads_in_pieces_and_continues_from_a_state(arch, one_thread):
    """Sliding-window cache layers (qwen2, mistral, gemma3), scaled embeddings and softcapping (gemma3): pieces ==
    one pass, and a state put back into the prefix's cache continues as the full forward does."""
    from conftest import FAMILY_ARCHS, tiny_base as base

    assert arch in FAMILY_ARCHS
    model = randomize_ttt(convert(base(arch), TTTConfig(layers=[0, 2], chunk_size=CHUNK, state_decay=0.8))).eval()
    doc = torch.randint(3, 97, (2, 19), generator=torch.Generator().manual_seed(7))
    assert_same_state(model.read_state(doc, piece_tokens=5), model.read_state(doc))
    with torch.no_grad():
        full = model(doc, use_cache=False).logits
        cache = getattr(model(doc[:, :11], use_cache=True), CACHE_KW)
        state = model.state_from_cache(cache)
        for i in model.config.ttt["layers"]:
            cache.layers[i].ttt_state.reset()
        model.state_cache(state, 2, cache)
        cont = model(doc[:, 11:], use_cache=True, **{CACHE_KW: cache}).logits
    torch.testing.assert_close(cont, full[:, 11:], rtol=1e-5, atol=1e-5)


def _conv(z, w):
    """Depthwise centred conv of one chunk's rows z (n, d) with taps w (d, k), zero-padded at the chunk's edges."""
    p = w.shape[1] // 2
    out = torch.zeros_like(z)
    for i in range(z.shape[0]):
        for m in range(w.shape[1]):
            j = i + m - p
            if 0 <= j < z.shape[0]:
                out[i] += w[:, m] * z[j]
    return out


def reference_mlp(mlp, layer, decay):
    """A TTT MLP forward in float64 written from the math: the stream is the state's pending tokens then the new
    ones, cut into chunks from the pending part's start; chunk c reads W + S_c with S_0 the state's S and
    S_{c+1} = decay * S_c + lr * (conv(z_c) W_t^T)^T h_c."""
    g = 1.0 if decay is None else decay

    def forward(x):
        W, w = mlp.down_proj.weight, mlp.ttt.conv.weight[:, 0, :]
        out = []
        for b in range(x.shape[0]):
            n = int(layer["n"][b if layer["n"].shape[0] > 1 else 0])
            row = b if layer["S"].shape[0] > 1 else 0
            z = torch.cat([layer["buf_x"][row, :n].double(), x[b]])
            h = mlp.inner(z)
            S = layer["S"][row].double().clone()
            ys = []
            for c in range(0, z.shape[0], CHUNK):
                zc, hc = z[c : c + CHUNK], h[c : c + CHUNK]
                ys.append(hc @ (W + S).T)
                a = mlp.ttt.lr * mlp.ttt.target_proj(_conv(zc, w))
                S = g * S + a.T @ hc
            out.append(torch.cat(ys)[n:])
        return torch.stack(out)

    return forward


@pytest.mark.parametrize("decay", DECAYS)
def test_state_alone_equals_a_float64_reference_starting_at_that_state(decay, one_thread):
    import copy

    model = ttt_model(decay)
    g = torch.Generator().manual_seed(3)
    docs = torch.randint(3, 97, (2, 13), generator=g)  # 13 tokens: one pending token per row
    rest = torch.randint(3, 97, (2, 11), generator=g)
    per_row, shared = model.read_state(docs), model.read_state(docs[:1])
    ref = copy.deepcopy(model).double()
    for state in (per_row, shared):
        with torch.no_grad():
            got = model(rest, ttt_state=state).logits
            for m in ref.ttt_modules().values():
                m.forward = reference_mlp(m, state.layers[m.layer_idx], decay)
            want = ref(rest, use_cache=False).logits
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the state changes the logits (the test above is not about nothing)
        assert not torch.allclose(model(rest, ttt_state=per_row).logits, model(rest).logits, atol=1e-3)


@pytest.mark.parametrize("decay", WRITES)
def test_generate_from_a_state_left_padded_batched_and_under_bf16_autocast(decay, one_thread):
    model = ttt_model(decay)
    g = torch.Generator().manual_seed(4)
    states = model.read_state(torch.randint(3, 97, (2, 15), generator=g))
    prompts = [torch.randint(3, 97, (7,), generator=g), torch.randint(3, 97, (3,), generator=g)]
    ids, mask = torch.zeros(2, 7, dtype=torch.long), torch.zeros(2, 7, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 7 - len(p):], mask[i, 7 - len(p):] = p, 1
    batch = greedy(model, ids, attention_mask=mask, ttt_state=states)
    for i, p in enumerate(prompts):
        alone = greedy(model, p[None], ttt_state=states.rows([i]))
        assert torch.equal(batch[i, 7:], alone[0, len(p):]), i
        # greedy decoding from the state == greedy by full forwards that start from the state each time
        seq = p[None]
        with torch.no_grad():
            for _ in range(6):
                seq = torch.cat([seq, model(seq, ttt_state=states.rows([i])).logits[:, -1:].argmax(-1)], 1)
        assert torch.equal(alone, seq), i
    shared = greedy(model, ids, attention_mask=mask, ttt_state=states.rows([0]))
    assert torch.equal(shared[0], batch[0])
    # beams and several sequences per row: each copy of a row starts from that row's state
    beams = greedy(model, ids, attention_mask=mask, ttt_state=states, num_beams=2, num_return_sequences=2)
    assert beams.shape[0] == 4
    for i in range(2):
        alone = greedy(model, ids[i : i + 1], attention_mask=mask[i : i + 1], ttt_state=states.rows([i]), num_beams=2,
                       num_return_sequences=2)
        assert torch.equal(beams[2 * i : 2 * i + 2], alone), i

    with torch.no_grad():
        fp32 = model(ids, attention_mask=mask, ttt_state=states).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, attention_mask=mask, ttt_state=states, use_cache=True)
    assert getattr(out, CACHE_KW).layers[0].ttt_state.S.dtype == torch.float32
    real = mask.bool()
    err = (out.logits.float() - fp32)[real].abs().max() / fp32[real].abs().max()
    assert float(err) < 0.05, float(err)


RELOAD = BLOCK_TTT_ADAPT + textwrap.dedent(
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    folder, state_file, expected_file, reread_file = sys.argv[1:5]
    expected = load_file(expected_file)
    lm = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    state = lm.load_state(state_file)
    out = lm.generate(expected["prompt"], ttt_state=state, max_new_tokens=6, do_sample=False, pad_token_id=0,
                      eos_token_id=None)
    assert torch.equal(out, expected["generated"]), (out, expected["generated"])
    lm.read_state(expected["doc"]).save(reread_file)
    print("state ok", type(state).__module__)
    """
)


@pytest.mark.parametrize("decay", WRITES)
def test_a_saved_state_works_in_a_fresh_process_without_ttt_adapt(decay, tmp_path, one_thread):
    from safetensors.torch import save_file

    model = ttt_model(decay)
    model.save_pretrained(tmp_path / "export")
    assert (tmp_path / "export" / "ttt_state.py").is_file()
    g = torch.Generator().manual_seed(5)
    doc, prompt = torch.randint(3, 97, (17,), generator=g), torch.randint(3, 97, (1, 5), generator=g)
    state = model.read_state(doc)
    state.save(tmp_path / "state.safetensors")
    generated = greedy(model, prompt, ttt_state=state)
    assert not torch.equal(generated, greedy(model, prompt))  # the state matters for these tokens
    save_file({"prompt": prompt, "generated": generated, "doc": doc}, str(tmp_path / "expected.safetensors"))
    script = tmp_path / "reload.py"
    script.write_text(RELOAD)
    args = [str(tmp_path / p) for p in ("export", "state.safetensors", "expected.safetensors", "reread.safetensors")]
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=tmp_path,
                          timeout=600)
    assert proc.returncode == 0 and "state ok" in proc.stdout, proc.stderr[-3000:]
    assert "ttt_adapt" not in proc.stdout
    assert_same_state(TTTState.load(tmp_path / "reread.safetensors", model), state)


@pytest.mark.parametrize("decay", DECAYS)
def test_bad_states_and_inputs_fail_in_one_line_and_write_nothing(decay, tmp_path, monkeypatch, one_thread):
    model = ttt_model(decay)
    path = tmp_path / "s.safetensors"
    state = model.read_state(torch.arange(3, 14))
    state.save(path)

    def one_line_error(fn, *words):
        with pytest.raises(ValueError) as e:
            fn()
        msg = str(e.value)
        assert "\n" not in msg and all(w in msg for w in words), msg

    one_line_error(lambda: ttt_model(decay, seed=2).load_state(path), "another model")
    one_line_error(lambda: convert(tiny_base(), TTTConfig(layers=[0, 2], chunk_size=8, state_decay=decay)).load_state(
        path), "another TTT layout", "chunk_size")
    one_line_error(lambda: convert(tiny_base(), TTTConfig(layers=[0, 1], chunk_size=CHUNK, state_decay=decay))
                   .load_state(path), "another TTT layout", "layers")
    other_decay = 0.5 if decay is None else None
    one_line_error(lambda: ttt_model(other_decay).load_state(path), "another TTT layout", "state_decay")
    one_line_error(lambda: ttt_model(decay).to(torch.bfloat16).load_state(path), "float32", "bfloat16")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    one_line_error(lambda: model.load_state(truncated), "not a complete TTT state file")
    one_line_error(lambda: model.load_state(tmp_path / "missing.safetensors"), "no such TTT state file")
    one_line_error(lambda: model.read_state([]), "nothing to read")
    one_line_error(lambda: model.read_state([[], []]), "nothing to read")
    one_line_error(lambda: model(torch.arange(3, 9).view(3, 2), ttt_state=model.read_state(torch.arange(3, 9).view(2, 3))),
                   "2 rows", "3")

    # a save that fails midway leaves the earlier file as it was and no temp file
    before = path.read_bytes()
    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError):
        model.read_state(torch.arange(20, 40)).save(path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["cut.safetensors",
                                                                                          "s.safetensors"]


# ----------------------------------------------------------------------------------------------- the scripts


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """The shipped tiny base converted (chunk 16, state decay) with random TTT weights, saved with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import REPO

    base_dir = REPO / "ttt_adapt" / "assets" / "tiny_qwen3_base"
    model = convert(AutoModelForCausalLM.from_pretrained(base_dir), TTTConfig(layers=[1, 3], chunk_size=16,
                                                                              state_decay=0.9))
    folder = tmp_path_factory.mktemp("memory") / "export"
    randomize_ttt(model, scale=0.05).eval().save_pretrained(folder)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(folder)
    return folder


def write_corpus(path, texts):
    import json

    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


TEXTS = [f"Document {i}: the key of box {i} is {i * 7919 % 1000}. " * (3 + i % 4) for i in range(7)]


def test_memorize_reads_a_corpus_resumes_and_evaluates_from_the_state(tiny_export, tmp_path, monkeypatch, capsys,
                                                                      one_thread):
    import json

    import ttt_adapt.memorize as memorize_module
    from conftest import script_main

    memorize, evaluate = script_main("memorize"), script_main("evaluate")
    corpus = write_corpus(tmp_path / "corpus.jsonl", TEXTS)
    out = tmp_path / "state.safetensors"
    assert memorize([str(tiny_export), "--corpus", str(corpus), "--out", str(out), "--piece-tokens", "24"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["documents"] == 7 and summary["tokens"] > 0 and summary["tokens_per_s"] > 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_export).eval()
    tok = AutoTokenizer.from_pretrained(tiny_export)
    state = model.load_state(out)
    expected = model.read_state([tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS])
    assert_same_state(state, expected)
    assert state.tokens == [summary["tokens"]]

    # interrupted after 4 documents (progress every 2), then resumed: the same state; a folder corpus reads alike
    real = memorize_module.iter_documents

    def interrupted(files, text_field="text"):
        for k, text in enumerate(real(files, text_field)):
            if k == 5:
                raise KeyboardInterrupt
            yield text

    monkeypatch.setattr(memorize_module, "iter_documents", interrupted)
    resumed = tmp_path / "resumed.safetensors"
    args = [str(tiny_export), "--corpus", str(corpus), "--out", str(resumed), "--save-every", "2"]
    with pytest.raises(KeyboardInterrupt):
        memorize(args)
    progress = json.loads((tmp_path / "resumed.safetensors.progress.json").read_text())
    assert progress["documents_done"] == 5 and not resumed.exists()
    monkeypatch.setattr(memorize_module, "iter_documents", real)
    assert memorize(args) == 2 and "--resume" in capsys.readouterr().err  # an unfinished run is not overwritten
    assert memorize(args + ["--resume"]) == 0
    assert_same_state(model.load_state(resumed), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "resumed.safetensors", "state.safetensors"]

    # evaluate.py --state: the documents read from the state against from nothing
    capsys.readouterr()
    assert evaluate(["--state", str(out), "--adapted", str(tiny_export), "--corpus", str(corpus), "--seq-len",
                     "64"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["documents"] == 7 and report["loss_from_state"] != report["loss_from_nothing"]
    assert report["state_minus_nothing"]["low"] <= report["state_minus_nothing"]["mean"]


def test_memorize_and_evaluate_refuse_bad_input_in_one_line(tiny_export, tmp_path, capsys, one_thread):
    from conftest import script_main

    memorize, evaluate = script_main("memorize"), script_main("evaluate")
    empty = write_corpus(tmp_path / "empty.jsonl", ["", "   "])
    out = tmp_path / "state.safetensors"
    cases = [
        ([str(tiny_export), "--corpus", str(empty), "--out", str(out)], "no document"),
        ([str(tiny_export), "--corpus", str(tmp_path / "none.jsonl"), "--out", str(out)], "no such corpus"),
        ([str(tmp_path / "nope"), "--corpus", str(empty), "--out", str(out)], "no such model folder"),
        ([str(tiny_export), "--corpus", str(empty), "--out", str(out), "--piece-tokens", "0"], "--piece-tokens"),
        ([str(tiny_export), "--out", str(out)], "--corpus"),
    ]
    for argv, words in cases:
        assert memorize(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        lines = [line.rsplit("\r", 1)[-1] for line in err.split("\n")]  # the progress bar's last state, the error
        assert [line for line in lines if not line.startswith("memorize:")] == [lines[-1]], err
        assert lines[-1].startswith("memorize.py: error:") and words in lines[-1], (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]  # nothing written, not even half

    corpus = write_corpus(tmp_path / "c.jsonl", TEXTS[:2])
    truncated = tmp_path / "cut.safetensors"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny_export).read_state([[5, 6, 7, 8]]).save(out)
    truncated.write_bytes(out.read_bytes()[:100])
    for state, words in ((truncated, "not a complete TTT state file"), (tmp_path / "x.safetensors", "no such")):
        assert evaluate(["--state", str(state), "--adapted", str(tiny_export), "--corpus", str(corpus)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err


def test_the_memory_measure_compares_own_other_and_no_state(tiny_export, one_thread):
    """(d) reads another document's state: with two identical documents it is (b) exactly; reading nothing more
    after the first part (filler 0) is (b) again; (a) is the full forward's loss on the same tokens."""
    from transformers import AutoModelForCausalLM

    from ttt_adapt.eval.memory import continuation_losses, memory_after_reading, memory_value

    model = AutoModelForCausalLM.from_pretrained(tiny_export).eval()
    g = torch.Generator().manual_seed(6)
    doc = torch.randint(3, 1000, (80,), generator=g)
    value = memory_value(model, [doc, doc.clone()], 40, 40)
    assert value["documents"] == 2 and value["loss"]["other_state"] == pytest.approx(value["loss"]["own_state"])
    with torch.no_grad():
        logits = model(doc[None]).logits[0, 40:-1]
    full = torch.nn.functional.cross_entropy(logits, doc[41:])
    assert value["loss"]["full"] == pytest.approx(float(full), rel=1e-5)
    assert value["loss"]["nothing"] == pytest.approx(float(continuation_losses(model, doc[40:]).mean()), rel=1e-6)
    assert value["loss"]["own_state"] != pytest.approx(value["loss"]["nothing"], rel=1e-4)
    diff = value["own_state_minus_nothing"]
    assert diff["low"] <= diff["mean"] <= diff["high"]
    more = memory_after_reading(model, [doc, torch.randint(3, 1000, (90,), generator=g)], 40, 40, [0, 30])
    assert more["documents"] == 2 and set(more["after"]) == {"0", "30"}
    assert more["after"]["0"]["loss"] != pytest.approx(more["after"]["30"]["loss"], rel=1e-6)


def test_evaluate_reports_the_memory_horizon(tiny_export, tmp_path, capsys, one_thread):
    """--memory-split with --memory-filler: F = 0 is always measured, and the horizon (the longest filler up to which
    the state beats no state) is in the JSON and printed in one line."""
    import json

    from conftest import script_main

    from ttt_adapt.eval.memory import horizon_line, memory_horizon

    corpus = write_corpus(tmp_path / "corpus.jsonl", TEXTS)
    assert script_main("evaluate")(["--memory-split", "16,16", "--memory-filler", "24", "--adapted", str(tiny_export),
                                    "--corpus", str(corpus)]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    more = result["reading_more"]
    assert set(more["after"]) == {"0", "24"}
    assert {k: more[k] for k in ("horizon", "lost_at")} == memory_horizon(more["after"])
    assert result["horizon"] == more["horizon"]
    assert captured.err.strip().splitlines()[-1] == f"evaluate.py: memory horizon: {horizon_line(more)}"
