"""The state-norm guard of the shipped code: it warns once per layer when a fast-weight state passes twice the norm
training produced (recorded at export), clamps at inference when asked, and changes nothing when off or unset."""

import warnings

import pytest
import torch
from conftest import CACHE_KW, randomize_ttt, tiny_base
from transformers import DynamicCache

from ttt_adapt import TTTConfig, convert
from ttt_adapt.modeling.ttt_layer import StateNormGuard

pytestmark = pytest.mark.usefixtures("one_thread")


def model_with(limit=None, guard="warn", decay=None):
    cfg = TTTConfig(layers=[0, 2], chunk_size=4, state_decay=decay, state_norm_limit=limit, state_norm_guard=guard)
    return randomize_ttt(convert(tiny_base(seed=0), cfg), scale=0.5).eval()


def final_norms(model, ids):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, use_cache=True, **{CACHE_KW: cache})
    return [float(torch.linalg.matrix_norm(cache.layers[i].ttt_state.S).max()) for i in (0, 2)]


@pytest.fixture(autouse=True)
def fresh_warnings():
    StateNormGuard.warned.clear()
    yield
    StateNormGuard.warned.clear()


def test_warns_once_per_layer_past_twice_the_limit_and_changes_nothing():
    ids = torch.randint(3, 97, (2, 40))
    plain = model_with()
    with torch.no_grad():
        ref = plain(ids).logits
    norms = final_norms(plain, ids)
    limits = [n / 3 for n in norms]  # what "training produced": a third of what these 40 tokens write
    guarded = model_with(limits)
    with pytest.warns(RuntimeWarning, match=r"layer \d: the fast-weight state's norm reached .* the largest training "
                                            r"produced") as record:
        with torch.no_grad():
            out = guarded(ids).logits
            guarded(ids)  # once per layer: the second forward says nothing new
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 2
    assert torch.equal(out, ref)  # warn only: the outputs are the unguarded ones
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        StateNormGuard.warned.clear()
        model_with([n * 3 for n in norms])(ids)  # never past twice the limit: silent
        model_with(limits, guard="off")(ids)


def test_clamp_bounds_every_state_and_cached_decoding_still_equals_full_forward():
    ids = torch.randint(3, 97, (2, 23))
    norms = final_norms(model_with(), ids)
    limits = [n / 4 for n in norms]
    model = model_with(limits, guard="clamp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert all(n <= lim * (1 + 1e-5) for n, lim in zip(final_norms(model, ids), limits))
        with torch.no_grad():
            full = model(ids).logits
            cache = DynamicCache(config=model.config)
            steps = [model(ids[:, :6], use_cache=True, **{CACHE_KW: cache}).logits]
            for j in range(6, 23):
                steps.append(model(ids[:, j : j + 1], use_cache=True, **{CACHE_KW: cache}).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(full, model_with()(ids).logits)  # the clamp did change the read-out


def test_training_forward_is_never_clamped():
    ids = torch.randint(3, 97, (1, 24))
    norms = final_norms(model_with(), ids)
    model = model_with([n / 4 for n in norms], guard="clamp").train()
    plain = model_with().train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        torch.testing.assert_close(model(ids, labels=ids).loss, plain(ids, labels=ids).loss, rtol=0, atol=0)


@pytest.mark.parametrize("cfg,match", [
    (dict(state_norm_guard="shout"), "state_norm_guard"),
    (dict(state_norm_limit=[1.0]), "2 TTT layers"),
    (dict(state_norm_limit=[1.0, -1.0]), "state_norm_limit"),
])
def test_bad_guard_settings_one_line(cfg, match):
    with pytest.raises(ValueError, match=match):
        convert(tiny_base(), TTTConfig(layers=[0, 2], **cfg))
