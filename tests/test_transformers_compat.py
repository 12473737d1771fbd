"""Correct under every transformers release in the declared range: the cache under either argument name, no
deprecation warnings from our own calls, and a loud failure (never wrong logits) when a cache is misrouted."""

import importlib.util
import re
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from conftest import CACHE_KW, FAMILY_ARCHS, OLD_CACHE_KW, randomize_ttt, tiny_base
from transformers import DynamicCache

from ttt_adapt import TTTConfig, convert
from ttt_adapt.modeling import configuration_ttt
from ttt_adapt.modeling.configuration_ttt import TESTED_TRANSFORMERS, check_transformers

REPO = Path(__file__).resolve().parents[1]


def ttt_model(arch="qwen3"):
    return randomize_ttt(convert(tiny_base(arch), TTTConfig(layers=[0, 2], chunk_size=4))).eval()


def cached_logits(model, ids, name, splits=(6, 7, 11, 12)):
    cache = DynamicCache(config=model.config)
    parts, a = [], 0
    for b in (*splits, ids.shape[1]):
        pos = torch.arange(a, b).unsqueeze(0).expand(ids.shape[0], -1)
        parts.append(model(ids[:, a:b], position_ids=pos, use_cache=True, **{name: cache}).logits)
        a = b
    return torch.cat(parts, 1)


@pytest.mark.parametrize("arch", list(FAMILY_ARCHS))
@pytest.mark.parametrize("name", [CACHE_KW, OLD_CACHE_KW])
def test_cache_under_either_name_equals_full_forward(arch, name):
    model = ttt_model(arch)
    ids = torch.randint(3, 97, (2, 17))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old name is deprecated by transformers itself
        full = model(ids).logits
        inc = cached_logits(model, ids, name)
    torch.testing.assert_close(inc, full, rtol=1e-4, atol=1e-5)


def test_two_different_caches_refused():
    model = ttt_model()
    ids = torch.randint(3, 97, (1, 5))
    with pytest.raises(ValueError, match="not two different ones"):
        model.model(ids, cache=DynamicCache(config=model.config), past_key_values=DynamicCache(config=model.config))


def test_no_deprecation_warnings_from_our_calls():
    model = ttt_model()
    ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model(ids)
        cached_logits(model, ids, CACHE_KW, splits=(5,))
        model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
        model.generate(ids, max_new_tokens=6, num_beams=2, do_sample=False, pad_token_id=0, eos_token_id=None)


def _drop_attention_cache(model, monkeypatch):
    """Simulate a transformers release that no longer hands our cache to attention."""
    for layer in model.model.layers:
        attn = layer.self_attn
        forward = attn.forward

        def without_cache(*args, _forward=forward, **kwargs):
            kwargs.pop("cache", None)
            kwargs.pop("past_key_values", None)
            return _forward(*args, **kwargs)

        monkeypatch.setattr(attn, "forward", without_cache)


def test_bypassed_cache_raises_one_line(monkeypatch):
    model = ttt_model()
    ids = torch.randint(3, 97, (1, 9))
    _drop_attention_cache(model, monkeypatch)
    with torch.no_grad(), pytest.raises(RuntimeError) as err:
        model(ids, use_cache=True, **{CACHE_KW: DynamicCache(config=model.config)})
    message = str(err.value)
    assert "\n" not in message and "cache check failed" in message
    assert transformers.__version__ in message and "--refresh-code" in message
    with pytest.raises(RuntimeError, match="cache check failed"):  # generate() never returns tokens
        model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)


def test_cache_out_of_step_refused_before_the_forward():
    model = ttt_model()
    ids = torch.randint(3, 97, (1, 9))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, use_cache=True, **{CACHE_KW: cache})
        layer = cache.layers[2]
        layer.keys, layer.values = layer.keys[..., :-1, :], layer.values[..., :-1, :]  # K/V of one token lost
        with pytest.raises(RuntimeError, match=r"before the forward \(layer 2\): attention holds 8 tokens .* read 9"):
            model(ids[:, :1], use_cache=True, **{CACHE_KW: cache})


def test_step_with_a_fresh_cache_but_the_whole_mask_refused():
    """A decoding loop that loses the cache between steps (here: a new one per step) would read a one-token
    history; the mask says how long the history is."""
    model = ttt_model()
    ids = torch.randint(3, 97, (1, 9))
    with torch.no_grad():
        model(ids, use_cache=True, **{CACHE_KW: DynamicCache(config=model.config)})
        with pytest.raises(RuntimeError, match="the attention mask covers 10 tokens but the cache holds 1"):
            model(ids[:, -1:], attention_mask=torch.ones(1, 10, dtype=torch.long), use_cache=True,
                  **{CACHE_KW: DynamicCache(config=model.config)})


def test_cache_check_passes_through_beam_reordering_and_batch_expansion():
    model = ttt_model()
    ids = torch.randint(3, 97, (2, 6))
    out = model.generate(ids, max_new_tokens=9, num_beams=3, num_return_sequences=2, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    assert out.shape == (4, 15)


@pytest.mark.parametrize("version", ["4.57.3", "4.99.0", "3.0.0"])
def test_transformers_older_than_tested_is_refused(version):
    with pytest.raises(ImportError) as err:
        check_transformers(version)
    assert "\n" not in str(err.value) and version in str(err.value) and TESTED_TRANSFORMERS[0] in str(err.value)


@pytest.mark.parametrize("version", ["5.0.0", "5.24.0", "5.25.0.dev0", "6.1.0"])
def test_tested_and_newer_transformers_accepted(version):
    check_transformers(version)


def test_shipped_configuration_refuses_old_transformers_at_import(monkeypatch):
    """The file an export ships is what transformers imports first: it must refuse an old release by itself."""
    monkeypatch.setattr(transformers, "__version__", "4.56.2")
    spec = importlib.util.spec_from_file_location("shipped_configuration_ttt", configuration_ttt.__file__)
    with pytest.raises(ImportError, match=r"needs transformers>=5\.0\.0 .* found 4\.56\.2"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_declared_floor_is_the_oldest_tested_release():
    pyproject = (REPO / "pyproject.toml").read_text()
    floor = re.search(r'"transformers>=([\d.]+)', pyproject).group(1)
    assert floor == TESTED_TRANSFORMERS[0]
    ci = (REPO / ".ci" / "run").read_text()
    assert f"transformers=={TESTED_TRANSFORMERS[0]}" in ci  # CI really tests the floor


def test_every_family_config_checks_its_ttt_settings_on_construction():
    """transformers 5.0 configs are not dataclasses and never call `__post_init__`: the TTT checks and the
    auto_map must still happen there (each family's config, built directly as a user or from_pretrained would)."""
    from ttt_adapt.modeling import FAMILIES

    for lm_cls in FAMILIES.values():
        model_cls, config_cls = lm_cls.ttt_model, lm_cls.config_class
        config = config_cls(num_hidden_layers=8, ttt={"chunk_size": 4})
        assert config.ttt["layers"] == [0, 6] and config.ttt_code["transformers_tested"] == list(TESTED_TRANSFORMERS)
        assert config.auto_map == {
            "AutoConfig": f"configuration_ttt.{config_cls.__name__}",
            "AutoModel": f"modeling_ttt.{model_cls.__name__}",
            "AutoModelForCausalLM": f"modeling_ttt.{lm_cls.__name__}",
        }
        assert config_cls.from_dict(config.to_dict()).ttt == config.ttt
        with pytest.raises(ValueError, match="ttt layer 8 is out of range"):
            config_cls(num_hidden_layers=8, ttt={"layers": [8]})
