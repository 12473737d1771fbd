"""Configuration of In-Place TTT models.

`TTTConfig` holds the TTT knobs; each family's config (`TTTQwen3Config`, `TTTGemma3TextConfig`, ...) is its stock
transformers config plus one `ttt` dict holding a `TTTConfig`. This file ships inside every export: torch/transformers only.
It is the first file of an export that transformers imports, so it refuses a transformers release older than
the oldest one this code is tested with.
"""

from dataclasses import asdict, dataclass, fields

import transformers
from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

# The transformers releases this code is tested with (oldest, newest); pyproject.toml declares the same floor.
TESTED_TRANSFORMERS = ("5.0.0", "5.25.0")


def release(version: str) -> tuple:
    """(major, minor, patch) of a version string such as "5.24.0" or "5.25.0.dev0"."""
    parts = []
    for piece in version.split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        parts.append(int(digits or 0))
    return tuple(parts + [0] * (3 - len(parts)))


def check_transformers(version: str = None) -> None:
    """Refuse (ImportError, one line) a transformers release older than the oldest tested one."""
    version = transformers.__version__ if version is None else version
    lo, hi = TESTED_TRANSFORMERS
    if release(version) < release(lo):
        raise ImportError(
            f"this In-Place TTT model code needs transformers>={lo} (tested with {lo} to {hi}), "
            f"found {version}: pip install -U 'transformers>={lo}'"
        )


check_transformers()

LR_MODES = ("scalar", "token")
TARGETS = ("hidden_states", "input_embed")
NORM_GUARDS = ("warn", "clamp", "off")
WRITE_RULES = ("sum", "delta")


@dataclass
class TTTConfig:
    """Settings of the In-Place TTT layers.

    Args:
        layers: decoder layers whose MLP gets a fast-weight `down_proj`; `None` means every 6th layer from 0.
        chunk_size: tokens per chunk; chunk c reads the updates of chunks < c of the same document.
        conv_kernel_size: odd width of the centred depthwise Conv1D that builds the target (5 sees 2 tokens ahead).
        use_proj: apply the d x d target projection after the conv.
        lr_init: initial value of the learned per-layer TTT learning rate (the paper fixes it at 3).
        lr_learned: train the per-layer TTT learning rate (true) or keep it at `lr_init` (false, as published).
        lr_mode: "scalar" (one learned rate per layer) or "token" (plus a learned per-token gate in (0, 2)).
        target: "hidden_states" (the MLP input; continual training) or "input_embed" (from-scratch training).
        clip_update_norm: if set, each chunk's update is scaled so its Frobenius norm (fp32) is at most this.
        lr_warmup_steps: if > 0, the TTT learning rate ramps linearly from 0 over this many training steps.
        state_decay: if set (0 < decay <= 1), the fast-weight state is multiplied by it before each chunk's update
            is added (S <- decay * S + dW): what a document said k chunks ago weighs decay**k, so the state stays
            bounded however long the document is. null: the published algorithm (a plain sum), bit for bit.
        state_norm_limit: per TTT layer (in `layers` order), the largest fast-weight state norm training produced;
            recorded at export from the evaluation. With it, inference checks every state it writes (`state_norm_guard`).
        state_norm_guard: "warn" (one warning per layer when a state passes 2x its limit), "clamp" (also scale
            every state above its limit back to it, at inference) or "off".
        key_norm: the fast weight's key is h / ||h|| (each token's down_proj input scaled to unit norm) instead of h;
            W_down still reads h. false: the published key.
        write_rule: "sum" (published: each chunk adds lr * v h^T) or "delta" (each chunk adds
            lr * (v - S k) k^T: the error of what the state already returns for the key, so a fact overwrites
            instead of piling up).
    """

    layers: list[int] | None = None
    chunk_size: int = 1024
    conv_kernel_size: int = 5
    use_proj: bool = True
    lr_init: float = 3.0
    lr_learned: bool = True
    lr_mode: str = "scalar"
    target: str = "hidden_states"
    clip_update_norm: float | None = None
    lr_warmup_steps: int = 0
    state_decay: float | None = None
    state_norm_limit: list[float] | None = None
    state_norm_guard: str = "warn"
    key_norm: bool = False
    write_rule: str = "sum"

    def resolved_layers(self, num_layers: int) -> list[int]:
        """The TTT layer indices for a model with `num_layers` decoder layers (validated)."""
        layers = list(range(0, num_layers, 6)) if self.layers is None else list(self.layers)
        for i in layers:
            if isinstance(i, bool) or not isinstance(i, int):
                raise ValueError(f"ttt layers must be integers, got {i!r}")
            if not 0 <= i < num_layers:
                raise ValueError(f"ttt layer {i} is out of range: the model has {num_layers} layers (0..{num_layers - 1})")
        if len(set(layers)) != len(layers):
            raise ValueError(f"ttt layers are repeated: {layers}")
        if not layers:
            raise ValueError("ttt layers is empty: name at least one layer")
        return sorted(layers)

    def validate(self, num_layers: int | None = None) -> "TTTConfig":
        """Raise a one-line ValueError naming the first bad field; return self."""
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"ttt chunk_size must be an integer >= 1, got {self.chunk_size!r}")
        k = self.conv_kernel_size
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"ttt conv_kernel_size must be a positive odd integer (centred kernel), got {k!r}")
        if self.lr_mode not in LR_MODES:
            raise ValueError(f"ttt lr_mode must be one of {LR_MODES}, got {self.lr_mode!r}")
        if self.target not in TARGETS:
            raise ValueError(f"ttt target must be one of {TARGETS}, got {self.target!r}")
        if self.clip_update_norm is not None and not self.clip_update_norm > 0:
            raise ValueError(f"ttt clip_update_norm must be > 0 or null, got {self.clip_update_norm!r}")
        d = self.state_decay
        if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d <= 1):
            raise ValueError(f"ttt state_decay must be in (0, 1] or null, got {d!r}")
        if self.state_norm_guard not in NORM_GUARDS:
            raise ValueError(f"ttt state_norm_guard must be one of {NORM_GUARDS}, got {self.state_norm_guard!r}")
        limits = self.state_norm_limit
        if limits is not None and (not isinstance(limits, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in limits)):
            raise ValueError(f"ttt state_norm_limit must be a list of norms > 0 (one per TTT layer) or null, got {limits!r}")
        if isinstance(self.lr_warmup_steps, bool) or not isinstance(self.lr_warmup_steps, int) or self.lr_warmup_steps < 0:
            raise ValueError(f"ttt lr_warmup_steps must be an integer >= 0, got {self.lr_warmup_steps!r}")
        if self.write_rule not in WRITE_RULES:
            raise ValueError(f"ttt write_rule must be one of {WRITE_RULES}, got {self.write_rule!r}")
        if not isinstance(self.lr_learned, bool):
            raise ValueError(f"ttt lr_learned must be true or false, got {self.lr_learned!r}")
        if not isinstance(self.key_norm, bool):
            raise ValueError(f"ttt key_norm must be true or false, got {self.key_norm!r}")
        if not isinstance(self.use_proj, bool):
            raise ValueError(f"ttt use_proj must be true or false, got {self.use_proj!r}")
        if num_layers is not None:
            layers = self.resolved_layers(num_layers)
            if limits is not None and len(limits) != len(layers):
                raise ValueError(f"ttt state_norm_limit has {len(limits)} norms for {len(layers)} TTT layers")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TTTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ttt setting(s): {', '.join(unknown)}")
        return cls(**d)


