"""Model FLOPs for MFU: the matmul weights are the model's Linear weights, the attention pairs are what the
document / causal / window mask lets through, the peaks are matched on the device names torch reports."""

import pytest
import torch
from conftest import tiny_base

from ttt_adapt.training.flops import bf16_peak_tflops, matmul_params, train_step_flops, visible_pairs


def test_matmul_params_are_the_linear_weights_of_the_model():
    model = tiny_base("qwen3", vocab_size=211, intermediate_size=40)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert matmul_params(model.config) == linear


@pytest.mark.parametrize("docs,window", [([7], None), ([3, 9, 1, 6], None), ([3, 9, 1, 6], 4), ([12], 1), ([5], 9)])
def test_visible_pairs_count_the_mask(docs, window):
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(docs)])
    q, k = torch.arange(len(doc))[:, None], torch.arange(len(doc))[None, :]
    mask = (doc[:, None] == doc[None, :]) & (k <= q)
    if window is not None:
        mask &= q - k < window
    assert visible_pairs(docs, window) == int(mask.sum())


def test_train_step_flops_is_three_forwards_of_weights_and_attention():
    config = tiny_base("qwen3").config
    docs = [[5, 11], [16]]
    attention = 2 * 2 * config.num_attention_heads * config.head_dim * (visible_pairs(docs[0]) + visible_pairs(docs[1]))
    forward = 2 * matmul_params(config) * 32 + config.num_hidden_layers * attention
    assert train_step_flops(config, docs) == 3 * forward
    d, inter = config.hidden_size, config.intermediate_size
    assert train_step_flops(config, docs, ttt_layers=2) - train_step_flops(config, docs) == 3 * 2 * 32 * 2 * (
        d * d + 2 * d * inter)


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                       ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.0),
                                       ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0),
                                       ("Tesla T4", None)])
def test_bf16_peaks_by_device_name(name, peak):
    assert bf16_peak_tflops(name) == peak
