"""The recipe: one YAML file that says what to convert, how to train it and where to export it.

A recipe has the sections `model`, `ttt` (the `TTTConfig` fields), `data` (the `DataConfig` fields), `train`,
`parallel`, `export` and an optional `eval` (the `EvalSettings` fields), each a typed dataclass, here with its value
checks. `load_recipe(path, overrides)` (`ttt_adapt.recipe.loading`) reads it, applies dotted `key=value` overrides (values parsed as YAML:
`ttt.layers=[0,2]`, `train.lr=1e-4`) and checks every key, type and range, in one style: anything wrong raises
`RecipeError` (`EvalError` in the eval section), whose message is one line `section.key: what is wrong`.
The schema reads no files: whether the model folder, the data files, the eval corpus and the run and export
folders are what the recipe says is checked with the base model and the launch (`ttt_adapt.training.preflight`).

Relative paths in a recipe (model folder, data files, output and export folders) are relative to the current
working directory, like any path typed on the command line: run the shipped recipes from the repository root.
"""

from __future__ import annotations

import dataclasses
import re
import signal
from dataclasses import dataclass, field

from ttt_adapt._util import DTYPES, RecipeError, parse_size
from ttt_adapt.data.text import FORMATS, ON_BAD_ROW, DataConfig
from ttt_adapt.modeling.configuration_ttt import LR_MODES, NORM_GUARDS, TARGETS, WRITE_RULES, TTTConfig
from ttt_adapt.recipe.typed import build_dataclass

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")
TRAINABLE = ("ttt", "instruct", "full")  # instruct: TTT parameters + the TTT layers' down_proj
MIXED_PRECISION = ("no", "bf16", "fp16")
ON_NONFINITE = ("stop", "skip")
ON_SPIKE = ("stop", "skip", "warn")
EXPORT_CHECKPOINTS = ("last", "best")  # export.checkpoint: the final one, or the lowest eval loss
UNCATCHABLE_SIGNALS = ("SIGKILL", "SIGSTOP")
TRACKERS = ("tensorboard", "wandb", "comet_ml", "aim", "mlflow", "clearml", "dvclive", "swanlab", "trackio")
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# The string keys that take one of a fixed set of words: a bare word YAML reads as a boolean (`no`, `off`) is read
# back as the word (`ttt_adapt.recipe.typed.yaml_word`).
CHOICES = {
    "model.dtype": DTYPES, "model.attn_implementation": ATTN_IMPLEMENTATIONS, "ttt.lr_mode": LR_MODES,
    "ttt.target": TARGETS, "ttt.state_norm_guard": NORM_GUARDS, "ttt.write_rule": WRITE_RULES, "data.format": FORMATS, "data.on_bad_row": ON_BAD_ROW,
    "data.mix.format": FORMATS, "train.trainable": TRAINABLE, "train.mixed_precision": MIXED_PRECISION,
    "train.trackers": TRACKERS, "train.on_nonfinite": ON_NONFINITE, "train.on_spike": ON_SPIKE,
    "export.checkpoint": EXPORT_CHECKPOINTS, "export.dtype": DTYPES,
}


class EvalError(RecipeError):
    """Bad evaluation input (settings, missing model or corpus, empty corpus, lengths beyond the model); one line."""


def _fail(key: str, message: str, error: type[RecipeError] = RecipeError):
    raise error(f"{key}: {message}")


def _check_int(key: str, value, minimum: int, error: type[RecipeError] = RecipeError):
    if value < minimum:
        _fail(key, f"must be >= {minimum}, got {value}", error)


def _check_choice(key: str, value, choices, error: type[RecipeError] = RecipeError):
    if value not in choices:
        _fail(key, f"must be one of {', '.join(map(str, choices))}; got {value!r}", error)


