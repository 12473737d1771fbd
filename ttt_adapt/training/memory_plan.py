"""Memory plan of a recipe before any work: what one device holds during a training step, from the config only.

`plan_memory(recipe, config)` builds the model training builds (`ttt_adapt.model_setup.build_model`) on the meta
device (no weights; exact parameter counts and what is trained, LoRA included) and estimates, per device: parameters, gradients and AdamW states (FSDP
shards them over the processes), autocast's low-precision weight copies, activations (with or without gradient
checkpointing, per context-parallel shard), the TTT fast-weight states, the blocked loss's buffers and a
runtime reserve. `MemoryPlan.format()` prints it and says whether it fits a device of a given size.

Activation sizes per token and layer are counted from the tensors autograd saves in a Qwen3/Llama layer (inputs of
every linear, norm, rotary and attention op, the MLP's gate/up/product) and were checked against measured CPU
peaks (docs/performance.md); they are estimates, not guarantees.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ttt_adapt.loss import BLOCK_ELEMENTS
from ttt_adapt.model_setup import build_model, decoder_layers

GiB = 1024**3
RUNTIME_RESERVE = {"cuda": 1.5 * GiB, "cpu": 0}  # CUDA context, cuBLAS workspaces, allocator fragmentation
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class MemoryPlan:
    """Bytes per device, by item, with the assumptions that produced them."""

    items: list = field(default_factory=list)  # (name, bytes, note), held through the step
    transient: list = field(default_factory=list)  # (name, bytes, note), one at a time: the largest counts
    settings: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return int(sum(b for _, b, _ in self.items) + max((b for _, b, _ in self.transient), default=0))

    def fits(self, device_memory: float) -> bool:
        return self.total <= device_memory

    def format(self, device_memory: float | None = None) -> str:
        s = self.settings
        split = f" / cp {s['cp']}" if s["cp"] > 1 else ""
        lines = [
            f"memory plan per device: {s['model']} ({s['parameters'] / 1e6:,.1f}M parameters, "
            f"{s['trainable'] / 1e6:,.1f}M trained), {s['tokens_per_device']:,} tokens a micro-batch on each device "
            f"({s['batch_size']} x {s['seq_len']:,}{split}), {s['processes']} process(es)"
            f"{', FSDP' if s['fsdp'] else ''}, {s['compute']} compute on {s['device']}",
        ]
        width = max(len(n) for n, _, _ in self.items + self.transient) + 2
        for name, b, note in self.items:
            lines.append(f"  {name:<{width}} {b / GiB:9.2f} GiB   {note}")
        lines.append("  the largest of (one after the other):")
        for name, b, note in self.transient:
            lines.append(f"    {name:<{width - 2}} {b / GiB:9.2f} GiB   {note}")
        lines.append(f"  {'total':<{width}} {self.total / GiB:9.2f} GiB")
        if device_memory is not None:
            verdict = "fits" if self.fits(device_memory) else "does NOT fit"
            lines.append(f"{verdict} in {device_memory / GiB:.1f} GiB ({100 * self.total / device_memory:.0f}%)")
        return "\n".join(lines)


def plan_memory(recipe, config, processes: int = 1, fsdp: bool = False, device: str = "cuda") -> MemoryPlan:
    """Estimate one device's peak during a training step of `recipe` on the base `config` (a transformers config).

    `processes`: processes in the run (data-parallel x context-parallel); `fsdp`: parameters, gradients and
    optimizer states sharded over all of them (FULL_SHARD). `device`: "cuda" or "cpu" (mixed precision as the
    recipe says on either).
    """
    t, cp = recipe.train, recipe.parallel.cp_size
    model = build_model(recipe, "meta", config)  # the very model training builds, without memory or weights
    params = list(model.parameters())
    P = sum(p.numel() for p in params)
    T = sum(p.numel() for p in params if p.requires_grad)
    wb = BYTES[recipe.model.dtype]
    mixed = t.mixed_precision != "no"
    ab = 2 if mixed else wb  # activation (matmul output) bytes
    rb = max(wb, 4) if mixed else wb  # the residual stream stays in the weights' dtype (fp32 under autocast)
    shard = processes if fsdp and processes > 1 else 1
    c = config
    d, inter, layers, V = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    hd = getattr(c, "head_dim", None) or d // c.num_attention_heads
    qd, kvd = c.num_attention_heads * hd, c.num_key_value_heads * hd
    ttt_layers = len(recipe.ttt.resolved_layers(layers))
    n = t.batch_size * recipe.data.seq_len // cp  # tokens of a micro-batch on one device
    L = recipe.data.seq_len

    # saved for backward per token, one layer: norms (fp32 internals + output), q/k/v and their norms and
    # rotary, attention in/out, o_proj input, MLP gate/up/act/product; a TTT layer adds conv, target, scan inputs
    per_token = (2 * (4 + rb) * d + 2 * ab * d + ab * (3 * qd + 4 * kvd) + (4 + ab) * (qd + kvd) + 2 * ab * qd
                 + 4 * ab * inter)
    per_token_ttt = per_token + 6 * ab * d + 4 * d
    per_layer_mean = (per_token * (layers - ttt_layers) + per_token_ttt * ttt_layers) / layers
    if t.gradient_checkpointing:
        stored = n * rb * d * layers  # every layer's input stays
        # one layer recomputed; its gradients take the place of the activations they consume (measured on CPU)
        layer_peak = n * per_token_ttt
        act_note = f"checkpointed: the {layers} layer inputs"
    else:
        stored = n * per_layer_mean * layers
        layer_peak = n * per_token_ttt  # the gradients of the layer being differentiated
        act_note = f"the saved tensors of all {layers} layers"
    stored += n * rb * d * 2  # embeddings output, final norm output
    if cp > 1:  # all-gathered keys/values of the layer(s) alive at once
        stored += 2 * (L - n // t.batch_size) * t.batch_size * kvd * ab * (1 if t.gradient_checkpointing else layers)
    from ttt_adapt.attention import QUERY_BLOCK

    layer_peak += t.batch_size * min(QUERY_BLOCK, n) * L  # one query block's bool mask
    fast = 3 * t.batch_size * d * inter * 4 if ttt_layers else 0  # state, its gradient, a product: fp32
    fast_note = "fast-weight states"
    if ttt_layers and recipe.ttt.write_rule == "delta":
        # the delta rule's scan is differentiated by autograd: every chunk's d x H state (fp32) and the chunk's
        # C x C triangular system stay for the backward, per TTT layer (one layer at a time when checkpointed)
        C = min(recipe.ttt.chunk_size, L)
        chunks = -(-n // C)
        per_layer = chunks * (d * inter * 4 + C * C * 4 + C * (inter + d) * 4)
        kept = per_layer * (1 if t.gradient_checkpointing else ttt_layers)
        stored += 0 if t.gradient_checkpointing else kept
        fast += per_layer
        fast_note = f"fast-weight states ({chunks} per TTT layer: the delta rule keeps each chunk's)"
    head_trained = any(p.requires_grad for p in model.get_output_embeddings().parameters())
    block = min(n, max(16, BLOCK_ELEMENTS // V))
    # a block's fp32 logits and logsumexp's temporary (+ a low-precision copy), the hidden states' gradient
    loss = block * V * (8 + (ab if ab != 4 else 0)) + n * d * rb + (V * d * 4 if head_trained else 0)
    sharded = f" / {shard} (FSDP)" if shard > 1 else ""
    static = [
        ("parameters", P * wb / shard, f"{P / 1e6:,.0f}M x {wb} B{sharded}"),
        ("gradients", T * wb / shard, f"{T / 1e6:,.1f}M trained x {wb} B{sharded}"),
        ("optimizer states", 2 * T * wb / shard, f"AdamW: 2 states per trained parameter{sharded}"),
    ]
    if shard > 1:
        biggest = max(sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(model))
        static.append(("FSDP gathered layers", 2 * biggest * wb, "the running layer and the prefetched next one"))
    if mixed:
        static.append(("autocast weight copies", 2 * T / shard + 2 * d * max(V, 3 * inter),
                       "bf16 copies of trained weights (cached) + the largest frozen one"))
    static += [
        ("activations kept", stored, act_note),
        ("runtime reserve", RUNTIME_RESERVE.get(device, 0), "CUDA context, workspaces, fragmentation"),
    ]
    # these come one after the other (loss, then layer by layer in backward): the largest counts
    transient = [
        ("loss buffers", loss, f"{block} tokens x {V:,} logits a block" + (" + head gradient" if head_trained else "")),
        ("backward of one layer", layer_peak + fast, f"{'recomputed ' if t.gradient_checkpointing else ''}"
         f"activations, gradients, {min(QUERY_BLOCK, n)} x {L:,} mask, {fast_note}"),
    ]
    settings = dict(model=recipe.model.name_or_path, parameters=P, trainable=T, tokens_per_device=n,
                    batch_size=t.batch_size, seq_len=L, cp=cp, processes=processes, fsdp=shard > 1,
                    compute="bf16 autocast" if mixed else recipe.model.dtype, device=device)
    return MemoryPlan([(name, int(b), note) for name, b, note in static],
                      [(name, int(b), note) for name, b, note in transient], settings)


__all__ = ["MemoryPlan", "plan_memory"]
