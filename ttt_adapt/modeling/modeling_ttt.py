"""In-Place TTT versions of transformers' decoder families: thin subclasses, nothing copied.

The classes at the end are every family's, written out: each TTT class is "TTT" + the stock class it subclasses
(`class TTTQwen3ForCausalLM(TTTCausalLMMixin, Qwen3ForCausalLM)`, `TTTGemma3TextModel`, ...), and `FAMILIES`
is the one registry of them (stock model_type -> TTT causal LM).

The chosen decoder layers get a `TTTMLP`; the model builds a `TTTContext` (real tokens, document starts,
input embeddings, generation state) once per forward and hands it to those layers. Generation state lives
in transformers' own `DynamicCache`: its layers for TTT layers become `TTTDynamicLayer` /
`TTTSlidingWindowLayer`, which carry the fast weights and reorder them for beam search.
transformers renamed the forward's cache argument (`past_key_values` up to 5.23, `cache` from 5.24): the models
accept either name and hand the cache on under the name the installed release's own classes take. Every cached
forward then checks that the attention cache and the fast weights have seen the same number of tokens, so a
cache that an environment change misroutes raises instead of producing wrong tokens.
This file ships inside every export: torch and transformers only.
"""

import inspect

import torch
import transformers
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.models.gemma3.modeling_gemma3 import (
    Gemma3DecoderLayer,
    Gemma3ForCausalLM,
    Gemma3PreTrainedModel,
    Gemma3TextModel,
)
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
)
from transformers.models.mistral.modeling_mistral import (
    MistralDecoderLayer,
    MistralForCausalLM,
    MistralModel,
    MistralPreTrainedModel,
)
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2DecoderLayer,
    Qwen2ForCausalLM,
    Qwen2Model,
    Qwen2PreTrainedModel,
)
from transformers.models.qwen3.modeling_qwen3 import (
    Qwen3DecoderLayer,
    Qwen3ForCausalLM,
    Qwen3Model,
    Qwen3PreTrainedModel,
)

from .configuration_ttt import (
    TESTED_TRANSFORMERS,
    TTTGemma3TextConfig,
    TTTLlamaConfig,
    TTTMistralConfig,
    TTTQwen2Config,
    TTTQwen3Config,
)
from .ttt_layer import TTTContext, TTTLayerState, TTTMLP, TTTParams
from .ttt_state import TTTState, state_header

# ----------------------------------------------------------------------------------------------- cache


class TTTCacheLayerMixin:
    """Adds a `TTTLayerState` to a transformers cache layer and keeps it in step with the batch."""

    is_croppable = False  # the fast weights cannot be rolled back (read by transformers >= 5.25 before any crop)

    def reorder_cache(self, beam_idx):
        super().reorder_cache(beam_idx)
        self.ttt_state.index_select(beam_idx.cpu() if self.ttt_state.n is not None else beam_idx)

    def batch_select_indices(self, indices):
        super().batch_select_indices(indices)
        self.ttt_state.index_select(torch.as_tensor(indices).cpu())

    def batch_repeat_interleave(self, repeats):
        super().batch_repeat_interleave(repeats)
        self.ttt_state.repeat_interleave(repeats)

    def reset(self):
        super().reset()
        self.ttt_state.reset()

    def crop(self, tokens_to_remove):
        raise NotImplementedError("In-Place TTT fast weights cannot be rolled back, so the cache cannot be cropped")


class TTTDynamicLayer(TTTCacheLayerMixin, DynamicLayer):
    """`DynamicLayer` (full attention) plus the TTT layer's fast-weight state."""


class TTTSlidingWindowLayer(TTTCacheLayerMixin, DynamicSlidingWindowLayer):
    """`DynamicSlidingWindowLayer` plus the TTT layer's fast-weight state."""