@dataclass
class ModelConfig:
    """The base checkpoint: `name_or_path` (a hub id such as `Qwen/Qwen3-4B-Base`, or a local folder of a family
    `convert` takes), the `dtype` it is loaded and trained in (keep float32 master weights and set
    `train.mixed_precision` for bf16 compute) and the transformers `attn_implementation` (null: transformers picks)."""

    name_or_path: str
    dtype: str = "float32"
    attn_implementation: str | None = None

    def validate(self):
        if not self.name_or_path.strip():
            _fail("model.name_or_path", "is empty")
        _check_choice("model.dtype", self.dtype, DTYPES)
        if self.attn_implementation is not None:
            _check_choice("model.attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)


@dataclass
class LoraSettings:
    """LoRA on the non-TTT weights (peft); `r: 0` turns it off. The TTT modules are trained in full alongside."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    def validate(self):
        _check_int("train.lora.r", self.r, 0)
        if self.r > 0:
            if not self.alpha > 0:
                _fail("train.lora.alpha", f"must be > 0, got {self.alpha}")
            if not 0 <= self.dropout < 1:
                _fail("train.lora.dropout", f"must be in [0, 1), got {self.dropout}")
            if not self.target_modules:
                _fail("train.lora.target_modules", "is empty: name at least one module (e.g. q_proj)")
            inside_ttt = sorted({"ttt", "conv", "target_proj", "lr_gate"} & set(self.target_modules))
            if inside_ttt:
                _fail("train.lora.target_modules", f"{inside_ttt} are TTT modules, which train in full: remove them")


@dataclass
class TrainConfig:
    """The optimisation: schedule, trained parameters, checkpoints, evaluation, divergence and preemption.

    `trainable`: `ttt` (the TTT parameters only), `instruct` (those and the `down_proj` of the TTT layers: for chat
    models) or `full` (every weight); LoRA (`lora.r > 0`) adds adapters to `ttt`.
    Steps count optimizer updates, from 1; one step sees `batch_size * grad_accum * data-parallel processes`
    packed rows. What each key does: the recipe reference in docs/training.md, which lists every key of every
    section (tests/test_docs.py keeps it complete).
    """

    output_dir: str
    max_steps: int
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    ttt_lr: float | None = None
    weight_decay: float = 0.1
    warmup_steps: int | None = None
    warmup_ratio: float | None = None
    min_lr_ratio: float = 0.0
    clip_grad_norm: float | None = 1.0
    trainable: str = "ttt"
    lora: LoraSettings = field(default_factory=LoraSettings)
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    compile: bool = False
    save_every: int = 0
    keep_last: int = 2
    keep_best: bool | None = None
    resume: bool = True
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 8
    seed: int = 0
    trackers: list[str] = field(default_factory=list)
    on_nonfinite: str = "stop"
    max_nonfinite_skips: int = 10
    on_spike: str = "stop"
    spike_factor: float = 2.0
    spike_window: int = 20
    spike_warmup: int = 2
    max_spike_skips: int = 10
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT"])

    def validate(self):
        if not self.output_dir.strip():
            _fail("train.output_dir", "is empty")
        for key in ("max_steps", "batch_size", "grad_accum", "keep_last", "log_every", "eval_batches"):
            _check_int(f"train.{key}", getattr(self, key), 1)
        for key in ("save_every", "eval_every", "seed"):
            _check_int(f"train.{key}", getattr(self, key), 0)
        for key in ("lr", "ttt_lr"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                _fail(f"train.{key}", f"must be > 0, got {value}")
        if self.weight_decay < 0:
            _fail("train.weight_decay", f"must be >= 0, got {self.weight_decay}")
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            _fail("train.warmup_steps", "set either warmup_steps or warmup_ratio, not both")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.max_steps:
            _fail("train.warmup_steps", f"must be in [0, max_steps={self.max_steps}], got {self.warmup_steps}")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio <= 1:
            _fail("train.warmup_ratio", f"must be in [0, 1], got {self.warmup_ratio}")
        if not 0 <= self.min_lr_ratio <= 1:
            _fail("train.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            _fail("train.clip_grad_norm", f"must be > 0 or null (no clipping), got {self.clip_grad_norm}")
        _check_choice("train.trainable", self.trainable, TRAINABLE)
        _check_choice("train.mixed_precision", self.mixed_precision, MIXED_PRECISION)
        self.lora.validate()
        if self.lora.r > 0 and self.trainable != "ttt":
            _fail("train.lora.r", f"LoRA needs train.trainable: ttt (trainable: {self.trainable} already trains "
                  "weights LoRA would adapt)")
        for name in self.trackers:
            _check_choice("train.trackers", name, TRACKERS)
        if len(set(self.trackers)) != len(self.trackers):
            _fail("train.trackers", f"lists a tracker twice: {self.trackers}")
        _check_choice("train.on_nonfinite", self.on_nonfinite, ON_NONFINITE)
        _check_int("train.max_nonfinite_skips", self.max_nonfinite_skips, 1)
        _check_choice("train.on_spike", self.on_spike, ON_SPIKE)
        if not self.spike_factor > 1:
            _fail("train.spike_factor", f"must be > 1, got {self.spike_factor}")
        for key in ("spike_window", "spike_warmup", "max_spike_skips"):
            _check_int(f"train.{key}", getattr(self, key), 1)
        if self.spike_warmup > self.spike_window:
            _fail("train.spike_warmup", f"must be <= train.spike_window={self.spike_window}, got {self.spike_warmup}")
        for name in self.preempt_signals:
            if name not in signal.Signals.__members__ or name in UNCATCHABLE_SIGNALS:
                _fail("train.preempt_signals", f"{name!r} is not a signal a process can catch (e.g. SIGTERM, SIGINT, "
                      "SIGUSR1)")
        if len(set(self.preempt_signals)) != len(self.preempt_signals):
            _fail("train.preempt_signals", f"lists a signal twice: {self.preempt_signals}")

    @property
    def resolved_warmup_steps(self) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return round((self.warmup_ratio or 0.0) * self.max_steps)


@dataclass
class ParallelConfig:
    """Context parallelism: each sequence is split across `cp_size` ranks (1: off). `fsdp`: shard the weights,
    gradients and optimizer state over all processes (FSDP2; also asked for by `accelerate launch --use_fsdp`)."""

    cp_size: int = 1
    fsdp: bool = False

    def validate(self):
        _check_int("parallel.cp_size", self.cp_size, 1)


@dataclass
class ExportConfig:
    """The exported model written at the end of training (`dir: null` skips it; `ttt_adapt.export`). `checkpoint:
    best` exports the checkpoint with the lowest eval loss instead of the last; `push_to_hub` (ORG/NAME) uploads it
    to `revision` (null: main); `license` goes into the model card (null: the base model's)."""

    dir: str | None = None
    checkpoint: str = "last"
    dtype: str = "bfloat16"
    max_shard_size: str = "5GB"
    push_to_hub: str | None = None
    private: bool = False
    revision: str | None = None
    commit_message: str | None = None
    license: str | None = None
    overwrite: bool = False

    def validate(self):
        _check_choice("export.checkpoint", self.checkpoint, EXPORT_CHECKPOINTS)
        _check_choice("export.dtype", self.dtype, DTYPES)
        try:
            parse_size(self.max_shard_size)
        except ValueError:
            _fail("export.max_shard_size", f"must be a size such as 5GB or 500MB, got {self.max_shard_size!r}")
        if self.push_to_hub is not None:
            if self.dir is None:
                _fail("export.push_to_hub", "needs export.dir (the folder that is pushed)")
            if not HUB_REPO_ID.match(self.push_to_hub):
                _fail("export.push_to_hub", f"must be a hub repo id ORG/NAME, got {self.push_to_hub!r}")


TASKS = ("niah_single", "niah_multikey", "kv_retrieval", "variable_tracking")  # the synthetic long-context tasks


@dataclass
class EvalSettings:
    """What to evaluate (`ttt_adapt.eval`); the keys of a recipe's `eval` section.

    Args:
        corpus: held-out documents, a .jsonl (one JSON object per line, text in `text_field`) or a .txt file (one
            document); from a recipe, default `data.eval_path`.
        seq_len: tokens per document for the loss by position; from a recipe, default `data.seq_len`.
        bin_edges: position bin edges, from 0 up to `seq_len`; default powers of two from 64 (0, 64, 128, ..., seq_len).
        lengths: prompt lengths (tokens) of the synthetic tasks.
        tasks: which synthetic tasks (`TASKS`); empty for none.
        num_samples: prompts per task and length.
        max_docs: held-out documents used for the loss (the first ones of the file); null for all.
        batch_size: rows per forward / generate call.
        max_new_tokens: greedy tokens generated per prompt.
        seed: the synthetic tasks' seed (the same seed gives the same prompts).
        max_length: how far the long-context measurement reads its documents, in tokens (past `seq_len`, the
            training length); null: 8 x seq_len; 0: no long-context measurement.
        long_corpus: its documents: null for `corpus`, a .jsonl/.txt file, or "synthetic" (generated by
            `ttt_adapt.data.corpus` from `seed`, long enough to reach max_length).
        long_docs: how many documents (the longest) it reads.
        recall_file: a .jsonl of {"document", "question", "answer"} rows (facts a user wants recalled): each row is
            read as document + "\\n\\n" + question + " " + answer by the base and the adapted model, and its answer
            tokens' loss is binned by the distance back to the answer's last mention in the document
            (`ttt_adapt.eval.recall`); null: none.
    """

    corpus: str | None = None
    text_field: str = "text"
    seq_len: int = 1024
    bin_edges: list[int] | None = None
    lengths: list[int] = field(default_factory=lambda: [512, 1024])
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    num_samples: int = 8
    max_docs: int | None = 32
    batch_size: int = 8
    max_new_tokens: int = 8
    seed: int = 0
    max_length: int | None = None
    long_corpus: str | None = None
    long_docs: int = 8
    recall_file: str | None = None

    @classmethod
    def from_dict(cls, raw: dict, prefix: str = "eval") -> EvalSettings:
        """Build from a plain mapping (a recipe's `eval` section), checking keys, types and values; one-line
        EvalError naming `prefix.key`."""
        try:
            settings = build_dataclass(cls, raw, prefix)
        except EvalError:
            raise
        except RecipeError as e:  # the schema's own type errors, already "prefix.key: ...": the eval kind
            raise EvalError(str(e)) from None
        return settings.validate(prefix)

    def validate(self, prefix: str = "eval") -> EvalSettings:
        """Check values (not files or models); return self."""
        _check_int(f"{prefix}.seq_len", self.seq_len, 2, EvalError)
        for key in ("num_samples", "batch_size", "max_new_tokens"):
            _check_int(f"{prefix}.{key}", getattr(self, key), 1, EvalError)
        _check_int(f"{prefix}.seed", self.seed, 0, EvalError)
        _check_int(f"{prefix}.long_docs", self.long_docs, 1, EvalError)
        if self.max_length is not None and self.max_length != 0:
            _check_int(f"{prefix}.max_length", self.max_length, 1, EvalError)
            if self.max_length <= self.seq_len:
                _fail(f"{prefix}.max_length", f"must be longer than seq_len={self.seq_len} (the training length), or 0 "
                      f"for no long-context measurement, got {self.max_length}", EvalError)
        if self.max_docs is not None:
            _check_int(f"{prefix}.max_docs", self.max_docs, 1, EvalError)
        for length in self.lengths:
            _check_int(f"{prefix}.lengths", length, 16, EvalError)
        if len(set(self.lengths)) != len(self.lengths):
            _fail(f"{prefix}.lengths", f"repeats a length: {self.lengths}", EvalError)
        for task in self.tasks:
            if task not in TASKS:
                _fail(f"{prefix}.tasks", f"unknown task {task!r} (known: {', '.join(TASKS)})", EvalError)
        if self.tasks and not self.lengths:
            _fail(f"{prefix}.lengths", "is empty; name at least one length for the tasks", EvalError)
        edges = self.bin_edges
        if edges is not None and (len(edges) < 2 or edges[0] != 0 or edges[-1] != self.seq_len
                                  or any(a >= b for a, b in zip(edges, edges[1:]))):
            _fail(f"{prefix}.bin_edges", f"must be increasing integers from 0 to seq_len={self.seq_len}, got {edges}",
                  EvalError)
        return self

    @property
    def bins(self) -> list[int]:
        return self.bin_edges or position_bins(self.seq_len)

    @property
    def resolved_max_length(self) -> int:
        """Tokens the long-context measurement reads per document (0: none)."""
        return 8 * self.seq_len if self.max_length is None else self.max_length


def position_bins(seq_len: int, first: int = 64) -> list[int]:
    """Bin edges 0, first, 2*first, 4*first, ... up to `seq_len` (the last bin ends at `seq_len`)."""
    edges, edge = [0], first
    while edge < seq_len:
        edges.append(edge)
        edge *= 2
    return edges + [seq_len]


@dataclass
class Recipe:
    """A whole recipe; `path` is the YAML file it came from."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    ttt: TTTConfig = field(default_factory=TTTConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalSettings | None = None
    path: str | None = None

    def eval_settings(self) -> EvalSettings:
        """The `eval` section; for a recipe without one, the settings it would default to (corpus
        `data.eval_path`, seq_len `data.seq_len`)."""
        if self.eval is not None:
            return self.eval
        return EvalSettings(corpus=self.data.eval_path, seq_len=self.data.seq_len).validate()

    def to_dict(self) -> dict:
        """The recipe as plain YAML-able data (without `path`)."""
        out = dataclasses.asdict(self)
        out.pop("path")
        if out["eval"] is None:
            out.pop("eval")
        return out


def validate_ttt(ttt: TTTConfig, section: str = "ttt"):
    """The `ttt` section's values (`TTTConfig`'s fields), checked in the recipe's style; layer indices against
    a model's depth are checked with the base config (`ttt_adapt.training.preflight`)."""
    if ttt.layers is not None:
        if not ttt.layers:
            _fail(f"{section}.layers", "is empty: name at least one layer, or null for every 6th layer")
        if any(i < 0 for i in ttt.layers):
            _fail(f"{section}.layers", f"layer indices must be >= 0, got {ttt.layers}")
        if len(set(ttt.layers)) != len(ttt.layers):
            _fail(f"{section}.layers", f"repeats a layer: {ttt.layers}")
    if ttt.chunk_size < 1:
        _fail(f"{section}.chunk_size", f"must be an integer >= 1, got {ttt.chunk_size}")
    if ttt.conv_kernel_size < 1 or ttt.conv_kernel_size % 2 == 0:
        _fail(f"{section}.conv_kernel_size", f"must be a positive odd integer (centred kernel), got {ttt.conv_kernel_size}")
    _check_choice(f"{section}.lr_mode", ttt.lr_mode, LR_MODES)
    _check_choice(f"{section}.target", ttt.target, TARGETS)
    if ttt.clip_update_norm is not None and not ttt.clip_update_norm > 0:
        _fail(f"{section}.clip_update_norm", f"must be > 0 or null, got {ttt.clip_update_norm}")
    _check_int(f"{section}.lr_warmup_steps", ttt.lr_warmup_steps, 0)
    _check_choice(f"{section}.state_norm_guard", ttt.state_norm_guard, NORM_GUARDS)
    if ttt.state_norm_limit is not None and not all(v > 0 for v in ttt.state_norm_limit):
        _fail(f"{section}.state_norm_limit", f"must be norms > 0 (one per TTT layer) or null, got {ttt.state_norm_limit}")
    if ttt.state_decay is not None and not 0 < ttt.state_decay <= 1:
        _fail(f"{section}.state_decay", f"must be in (0, 1] or null, got {ttt.state_decay}")
    _check_choice(f"{section}.write_rule", ttt.write_rule, WRITE_RULES)


__all__ = [
    "RecipeError", "EvalError", "Recipe", "EvalSettings", "position_bins", "validate_ttt", "ModelConfig",
    "LoraSettings", "TrainConfig", "ParallelConfig", "ExportConfig", "TTTConfig", "DataConfig", "CHOICES",
]