class TTTConfigMixin:
    """Adds the `ttt` dict to a stock decoder config and checks it."""

    ttt_classes = ("", "")  # (model, causal LM) class names in modeling_ttt: the export's auto_map

    def __init__(self, ttt=None, ttt_code=None, base_model_name_or_path=None, **kwargs):
        # Only where configs are not dataclasses (transformers 5.0): there nothing calls __post_init__. Newer
        # releases generate an __init__ on each config class, which runs instead of this one.
        super().__init__(**kwargs)
        self.ttt, self.base_model_name_or_path = ttt, base_model_name_or_path
        self._check_ttt()

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._check_ttt()

    def _check_ttt(self):
        ttt = TTTConfig.from_dict(self.ttt or {})
        ttt.layers = ttt.validate(self.num_hidden_layers).resolved_layers(self.num_hidden_layers)
        self.ttt = ttt.to_dict()
        # So that exports load with trust_remote_code through AutoConfig, AutoModel and AutoModelForCausalLM.
        model, causal_lm = self.ttt_classes
        defaults = {
            "AutoConfig": f"configuration_ttt.{type(self).__name__}",
            "AutoModel": f"modeling_ttt.{model}",
            "AutoModelForCausalLM": f"modeling_ttt.{causal_lm}",
        }
        self.auto_map = {**defaults, **(getattr(self, "auto_map", None) or {})}
        # What the code that reads this config was tested with (an export's code and config travel together).
        self.ttt_code = {"transformers_tested": list(TESTED_TRANSFORMERS)}

    @property
    def ttt_config(self) -> TTTConfig:
        return TTTConfig.from_dict(self.ttt)


def ttt_config_class(stock, model: str, causal_lm: str) -> type:
    """`TTT<stock name>`: the `stock` config plus `ttt`, with model_type `ttt_<stock model_type>` (a unique one, so
    that a stock class never silently loads a TTT export); `model` / `causal_lm` name its modeling_ttt classes."""
    name = f"TTT{stock.__name__}"
    fields_ = {"ttt": dict | None, "ttt_code": dict | None, "base_model_name_or_path": str | None}
    namespace = {
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"A `{stock.__name__}` with In-Place TTT settings in `ttt` (see `TTTConfig`).",
        "__annotations__": fields_,
        **dict.fromkeys(fields_),
        "model_type": f"ttt_{stock.model_type}",
        "ttt_classes": (model, causal_lm),
    }
    return type(name, (TTTConfigMixin, stock), namespace)


# One config per family (modeling_ttt.py pairs each with the stock model classes its TTT classes subclass).
TTTQwen3Config = ttt_config_class(Qwen3Config, "TTTQwen3Model", "TTTQwen3ForCausalLM")
TTTQwen2Config = ttt_config_class(Qwen2Config, "TTTQwen2Model", "TTTQwen2ForCausalLM")
TTTLlamaConfig = ttt_config_class(LlamaConfig, "TTTLlamaModel", "TTTLlamaForCausalLM")
TTTMistralConfig = ttt_config_class(MistralConfig, "TTTMistralModel", "TTTMistralForCausalLM")
TTTGemma3TextConfig = ttt_config_class(Gemma3TextConfig, "TTTGemma3TextModel", "TTTGemma3ForCausalLM")

__all__ = [
    "TTTConfig", "TTTQwen3Config", "TTTQwen2Config", "TTTLlamaConfig", "TTTMistralConfig", "TTTGemma3TextConfig",
    "TESTED_TRANSFORMERS", "check_transformers",
]