def attach_ttt_states(cache, ttt_layers, num_layers):
    """Give the cache layers of TTT layers a fast-weight state (in place); return {layer_idx: TTTLayerState}."""
    if not isinstance(cache, DynamicCache):
        raise ValueError(f"In-Place TTT models need a DynamicCache, got {type(cache).__name__}")
    while len(cache.layers) < num_layers:  # a DynamicCache built without a config creates layers lazily
        cache.layers.append(DynamicLayer())
    states = {}
    for i in ttt_layers:
        layer = cache.layers[i]
        if not isinstance(layer, TTTCacheLayerMixin):
            if getattr(layer, "is_initialized", False):
                raise ValueError(f"cache layer {i} already holds keys/values but no TTT state: pass a fresh cache")
            cls = TTTSlidingWindowLayer if isinstance(layer, DynamicSlidingWindowLayer) else TTTDynamicLayer
            if not isinstance(layer, DynamicLayer):
                raise ValueError(f"In-Place TTT cannot use cache layers of type {type(layer).__name__}")
            new = cls.__new__(cls)
            new.__dict__.update(layer.__dict__)
            new.ttt_state = TTTLayerState()
            cache.layers[i] = layer = new
        states[i] = layer.ttt_state
    return states


def cache_argument(model_cls) -> str:
    """The name under which `model_cls.forward` (a stock transformers model) takes the cache."""
    params = inspect.signature(model_cls.forward).parameters  # follows the deprecation wrappers to the function
    return "cache" if "cache" in params else "past_key_values"


