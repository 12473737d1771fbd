"""What the benchmarks share: the TTT MLP and the forwards it is measured against, the Qwen3 models, the machine,
the resident-set reading, the paths (every measured child process runs `scripts/benchmark.py` again) and the
argument types of the command line."""

import argparse
import os
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

from ttt_adapt.modeling.configuration_ttt import TTTConfig
from ttt_adapt.modeling.ttt_layer import TTTMLP

VARIANTS = ("plain", "ttt", "published", "loop")
REPO = str(Path(__file__).resolve().parents[2])
SCRIPT = str(Path(REPO) / "scripts" / "benchmark.py")


def make_mlp(d, H, chunk, seed=0, state_decay=None, write_rule="sum", key_norm=False):
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP

    torch.manual_seed(seed)
    base = Qwen3MLP(Qwen3Config(hidden_size=d, intermediate_size=H))
    config = TTTConfig(chunk_size=chunk, state_decay=state_decay, write_rule=write_rule, key_norm=key_norm,
                       lr_init=0.5 if write_rule == "delta" else 3.0)
    mlp = TTTMLP(base, config, layer_idx=0)
    with torch.no_grad():
        mlp.ttt.conv.weight.normal_(0, 0.02)
        mlp.ttt.target_proj.weight.normal_(0, 0.02)
    return base, mlp


def published_forward(mlp, x, C):
    """The published training forward: per-chunk updates materialised (n x d x H), then an exclusive cumsum."""
    B, L, d = x.shape
    n = L // C
    h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    v = F.conv1d(x.reshape(B * n, C, d).transpose(1, 2), mlp.ttt.conv.weight, padding=mlp.ttt.conv.padding[0], groups=d)
    v = mlp.ttt.target_proj(v.transpose(1, 2)).reshape(B, n, C, d) * mlp.ttt.lr
    hc = h.reshape(B, n, C, -1)
    dW = torch.einsum("bncd,bnch->bndh", v, hc)
    W = mlp.down_proj.weight + (torch.cumsum(dW, dim=1) - dW)
    return torch.einsum("bnch,bndh->bncd", hc, W).reshape(B, L, d)


def loop_forward(mlp, x, C):
    """Chunks in a Python loop with a running state, left to autograd (it keeps one d x H state per chunk)."""
    B, L, d = x.shape
    h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    y = mlp.down_proj(h)
    S = torch.zeros(B, d, h.shape[-1])
    outs = []
    for c in range(0, L, C):
        hc, xc = h[:, c : c + C], x[:, c : c + C]
        outs.append(hc @ S.transpose(1, 2))
        v = F.conv1d(xc.transpose(1, 2), mlp.ttt.conv.weight, padding=mlp.ttt.conv.padding[0], groups=d).transpose(1, 2)
        v = mlp.ttt.target_proj(v) * mlp.ttt.lr
        S = S + v.transpose(1, 2) @ hc
    return y + torch.cat(outs, dim=1)


def run_once(variant, base, mlp, x, w, C):
    for p in list(base.parameters()) + list(mlp.parameters()):
        p.grad = None
    x.grad = None
    if variant == "plain":
        y = base(x)
    elif variant == "ttt":
        y = mlp(x)
    elif variant == "published":
        y = published_forward(mlp, x, C)
    else:
        y = loop_forward(mlp, x, C)
    (y * w).sum().backward()


def rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


SIZES = {  # mid: the 12-layer CPU model; small: the issue-13 memory model (hidden 256, 2 layers, untied head)
    "mid": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=8,
                num_key_value_heads=4, head_dim=64),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64),
}


def make_lm(ttt: bool, chunk: int, seed: int = 0, size: str = "mid", vocab: int = 4096, **ttt_options):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from ttt_adapt import convert

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=vocab, max_position_embeddings=131072, tie_word_embeddings=False, **SIZES[size])
    model = Qwen3ForCausalLM(config)
    if ttt:
        model = convert(model, TTTConfig(chunk_size=chunk, **ttt_options))  # every 6th layer: 0 and 6
        with torch.no_grad():
            for m in model.ttt_modules().values():
                m.ttt.conv.weight.normal_(0, 0.02)
    return model


def machine():
    return {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
    }


def names(choices):
    def parse(text):
        names = text.split(",")
        if not names or any(n not in choices for n in names):
            raise argparse.ArgumentTypeError(f"expected names from {', '.join(choices)}, got {text!r}")
        return names

    return parse


def ints(text):
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values
