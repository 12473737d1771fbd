"""torch.compile: a TTT decoder layer compiles without graph breaks in training, does not recompile when the documents
move, equals eager; a compiled forward decodes without reaching the recompile limit; `train.compile` in the loop."""

import copy

import pytest
import torch
import torch._dynamo
from conftest import DEVICE, tiny_base
from test_modeling import ttt_model
from torch._dynamo.testing import CompileCounterWithBackend

pytestmark = pytest.mark.usefixtures("one_thread")

TTT_KW = [{}, {"lr_mode": "token", "target": "input_embed", "clip_update_norm": 0.5}]


def _batch(step, L=16):
    """Two rows whose documents end at a different place every step (the chunk layout changes, the shapes do not)."""
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(3, 97, (2, L), generator=g).to(DEVICE)
    cut = 3 + step
    return ids, torch.cat([torch.arange(cut).to(DEVICE), torch.arange(L - cut).to(DEVICE)]).expand(2, -1)


def _layer_call(model, idx, ids, pos):
    """The arguments a training forward hands decoder layer `idx` (its TTT context prepared by the model)."""
    seen = {}

    def grab(module, args, kwargs):
        seen["args"], seen["kwargs"] = args, kwargs

    handle = model.model.layers[idx].register_forward_pre_hook(grab, with_kwargs=True)
    model(ids, position_ids=pos)
    handle.remove()
    return seen["args"], seen["kwargs"]


@pytest.mark.parametrize("ttt_kw", TTT_KW)
def test_ttt_decoder_layer_compiles_without_graph_breaks(ttt_kw):
    torch._dynamo.reset()
    model = ttt_model(chunk_size=4, **ttt_kw).train()
    args, kwargs = _layer_call(model, 0, *_batch(0))
    explained = torch._dynamo.explain(model.model.layers[0])(*args, **kwargs)
    assert explained.graph_break_count == 0, [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_count == 1


def _loss_and_grads(model, ids, pos):
    model.zero_grad()
    loss = model(ids, position_ids=pos, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("ttt_kw", TTT_KW)
def test_compiled_layers_equal_eager_and_do_not_recompile_between_steps(ttt_kw):
    """Every decoder layer compiled (AOT autograd: the custom ops' fake shapes and backward run as compiled);
    documents end elsewhere at every step, yet after the first step nothing compiles again."""
    torch._dynamo.reset()
    eager = ttt_model(chunk_size=4, **ttt_kw).train()
    compiled = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    for layer in compiled.model.layers:
        layer.compile(backend=counter)
    frames = []
    for step in range(4):
        ids, pos = _batch(step)
        ref_loss, ref_grads = _loss_and_grads(eager, ids, pos)
        loss, grads = _loss_and_grads(compiled, ids, pos)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
        assert grads.keys() == ref_grads.keys()
        for n in grads:
            torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-7, msg=n)
        frames.append(counter.frame_count)
    # a few graphs in step 0 (TTT layers and stock layers, each with their arguments), none after
    assert frames[0] <= 3 and frames == frames[:1] * 4, frames


def test_inductor_compiled_ttt_layer_equals_eager():
    torch._dynamo.reset()
    model = ttt_model(chunk_size=4, clip_update_norm=0.5).train()
    ids, pos = _batch(1)
    ref_loss, ref_grads = _loss_and_grads(model, ids, pos)
    model.model.layers[0].compile()  # the default backend, inductor
    loss, grads = _loss_and_grads(model, ids, pos)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for n in grads:  # inductor fuses and reorders fp32 sums
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_compiled_forward_decodes_64_tokens_without_reaching_the_recompile_limit():
    """`model.forward = torch.compile(model.forward)` then generate(): prefill, 64 steps crossing 8 chunk boundaries
    (each a flush); the same tokens as eager, and no function recompiled up to the limit (it raises here)."""
    torch._dynamo.reset()
    model = ttt_model(chunk_size=8, layers=(0, 1, 3))
    ids = torch.randint(3, 97, (2, 5)).to(DEVICE)
    kw = dict(max_new_tokens=64, do_sample=False, pad_token_id=0, eos_token_id=None)
    ref = model.generate(ids, **kw)
    model.forward = torch.compile(model.forward, backend="eager")
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        out = model.generate(ids, **kw)
    assert torch.equal(out, ref)


def test_train_compile_key_compiles_each_decoder_layer(monkeypatch, tmp_path):
    """`train.compile: true` compiles every decoder layer and trains the eager run's model (AOT autograd backend here:
    inductor's compile of the whole loop takes minutes on 2 cores; it is checked on a layer above)."""
    from conftest import load, make_tiny_files, metrics

    from ttt_adapt import model_setup
    from ttt_adapt.pipeline import adapt
    from ttt_adapt.training import loop

    files = make_tiny_files(tmp_path / "tiny")
    counter = CompileCounterWithBackend("aot_eager")
    compiled_layers = []

    def compile_decoder_layers(model):
        for layer in model_setup.decoder_layers(model):
            layer.compile(backend=counter)
            compiled_layers.append(layer)

    monkeypatch.setattr(loop, "compile_decoder_layers", compile_decoder_layers)
    torch._dynamo.reset()
    runs = []
    for name, on in (("eager", False), ("compiled", True)):
        (tmp_path / name).mkdir()
        recipe = load(files, tmp_path / name, train={"compile": on, "max_steps": 3})
        adapt(recipe)
        runs.append(metrics(recipe))
    assert len(compiled_layers) == 4 and counter.frame_count > 0
    assert [m["step"] for m in runs[0]] == [m["step"] for m in runs[1]]
    for a, b in zip(*runs):
        for key in ("loss", "grad_norm", "eval_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a, b)


def test_train_compile_must_be_a_bool(tmp_path):
    from conftest import load, make_tiny_files

    from ttt_adapt.recipe import RecipeError

    files = make_tiny_files(tmp_path)
    with pytest.raises(RecipeError, match=r"^train\.compile"):
        load(files, tmp_path, overrides=["train.compile=yes please"])


def test_converted_model_compiles_with_base_unchanged():
    """Compiling does not change what a converted model computes at step 0: still the base's logits."""
    torch._dynamo.reset()
    base = tiny_base(device=DEVICE)
    from ttt_adapt import TTTConfig, convert

    ids = torch.randint(3, 97, (2, 13)).to(DEVICE)
    with torch.no_grad():
        ref = base(ids).logits
        model = convert(base, TTTConfig(layers=[0, 2], chunk_size=4))
        for layer in model.model.layers:
            layer.compile(backend="aot_eager")
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-6, atol=1e-6)


def test_static_cache_is_refused_with_one_line():
    """`cache_implementation="static"` (what compiled static-shape decoding uses) cannot hold the fast weights."""
    model = ttt_model(chunk_size=4)
    with pytest.raises(ValueError, match=r"^In-Place TTT models need a DynamicCache, got StaticCache$"):
        model.generate(torch.randint(3, 97, (1, 5)).to(DEVICE), max_new_tokens=3, cache_implementation="static",
                       pad_token_id=0)
