import importlib.util
import inspect
import os
import textwrap
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cache_kw():
    from transformers import Qwen3ForCausalLM

    return "cache" if "cache" in inspect.signature(Qwen3ForCausalLM.forward).parameters else "past_key_values"


# The name the installed transformers gives the cache argument of a model forward (`cache` from 5.24).
CACHE_KW = _cache_kw()
OLD_CACHE_KW = "past_key_values" if CACHE_KW == "cache" else "cache"


# Every family `convert` takes, with what its tiny test config sets beyond the common sizes: each family's own
# details are switched on, so that the contract tests run through them (sliding windows with their cache layers,
# Gemma 3's scaled embeddings, extra norms, query_pre_attn_scalar and final logit softcapping).
FAMILY_ARCHS = {
    "qwen3": {},
    "llama": {},
    "qwen2": dict(use_sliding_window=True, sliding_window=5, max_window_layers=2),  # layers 2, 3 slide
    "mistral": dict(sliding_window=6),  # every layer slides
    "gemma3": dict(
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=5, query_pre_attn_scalar=16, final_logit_softcapping=3.0,
    ),
}


def tiny_base(arch="qwen3", seed=0, layers=4, tie=False, **overrides):
    """A tiny random causal LM of a family in FAMILY_ARCHS, built locally (nothing downloaded)."""
    import transformers

    config_cls, lm_cls = {
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    }[arch]
    torch.manual_seed(seed)
    common = dict(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, tie_word_embeddings=tie, max_position_embeddings=512,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    extra = dict(FAMILY_ARCHS[arch])
    if "layer_types" in extra:
        extra["layer_types"] = (extra["layer_types"] * layers)[:layers]
    common.update(extra)
    common.update(overrides)
    config = getattr(transformers, config_cls)(**common)
    return getattr(transformers, lm_cls)(config).eval()


def randomize_ttt(model, seed=1, scale=0.3):
    """Give the TTT parameters non-trivial values (the step-0 init makes the TTT path a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ttt." in name and not name.endswith(".lr"):
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture
def tiny():
    return tiny_base


# First lines of a subprocess script that must run without ttt_adapt (as a user loading an export would).
BLOCK_TTT_ADAPT = textwrap.dedent(
    """
    import sys
    class BlockTTTAdapt:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "ttt_adapt":
                raise ImportError("ttt_adapt must not be needed to load an export")
    sys.meta_path.insert(0, BlockTTTAdapt())
    """
)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices on a shared 2-core machine: one intra-op thread is several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def script_main(name):
    """`main(argv)` of scripts/<name>.py, called in-process (a subprocess costs seconds of imports)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_cli", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


class LargestTensor:
    """Context manager recording the largest tensor (of `dtype`, if given) any torch op makes inside it."""

    def __init__(self, dtype=None):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor) and (dtype is None or t.dtype == dtype):
                        tracker.largest = max(tracker.largest, t.numel())
                return out

        self.largest, self._mode = 0, _Mode()

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)