def one_cache(cache, past_key_values):
    """The cache passed under either name (a ValueError if two different ones were passed)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the cache once, as `cache` or `past_key_values`, not two different ones")
    return cache if cache is not None else past_key_values


def check_cache_in_step(cache, states, when, attention_mask=None):
    """Every TTT layer's attention cache must hold exactly the tokens its fast weights have read (and, after the
    forward, as many as a 2-D attention mask covers).

    A cache that transformers did not hand to attention (a renamed argument, a replaced cache object) breaks
    this; raising here is what keeps a stateful model from returning wrong logits silently. A `TTTState` loaded
    into a cache (`state_cache`) is carried apart from attention: its layers count from what the cache holds then
    (0 for a fresh cache, whose positions restart), not from the text that produced the state.
    """
    for i, state in states.items():
        held = cache.get_seq_length(i)
        if held != int(state.seen):
            _cache_error(f"{when} (layer {i}): attention holds {held} tokens but the fast weights have read {int(state.seen)}")
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and attention_mask.shape[1] != held:
            _cache_error(f"{when} (layer {i}): the attention mask covers {attention_mask.shape[1]} tokens but the "
                         f"cache holds {held}")


def refuse_stateless_continuation(position_ids, valid, B, L):
    """Refuse (one line) a forward that continues sequences without their fast weights.

    With no TTT state, a row's tokens must start sequences: position 0 at the row's first real token and wherever
    the positions restart (packed documents). A sequence starting past 0 continues earlier tokens whose fast-weight
    updates this call does not hold -- what a caller that drops the cache does, or vLLM's transformers backend,
    which calls the model once per step with the new tokens, their positions and no cache.
    """
    pos = position_ids.expand(B, L)
    starts = torch.ones(B, L, dtype=torch.bool, device=pos.device)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    if valid is not None:  # pads' positions say nothing
        starts &= valid.to(pos.device)
    if bool((starts & (pos != 0)).any()):
        raise ValueError(
            "In-Place TTT: this forward continues a sequence (positions past 0) without its fast-weight state, which "
            "lives in the generation cache: keep the cache (use_cache=True and pass it back, or use generate()); to "
            "serve with vLLM install the ttt-adapt vLLM plugin (pip install 'ttt-adapt[vllm]')"
        )


def _cache_error(what):
    lo, hi = TESTED_TRANSFORMERS
    raise RuntimeError(
        f"In-Place TTT cache check failed {what}, so the cache did not reach attention as this code expects under "
        f"transformers {transformers.__version__} (this model code was tested with {lo} to {hi}); refresh the model "
        f"code (ttt-adapt: python scripts/export.py --refresh-code DIR) or install transformers>={lo},<={hi}"
    )


# ----------------------------------------------------------------------------------------------- layers


class TTTDecoderLayerMixin:
    """Swaps in a `TTTMLP` when this layer is a TTT layer, and hands it the forward's `TTTContext`.

    With `target="input_embed"` the input embeddings enter the layer as a second positional tensor argument:
    transformers' gradient checkpointing recomputes a layer from its positional arguments, and reentrant
    checkpointing (`use_reentrant=True`) only carries gradients back through those.
    """

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        if layer_idx in config.ttt["layers"]:
            self.mlp = TTTMLP(self.mlp, config.ttt_config, layer_idx)

    def __call__(self, hidden_states, *args, ttt_context=None, **kwargs):
        if isinstance(self.mlp, TTTMLP) and self.mlp.target == "input_embed" and ttt_context is not None:
            args = (ttt_context.inputs_embeds, *args)
            kwargs["ttt_embeds_in_args"] = True
        return super().__call__(hidden_states, *args, ttt_context=ttt_context, **kwargs)

    def forward(self, hidden_states, *args, ttt_context=None, ttt_embeds_in_args=False, **kwargs):
        if not isinstance(self.mlp, TTTMLP):
            return super().forward(hidden_states, *args, **kwargs)
        if ttt_embeds_in_args:  # the embeddings this (possibly recomputed) call received
            ttt_context = ttt_context.with_inputs_embeds(args[0])
            args = args[1:]
        # Set right before use (and again when gradient checkpointing replays this layer in backward).
        self.mlp.ttt_context = ttt_context
        try:
            return super().forward(hidden_states, *args, **kwargs)
        finally:
            self.mlp.ttt_context = None


# ----------------------------------------------------------------------------------------------- models


# Generation settings that make `generate()` draft tokens and roll back the ones it rejects (assisted, prompt-lookup,
# early-exit, multi-token-prediction and DFlash speculative decoding). Names absent from a release are never set there.
SPECULATIVE_SETTINGS = (
    "assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit", "use_mtp", "speculation_type",
)


def refuse_speculative_decoding(generation_config, kwargs):
    """Refuse (ValueError, one line) a `generate()` call that would decode speculatively, before any token is made.

    Speculative decoding verifies drafted tokens and crops the cache back to the accepted ones; fast weights that
    have read a rejected token cannot be rolled back. Checked here rather than left to transformers (which refused
    models with `_is_stateful` up to 5.24 and starts assisted decoding from 5.25): `generation_config` is the one
    the call passes (or the model's), `kwargs` the call's own keyword arguments, which override it.
    """
    for name in SPECULATIVE_SETTINGS:
        value = kwargs.get(name, getattr(generation_config, name, None))
        if value is not None and value is not False:
            raise ValueError(
                f"In-Place TTT models are stateful (their fast weights cannot be rolled back), so speculative "
                f"decoding is not supported: remove `{name}` from the generate() call or its generation config"
            )


class TTTPreTrainedMixin:
    """What every TTT model class shares: stateful generation, TTT init, helpers."""

    _is_stateful = True  # the fast weights can't be rolled back (transformers <= 5.24 refuses assisted decoding too)
    _can_compile_fullgraph = False

    def generate(self, inputs=None, generation_config=None, *args, ttt_state=None, **kwargs):
        """transformers' `generate`; `ttt_state` (a `TTTState`) starts every row's fast weights from that state,
        without the text that produced it (positions restart at 0: attention never saw that text)."""
        refuse_speculative_decoding(generation_config if generation_config is not None else self.generation_config,
                                    kwargs)
        if ttt_state is not None:
            if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
                raise ValueError("pass either ttt_state or a cache to generate(), not both")
            ids = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
            if ids is None:
                raise ValueError("generate(ttt_state=...) needs the prompt (input_ids or inputs_embeds)")
            config = generation_config if generation_config is not None else self.generation_config
            beams, sequences = (kwargs.get(k, getattr(config, k, 1)) or 1 for k in ("num_beams", "num_return_sequences"))
            copies = beams if beams > 1 else sequences  # generate() repeats each row this many times
            if ttt_state.batch_size > 1 and copies > 1:
                ttt_state = ttt_state.rows(torch.arange(ttt_state.batch_size).repeat_interleave(copies).tolist())
            kwargs[self._ttt_decoder()._cache_argument] = self.state_cache(ttt_state, ids.shape[0] * copies)
        return super().generate(inputs, generation_config, *args, **kwargs)

    # ------------------------------------------------------------------------------------- fast-weight memory

    def _ttt_decoder(self):
        return self if isinstance(self, TTTModelMixin) else self.model

    def state_cache(self, state: TTTState, batch_size: int, cache=None) -> DynamicCache:
        """A generation cache whose TTT layers start from `state` (checked against this model): a new one, or
        `cache` with its TTT states replaced (its attention keeps what it holds)."""
        state.check(self)
        cache = DynamicCache(config=self.config) if cache is None else cache
        states = attach_ttt_states(cache, self.config.ttt["layers"], self.config.num_hidden_layers)
        device = next(self.parameters()).device
        state.load_into(states, batch_size, {i: cache.get_seq_length(i) for i in states}, device)
        return cache

    def state_from_cache(self, cache, tokens=None) -> TTTState:
        """A copy of the fast-weight state a generation cache holds (`tokens`: real tokens read per row, for the
        header; default the positions its attention has seen)."""
        states = {i: cache.layers[i].ttt_state for i in self.config.ttt["layers"]
                  if i < len(cache.layers) and hasattr(cache.layers[i], "ttt_state")}
        if len(states) != len(self.config.ttt["layers"]) or not all(s.started for s in states.values()):
            raise ValueError("this cache holds no fast-weight state: nothing was read with it")
        B = next(iter(states.values())).S.shape[0]
        tokens = [int(next(iter(states.values())).seen)] * B if tokens is None else tokens
        return TTTState.from_layer_states(states, state_header(self), tokens)

    def load_state(self, path) -> TTTState:
        """Read a state file written by `TTTState.save`; a one-line ValueError if it is truncated or belongs to
        another model, TTT layout or dtype."""
        return TTTState.load(path, self)

    @torch.no_grad()
    def read_state(self, documents, state: TTTState = None, attention_mask=None, piece_tokens: int = None,
                   attention: str = "document") -> TTTState:
        """Read text into fast weights and return the state (a `TTTState`), continuing `state` if given.

        Args:
            documents: a (B, L) LongTensor (row b read into row b of the state; pads marked by `attention_mask`,
                left or right) or a list of 1-D token sequences read one after another into one state (1 row).
            piece_tokens: tokens fed per forward (default 4 chunks): memory does not grow with a document's length
                beyond its attention cache.
            attention: "document": the pieces of a document share one attention cache, so the state equals one pass
                over the document (sliding-window layers hold only their window; full-attention layers hold the
                whole document's keys and values); "piece": the attention cache is dropped after each piece and only
                the fast weights go on (memory flat for any model; attention then sees one piece at a time).
        A new document, and text read into a given `state`, starts a fresh attention context (positions from 0);
        the fast weights go on from where the state left them, unfinished chunk included.
        """
        if attention not in ("document", "piece"):
            raise ValueError(f"attention must be 'document' or 'piece', got {attention!r}")
        chunk = self.config.ttt["chunk_size"]
        piece = piece_tokens or 4 * chunk
        if isinstance(piece, bool) or not isinstance(piece, int) or piece < 1:
            raise ValueError(f"piece_tokens must be a positive integer, got {piece_tokens!r}")
        device = next(self.parameters()).device
        if isinstance(documents, torch.Tensor):
            ids = documents[None] if documents.dim() == 1 else documents
            mask = None if attention_mask is None else torch.as_tensor(attention_mask).to(device).long()
            batches = [(ids.to(device), mask)] if ids.numel() and (mask is None or bool(mask.any())) else []
        else:
            if attention_mask is not None:
                raise ValueError("attention_mask goes with a (B, L) tensor, not with a list of documents")
            docs = [torch.as_tensor(d, dtype=torch.long).flatten() for d in documents]
            batches = [(d[None].to(device), None) for d in docs if d.numel()]
        if not batches:
            raise ValueError("nothing to read: no document holds a token")
        if state is not None:
            state.check(self)
        header = state_header(self)
        decoder = self._ttt_decoder()
        for ids, mask in batches:
            B, L = ids.shape
            tokens = (state.tokens if state is not None else [0] * B)
            if state is not None and state.batch_size == 1 and B > 1:
                tokens = tokens * B
            read = mask.sum(1).tolist() if mask is not None else [L] * B
            cache, start = (DynamicCache(config=self.config) if state is None else self.state_cache(state, B)), 0
            for s in range(0, L, piece):
                e = min(s + piece, L)
                kw = {} if mask is None else {"attention_mask": mask[:, start:e]}
                decoder(input_ids=ids[:, s:e], cache=cache, use_cache=True, **kw)
                if attention == "piece" and e < L:  # keep the fast weights only
                    state = self.state_from_cache(cache, tokens)
                    cache, start = self.state_cache(state, B), e
            state = self.state_from_cache(cache, [t + r for t, r in zip(tokens, read)])
        return state

    def _init_weights(self, module):
        if isinstance(module, TTTParams):
            module.reset_parameters(self.config.ttt["lr_init"], self.config.initializer_range)
        else:
            super()._init_weights(module)

    def ttt_modules(self) -> dict:
        """{layer_idx: TTTMLP} of this model."""
        return {m.layer_idx: m for m in self.modules() if isinstance(m, TTTMLP)}


class TTTModelMixin(TTTPreTrainedMixin):
    """Builds the `TTTContext` of a forward call, then runs the stock forward.

    A `cp_shard` keyword (context-parallel training, `ttt_adapt.distributed.context_parallel`) reaches both the attention function
    and the TTT layers.
    """

    _cache_argument = "past_key_values"  # each model class sets the name its stock forward takes
    ttt_decoder_layer = None  # the family's TTT decoder layer class

    def __init__(self, config):
        super().__init__(config)
        for i in config.ttt["layers"]:
            self.layers[i] = self.ttt_decoder_layer(config, i)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        use_cache=None,
        past_key_values=None,
        ttt_state=None,
        **kwargs,
    ):
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        cache = one_cache(cache, past_key_values)
        if ttt_state is not None:  # a fast-weight memory without its text: a fresh cache starting from it
            if cache is not None:
                raise ValueError("pass either ttt_state or a cache, not both (continue from the returned cache)")
            cache, use_cache = self.state_cache(ttt_state, (input_ids if input_ids is not None else inputs_embeds).shape[0]), True
        cp_shard = kwargs.get("cp_shard")
        if cp_shard is not None:
            cp_shard.check_call(attention_mask=attention_mask, cache=cache, use_cache=use_cache)
            use_cache = False
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache is None:  # no cache in training: it would only hold fast-weight state nobody reads
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None and not (self.gradient_checkpointing and self.training):
            cache = DynamicCache(config=self.config)
        states = None
        if use_cache and cache is not None:
            states = attach_ttt_states(cache, self.config.ttt["layers"], self.config.num_hidden_layers)
            check_cache_in_step(cache, states, "before the forward")
        ttt_context = TTTContext.from_inputs(attention_mask, position_ids, inputs_embeds, states)
        ttt_context.parallel = cp_shard
        if cp_shard is None and position_ids is not None and not any(s.started for s in (states or {}).values()):
            refuse_stateless_continuation(position_ids, ttt_context.valid, *inputs_embeds.shape[:2])
        ttt_context.prepare(self.config.ttt["chunk_size"], None if states is None else states[min(states)])
        out = super().forward(
            input_ids=None,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            ttt_context=ttt_context,
            **{self._cache_argument: cache},
            **kwargs,
        )
        if states is not None:
            check_cache_in_step(cache, states, "after the forward", attention_mask)
        return out


class TTTCausalLMMixin(TTTPreTrainedMixin):
    """A stock causal LM whose decoder is the family's TTT model (`ttt_model`).

    The stock __init__ is skipped (it would build a stock decoder first); every family's does just this:
    pretrained-model init, `model`, `vocab_size`, `lm_head`, `post_init`. The stock forward (loss, Gemma 3's final
    logit softcapping) runs as it is.
    """

    ttt_model = None  # the family's TTT model class
    stock_pretrained = None  # the stock causal LM's pretrained-model base (e.g. Qwen3PreTrainedModel)

    def __init__(self, config):
        self.stock_pretrained.__init__(self, config)
        self.model = self.ttt_model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


def ttt_learning_rates(model) -> dict:
    """{layer_idx: current learned TTT learning rate} (warmup factor excluded)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    rates = {}
    for m in _ttt_mlps(base):
        lr = m.ttt.lr.detach()
        lr = lr.full_tensor() if hasattr(lr, "full_tensor") else lr  # sharded (FSDP): every process calls this
        rates[m.layer_idx] = float(lr.float().mean())
    return rates


def set_ttt_training_step(model, step: int) -> None:
    """Apply the TTT learning-rate warmup (`TTTConfig.lr_warmup_steps`) for optimizer step `step` (from 1)."""
    for m in _ttt_mlps(model):
        warmup = m.ttt_warmup_steps
        m.ttt.lr_scale.fill_(1.0 if warmup <= 0 else min(1.0, step / warmup))


def _ttt_mlps(model):
    return [m for m in model.modules() if isinstance(m, TTTMLP)]


# ----------------------------------------------------------------------------------------------- families
# Every family In-Place TTT takes: its TTT decoder layer, model and causal LM, each "TTT" + the stock class it
# subclasses. What a family needs: a gated MLP named `mlp` (`gate_proj`, `up_proj`, `down_proj`, `act_fn`) that
# the decoder layer calls once, and a causal LM whose __init__ is the usual `model` + `lm_head` (see
# `TTTCausalLMMixin`). Everything else (norms around the MLP, scaled embeddings, sliding windows, logit
# softcapping) stays in the stock classes. Adding a family: its config in configuration_ttt.py, its three classes
# and a `register_family` line here (plus its tiny config in tests/conftest.py, which runs the whole contract on it).

FAMILIES = {}  # the family registry: stock model_type -> TTT causal LM class, in the order registered below


def register_family(causal_lm):
    """Check a family's TTT classes against its config and register them for the auto classes and in `FAMILIES`."""
    model, config_class = causal_lm.ttt_model, causal_lm.config_class
    if (model.__name__, causal_lm.__name__) != config_class.ttt_classes:  # the names the export's auto_map uses
        raise TypeError(f"{config_class.__name__}.ttt_classes {config_class.ttt_classes} does not name {model.__name__}")
    config_class.register_for_auto_class()
    model.register_for_auto_class("AutoModel")
    causal_lm.register_for_auto_class("AutoModelForCausalLM")
    FAMILIES[config_class.model_type.removeprefix("ttt_")] = causal_lm
    return causal_lm


class TTTQwen3DecoderLayer(TTTDecoderLayerMixin, Qwen3DecoderLayer):
    """`Qwen3DecoderLayer` whose MLP is a `TTTMLP`."""


class TTTQwen3Model(TTTModelMixin, Qwen3Model):
    """`Qwen3Model` with In-Place TTT MLPs in `config.ttt['layers']`."""

    config_class = TTTQwen3Config
    _no_split_modules = ["Qwen3DecoderLayer", "TTTQwen3DecoderLayer"]
    _cache_argument = cache_argument(Qwen3Model)
    ttt_decoder_layer = TTTQwen3DecoderLayer


class TTTQwen3ForCausalLM(TTTCausalLMMixin, Qwen3ForCausalLM):
    """`Qwen3ForCausalLM` whose decoder is a `TTTQwen3Model`."""

    config_class = TTTQwen3Config
    _no_split_modules = ["Qwen3DecoderLayer", "TTTQwen3DecoderLayer"]
    ttt_model = TTTQwen3Model
    stock_pretrained = Qwen3PreTrainedModel


class TTTQwen2DecoderLayer(TTTDecoderLayerMixin, Qwen2DecoderLayer):
    """`Qwen2DecoderLayer` whose MLP is a `TTTMLP`."""


class TTTQwen2Model(TTTModelMixin, Qwen2Model):
    """`Qwen2Model` with In-Place TTT MLPs in `config.ttt['layers']`."""

    config_class = TTTQwen2Config
    _no_split_modules = ["Qwen2DecoderLayer", "TTTQwen2DecoderLayer"]
    _cache_argument = cache_argument(Qwen2Model)
    ttt_decoder_layer = TTTQwen2DecoderLayer


class TTTQwen2ForCausalLM(TTTCausalLMMixin, Qwen2ForCausalLM):
    """`Qwen2ForCausalLM` whose decoder is a `TTTQwen2Model`."""

    config_class = TTTQwen2Config
    _no_split_modules = ["Qwen2DecoderLayer", "TTTQwen2DecoderLayer"]
    ttt_model = TTTQwen2Model
    stock_pretrained = Qwen2PreTrainedModel


class TTTLlamaDecoderLayer(TTTDecoderLayerMixin, LlamaDecoderLayer):
    """`LlamaDecoderLayer` whose MLP is a `TTTMLP`."""


class TTTLlamaModel(TTTModelMixin, LlamaModel):
    """`LlamaModel` with In-Place TTT MLPs in `config.ttt['layers']`."""

    config_class = TTTLlamaConfig
    _no_split_modules = ["LlamaDecoderLayer", "TTTLlamaDecoderLayer"]
    _cache_argument = cache_argument(LlamaModel)
    ttt_decoder_layer = TTTLlamaDecoderLayer


class TTTLlamaForCausalLM(TTTCausalLMMixin, LlamaForCausalLM):
    """`LlamaForCausalLM` whose decoder is a `TTTLlamaModel`."""

    config_class = TTTLlamaConfig
    _no_split_modules = ["LlamaDecoderLayer", "TTTLlamaDecoderLayer"]
    ttt_model = TTTLlamaModel
    stock_pretrained = LlamaPreTrainedModel


class TTTMistralDecoderLayer(TTTDecoderLayerMixin, MistralDecoderLayer):
    """`MistralDecoderLayer` whose MLP is a `TTTMLP`."""


class TTTMistralModel(TTTModelMixin, MistralModel):
    """`MistralModel` with In-Place TTT MLPs in `config.ttt['layers']`."""

    config_class = TTTMistralConfig
    _no_split_modules = ["MistralDecoderLayer", "TTTMistralDecoderLayer"]
    _cache_argument = cache_argument(MistralModel)
    ttt_decoder_layer = TTTMistralDecoderLayer


class TTTMistralForCausalLM(TTTCausalLMMixin, MistralForCausalLM):
    """`MistralForCausalLM` whose decoder is a `TTTMistralModel`."""

    config_class = TTTMistralConfig
    _no_split_modules = ["MistralDecoderLayer", "TTTMistralDecoderLayer"]
    ttt_model = TTTMistralModel
    stock_pretrained = MistralPreTrainedModel


class TTTGemma3DecoderLayer(TTTDecoderLayerMixin, Gemma3DecoderLayer):
    """`Gemma3DecoderLayer` whose MLP is a `TTTMLP`."""


class TTTGemma3TextModel(TTTModelMixin, Gemma3TextModel):
    """`Gemma3TextModel` with In-Place TTT MLPs in `config.ttt['layers']`."""

    config_class = TTTGemma3TextConfig
    _no_split_modules = ["Gemma3DecoderLayer", "TTTGemma3DecoderLayer"]
    _cache_argument = cache_argument(Gemma3TextModel)
    ttt_decoder_layer = TTTGemma3DecoderLayer


class TTTGemma3ForCausalLM(TTTCausalLMMixin, Gemma3ForCausalLM):
    """`Gemma3ForCausalLM` whose decoder is a `TTTGemma3TextModel`."""

    config_class = TTTGemma3TextConfig
    _no_split_modules = ["Gemma3DecoderLayer", "TTTGemma3DecoderLayer"]
    ttt_model = TTTGemma3TextModel
    stock_pretrained = Gemma3PreTrainedModel


for _causal_lm in (TTTQwen3ForCausalLM, TTTQwen2ForCausalLM, TTTLlamaForCausalLM, TTTMistralForCausalLM,
                   TTTGemma3ForCausalLM):
    register_family(_causal_lm)

__all__ = [
    *(name for lm in FAMILIES.values() for name in (lm.ttt_model.__name__, lm.__name__)),
    "FAMILIES",
    "ttt_learning_rates",
    "set_ttt_training_step",
]
