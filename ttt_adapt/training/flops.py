"""Model FLOPs of a training step and the bf16 peak of known GPUs: model FLOPs utilisation (MFU) for the benchmarks.

Model FLOPs count what the model needs, not what a run executes: a recomputed forward (gradient checkpointing) is
not counted, as in the PaLM paper's MFU. Matmuls count 2 FLOPs per multiply-add; a training step is 3x the forward
(forward, and backward for the inputs and for the weights). Attention counts the (query, key) pairs a causal,
document-isolated, optionally sliding-window mask lets through; a TTT layer adds its target projection, its update
(`a h^T`, accumulated per chunk) and the read of the fast weight (one more d x H product per token).
"""

from __future__ import annotations

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched in order against torch.cuda.get_device_name().
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("A100", 312.0),  # SXM and PCIe
)


def bf16_peak_tflops(device_name: str) -> float | None:
    """The card's dense bf16 peak in TFLOP/s, or None for a card not in `BF16_PEAK_TFLOPS`."""
    for fragment, peak in BF16_PEAK_TFLOPS:
        if fragment.lower() in device_name.lower():
            return peak
    return None


def visible_pairs(doc_lengths, sliding_window: int | None = None) -> int:
    """(query, key) pairs attention computes for one row of packed documents: causal, within each document, and
    within `sliding_window` keys (the query itself included) when given."""
    total = 0
    for n in doc_lengths:
        if sliding_window is None or sliding_window >= n:
            total += n * (n + 1) // 2
        else:
            w = sliding_window
            total += w * (w + 1) // 2 + (n - w) * w
    return total


def matmul_params(config) -> int:
    """Weights a token passes through once per forward: attention projections, MLPs, the LM head (embedding
    lookups are not matmuls)."""
    d, inter, layers, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    hd = getattr(config, "head_dim", None) or d // config.num_attention_heads
    qd, kvd = config.num_attention_heads * hd, config.num_key_value_heads * hd
    return layers * (d * (qd + 2 * kvd) + qd * d + 3 * d * inter) + d * V


def train_step_flops(config, doc_lengths_per_row, ttt_layers: int = 0, sliding_window: int | None = None) -> float:
    """Model FLOPs of one training step (forward + backward) over rows of packed documents."""
    d, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    hd = getattr(config, "head_dim", None) or d // config.num_attention_heads
    qd = config.num_attention_heads * hd
    tokens = sum(sum(row) for row in doc_lengths_per_row)
    pairs = sum(visible_pairs(row, sliding_window) for row in doc_lengths_per_row)
    forward = 2 * matmul_params(config) * tokens + layers * 2 * 2 * qd * pairs
    forward += ttt_layers * tokens * 2 * (d * d + 2 * d * inter)  # target projection, update, fast-weight read
    return 3.0 * forward


__all__ = ["BF16_PEAK_TFLOPS", "bf16_peak_tflops", "visible_pairs", "matmul_params", "train_step_flops"]
