"""Continued training of an In-Place TTT model: the Accelerate loop, in one page.

`train(recipe)` reads top to bottom: set-up (`set_up`: check the run before any work, build the model of
`ttt_adapt.model_setup`, pack the corpus with `ttt_adapt.data`, resume from the latest checkpoint in
`train.output_dir`), then per step `train_step` (AdamW with warmup + cosine, gradient accumulation, clipping),
logging to `metrics.jsonl` (and trackers), eval loss and checkpoints (`ttt_adapt.checkpoints`), and `finish`:
the recipe's `eval` section (`ttt_adapt.eval`) and the export (`ttt_adapt.export`).

The loss of a step is the mean over every real token of the global batch (all processes, all accumulation
micro-batches): each micro-batch contributes `sum of its token losses / global token count`, times the number
of processes because DDP/FSDP average gradients over all of them (with context parallelism each rank of a
group holds part of the same rows, so its share of the loss is summed, not averaged, across the group).

Data order is a pure function of `train.seed`, the number of packed rows and a row cursor stored in each
checkpoint, so a resumed run reads exactly the rows the uninterrupted run would have read.

A run stops early, cleanly, in two ways (`ttt_adapt.stopping`): a step whose loss or gradient norm is not
finite on any process updates nothing and raises `Diverged` (`train.on_nonfinite: stop`) or is skipped
(`skip`); a stop signal (`train.preempt_signals`) lets the step in flight finish, checkpoints it and raises
`Preempted`. One reduction per step makes every process agree on both.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType
from datasets.exceptions import DatasetGenerationError
from tqdm.auto import tqdm
from transformers import AutoConfig

from ttt_adapt.attention import use_packed_attention
from ttt_adapt.checkpoints import latest_checkpoint, load_checkpoint, load_checkpoint_model, save_checkpoint
from ttt_adapt.compat import enable_activation_checkpointing
from ttt_adapt.config import Recipe, RecipeError
from ttt_adapt.data import IGNORE_INDEX, build_datasets
from ttt_adapt.export import export_model
from ttt_adapt.metrics import MetricsFile, flat
from ttt_adapt.model_setup import (
    CONVERTED_MODEL_TYPES,
    SUPPORTED_MODEL_TYPES,
    build_model,
    is_ttt_param,
    load_tokenizer,
)
from ttt_adapt.modeling.modeling_ttt import set_ttt_training_step, ttt_learning_rates
from ttt_adapt.parallel import ContextParallel, loss_sum, prepare_model
from ttt_adapt.sharding import (
    check_fsdp_run,
    clip_grad_norm,
    fsdp_mesh,
    fsdp_request,
    gradient_sync,
    is_sharded,
    shard_model,
)
from ttt_adapt.stopping import Diverged, Preempted, StopSignals

ADAM_BETAS = (0.9, 0.95)  # the usual choice for LM pretraining; torch's default 0.999 adapts too slowly
NONFINITE_NAMES = {"loss": "the loss", "grad_norm": "the gradient norm"}


# ------------------------------------------------------------------------------------------------ checks


def check_run(recipe: Recipe):
    """Everything that can be checked before work starts; raise RecipeError (one line). Returns the base config."""
    name = recipe.model.name_or_path
    try:
        config = AutoConfig.from_pretrained(name)
    except Exception as e:  # OSError, ValueError, hub errors: all mean "not a loadable model" here
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RecipeError(f"model.name_or_path: cannot load a model config from {name!r}: {reason}") from None
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES + CONVERTED_MODEL_TYPES:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        what = f"a multimodal {model_type!r} model" if text is not config else f"a {model_type!r} model"
        raise RecipeError(
            f"model.name_or_path: {name!r} is {what}; In-Place TTT converts text-only causal LMs with a gated MLP "
            f"of model_type {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    num_layers = config.num_hidden_layers
    if model_type in CONVERTED_MODEL_TYPES:
        _check_same_ttt(recipe, config)
    else:
        try:
            recipe.ttt.validate(num_layers)
        except ValueError as e:
            raise RecipeError(f"ttt.layers: {e} ({name})" if "layer" in str(e) else f"ttt: {e}") from None
    if recipe.eval is not None:  # the eval section's keys, corpus and lengths (EvalError is a RecipeError)
        from ttt_adapt.eval import settings_from_recipe

        settings_from_recipe(recipe, config)
    cp_size = recipe.parallel.cp_size
    if cp_size > 1 and recipe.data.seq_len % (cp_size * recipe.ttt.chunk_size):
        unit = cp_size * recipe.ttt.chunk_size
        raise RecipeError(
            f"data.seq_len: {recipe.data.seq_len} tokens cannot be cut into {cp_size} shards of whole "
            f"{recipe.ttt.chunk_size}-token chunks; use a multiple of {unit} (e.g. {max(unit, recipe.data.seq_len // unit * unit)})"
        )
    if recipe.train.trackers:
        from accelerate.tracking import get_available_trackers

        available = {str(t) for t in get_available_trackers()}
        for tracker in recipe.train.trackers:
            if tracker not in available:
                raise RecipeError(f"train.trackers: {tracker} is not installed (pip install {tracker})")
    latest = latest_checkpoint(recipe.train.output_dir)
    if latest is not None and not recipe.train.resume:
        raise RecipeError(
            f"train.output_dir: {recipe.train.output_dir} already holds a run (latest {latest.name}); "
            "set train.resume=true to continue it, or choose another train.output_dir"
        )
    try:
        tokenizer = load_tokenizer(recipe)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RecipeError(f"model.name_or_path: cannot load a tokenizer from {name!r}: {reason}") from None
    # transformers builds a tokenizer of special tokens only (one for Qwen, five for Gemma) for a folder without
    # tokenizer files
    if len(tokenizer) < 2 or len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise RecipeError(f"model.name_or_path: {name!r} holds no tokenizer (save one next to the weights)")
    if len(tokenizer) > config.vocab_size:
        raise RecipeError(
            f"model.name_or_path: the tokenizer of {name!r} has {len(tokenizer)} tokens, "
            f"more than the model's vocab_size {config.vocab_size}"
        )
    return config


def _check_same_ttt(recipe: Recipe, config):
    """A base that is already a TTT model keeps its TTT layout: the recipe's `ttt` section must describe it."""
    have = dict(config.ttt)
    try:
        want = dict(recipe.ttt.to_dict(), layers=recipe.ttt.resolved_layers(config.num_hidden_layers))
    except ValueError as e:
        raise RecipeError(f"ttt.layers: {e} ({recipe.model.name_or_path})") from None
    for key, value in want.items():
        if key != "lr_init" and have.get(key) != value:  # lr_init only matters for fresh TTT parameters
            raise RecipeError(
                f"ttt.{key}: {recipe.model.name_or_path} is already a TTT model with {key}={have.get(key)!r}; "
                f"the recipe says {value!r}"
            )


# ------------------------------------------------------------------------------------------------ optimizer


def param_groups(model, recipe: Recipe) -> list[dict]:
    """AdamW groups: TTT vs the rest (separate learning rates), matrices decayed, vectors/scalars not."""
    t = recipe.train
    ttt_lr = t.ttt_lr if t.ttt_lr is not None else t.lr
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = "ttt" if is_ttt_param(name) else "base"
        decay = p.ndim >= 2
        key = (kind, decay)
        if key not in groups:
            lr = ttt_lr if kind == "ttt" else t.lr
            groups[key] = {"params": [], "lr": lr, "base_lr": lr, "weight_decay": t.weight_decay if decay else 0.0,
                           "name": f"{kind}{'' if decay else '_no_decay'}"}
        groups[key]["params"].append(p)
    return list(groups.values())


def lr_factor(step: int, recipe: Recipe) -> float:
    """Multiplier of the learning rates at optimizer step `step` (from 1): linear warmup to 1 over the warmup
    steps, then a cosine that would reach `min_lr_ratio` one step after `max_steps` (so no step is wasted at 0)."""
    t = recipe.train
    warmup = t.resolved_warmup_steps
    if step <= warmup:
        return step / warmup
    progress = min(1.0, (step - warmup - 1) / max(1, t.max_steps - warmup))
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------------ data


class RowStream:
    """The packed training rows in training order, from any row cursor.

    Map-style datasets: each pass over the rows is a permutation seeded by (seed, pass), so the rows of a
    step depend only on the cursor. Streaming datasets are read in their own (seeded) order and a resumed run
    skips the rows already consumed.
    """

    def __init__(self, dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.map_style = hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
        self.num_rows = len(dataset) if self.map_style else None
        self._perm = (None, None)  # (pass, permutation)
        self._iter = None
        self._cursor = 0

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perm = (epoch, torch.randperm(self.num_rows, generator=g))
        return self._perm[1]

    def take(self, cursor: int, count: int) -> list[dict]:
        """Rows `cursor .. cursor+count-1` of the training order."""
        if self.map_style:
            out = []
            for k in range(cursor, cursor + count):
                epoch, i = divmod(k, self.num_rows)
                out.append(self.dataset[int(self._permutation(epoch)[i])])
            return out
        if self._iter is None or cursor != self._cursor:
            self._iter, self._cursor = self._stream(), 0
            for _ in itertools.islice(self._iter, cursor):
                self._cursor += 1
        rows = list(itertools.islice(self._iter, count))
        self._cursor += len(rows)
        return rows

    def _stream(self):
        for epoch in itertools.count():
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            empty = True
            for row in self.dataset:
                empty = False
                yield row
            if empty:
                raise ValueError("the training data stream is empty")


def check_world(recipe: Recipe, num_processes: int):
    """The process count must split into data-parallel groups of `parallel.cp_size` ranks (RecipeError)."""
    cp_size = recipe.parallel.cp_size
    if num_processes % cp_size:
        raise RecipeError(
            f"parallel.cp_size: {cp_size} does not divide the {num_processes} process(es); launch a multiple of "
            f"{cp_size} (accelerate launch --multi_gpu --num_processes {cp_size} ...; --multi_gpu on CPU-only machines too)"
        )


def collate(rows: list[dict], device) -> dict:
    """Stack packed rows into tensors on `device`."""
    batch = {k: torch.tensor([list(r[k]) for r in rows], dtype=torch.long) for k in rows[0]}
    mask = batch["attention_mask"]
    # Attention masks are dropped (below) so packed documents stay apart; that is exact only if padding never
    # precedes a real token, as `ttt_adapt.data` guarantees (padding ends the last row).
    if bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise ValueError("a packed row has padding before real tokens; only trailing padding is supported")
    return {k: v.to(device) for k, v in batch.items()}


def count_targets(local) -> int:
    """Tokens with a label in a batch from `ContextParallel.shard` (labels already shifted)."""
    return int((local["labels"] != IGNORE_INDEX).sum())


@torch.no_grad()
def evaluate_loss(accelerator, model, eval_data: list[dict], recipe: Recipe, cp: ContextParallel) -> dict:
    """Mean token loss over the held-out rows `eval_data`, split across data-parallel groups (same rows on every
    run) and sharded across the ranks of each context-parallel group."""
    t = recipe.train
    world, rank = cp.dp_size, cp.dp_rank
    rows = eval_data
    if not rows:
        return {}
    # Every process runs the same number of forwards (FSDP gathers inside forward); rows beyond the real
    # ones are repeats that are not counted.
    per_rank = math.ceil(len(rows) / world)
    mine = [(rows[(rank + k * world) % len(rows)], rank + k * world < len(rows)) for k in range(per_rank)]
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for i in range(0, per_rank, t.batch_size):
        part = mine[i : i + t.batch_size]
        batch = collate([r for r, _ in part], accelerator.device)
        keep = torch.tensor([real for _, real in part], device=accelerator.device)
        batch["labels"] = torch.where(keep[:, None], batch["labels"], IGNORE_INDEX)
        local, shard = cp.shard(batch, recipe.ttt.chunk_size)
        total += torch.stack([loss_sum(model, local, shard).double(), torch.tensor(float(count_targets(local)))
                              .to(total)])
    model.train()
    total = accelerator.reduce(total, reduction="sum")
    return {"eval_loss": float(total[0] / total[1].clamp(min=1)), "eval_tokens": int(total[1])}


# ------------------------------------------------------------------------------------------------ export


def evaluate_after_training(accelerator, model, recipe: Recipe, exported: Path | None = None,
                            checkpoint: Path | None = None) -> Path | None:
    """Run the recipe's `eval` section (`ttt_adapt.eval.evaluate_recipe`: base, converted base, adapted) on
    the main process, into `<train.output_dir>/eval/`. The adapted model is the one in memory; for a model
    sharded across processes, the one in the final `checkpoint` (loaded whole on the main process), or the export
    folder `exported` when given (DeepSpeed). None without `eval`."""
    if recipe.eval is None:
        return None
    from ttt_adapt.eval import evaluate_recipe

    if accelerator.is_main_process:
        if exported is not None:
            adapted = exported
        elif is_sharded(model):
            adapted = load_checkpoint_model(checkpoint, recipe)
        else:
            adapted = accelerator.unwrap_model(model)
        evaluate_recipe(recipe, adapted)
    accelerator.wait_for_everyone()
    return Path(recipe.train.output_dir) / "eval"


def export_after_training(accelerator, recipe: Recipe, checkpoint: Path) -> Path | None:
    """Write the final checkpoint's model to `export.dir` with `ttt_adapt.export.export_model` (LoRA merged,
    model card, optional push), on the main process; None when the recipe asks for no export."""
    e = recipe.export
    if e.dir is None:
        return None
    if accelerator.is_main_process:
        export_model(
            checkpoint, e.dir, dtype=e.dtype, max_shard_size=e.max_shard_size, push_to_hub=e.push_to_hub,
            private=e.private, revision=e.revision, overwrite=e.overwrite, commit_message=e.commit_message,
            license=e.license,
        )
    accelerator.wait_for_everyone()
    return Path(e.dir)


# ------------------------------------------------------------------------------------------------ set-up


@dataclass
class Run:
    """What the loop works with, built by `set_up`. `state` is saved in every checkpoint."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    cp: ContextParallel
    stream: RowStream
    eval_data: list | None
    state: dict  # step, tokens, rows (the data cursor), num_rows, nonfinite_in_a_row
    checkpoint: Path | None  # the newest checkpoint: resumed from or written
    metrics: MetricsFile


def set_up(recipe: Recipe) -> Run:
    """The accelerator, the run checks, the model and optimizer, the data, and the state of the checkpoint
    being resumed (the latest one in `train.output_dir`, if any)."""
    t = recipe.train
    cpu = not torch.accelerator.is_available()  # also makes multi-process CPU runs use gloo
    mixed_precision = "no" if cpu else t.mixed_precision  # CPU autocast is slow and gains nothing: fp32 on CPU
    accelerator = Accelerator(
        cpu=cpu, mixed_precision=mixed_precision, log_with=t.trackers or None, project_dir=t.output_dir
    )
    check_run(recipe)
    check_world(recipe, accelerator.num_processes)
    fsdp = fsdp_request(recipe)
    if fsdp is not None:
        check_fsdp_run(fsdp, mixed_precision)
    if mixed_precision != t.mixed_precision:
        accelerator.print(f"train.mixed_precision={t.mixed_precision} needs a GPU: training in fp32 on CPU")
    out = Path(t.output_dir)
    checkpoint = latest_checkpoint(out)

    tokenizer = load_tokenizer(recipe)
    model = build_model(recipe)
    cp = ContextParallel(recipe.parallel.cp_size, accelerator.device.type)
    if cp.enabled:
        prepare_model(model)
        if recipe.model.attn_implementation not in (None, "sdpa"):
            accelerator.print(f"parallel.cp_size={cp.cp_size}: attention runs as all-gather SDPA "
                              f"(model.attn_implementation={recipe.model.attn_implementation} is not used)")
    elif recipe.model.attn_implementation in (None, "sdpa", "eager"):  # flash/flex isolate documents themselves
        use_packed_attention(model)  # packed rows without the dense L x L mask transformers builds for these
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    if fsdp is not None:  # sharded before the optimizer exists: it must hold the sharded parameters
        if fsdp.activation_checkpointing and not t.gradient_checkpointing:
            enable_activation_checkpointing(model)
        shard_model(model, fsdp_mesh(accelerator.device.type), mixed_precision, fsdp.reshard_after_forward)
    fused = accelerator.device.type in ("cpu", "cuda")  # torch's one-kernel AdamW where it has one
    optimizer = torch.optim.AdamW(param_groups(model, recipe), betas=ADAM_BETAS, eps=1e-8, fused=fused)
    stream, eval_data = load_data(accelerator, recipe, tokenizer)
    if fsdp is None:  # a sharded model is not handed to Accelerate, which would wrap it again (DDP on CPU)
        model, optimizer = accelerator.prepare(model, optimizer)

    state = {"step": 0, "tokens": 0, "rows": 0, "num_rows": stream.num_rows, "nonfinite_in_a_row": 0}
    if checkpoint is not None:
        state.update(load_checkpoint(accelerator, checkpoint, model, optimizer))
        if state["num_rows"] != stream.num_rows:
            accelerator.print(f"warning: the data changed since {checkpoint.name}: the data order differs")
            state["num_rows"] = stream.num_rows
        accelerator.print(f"resuming from {checkpoint} (step {state['step']})")

    metrics = MetricsFile(accelerator, out)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    metrics.truncate(after_step=state["step"])  # drop the lines of steps being redone
    if t.trackers:
        accelerator.init_trackers(out.name, config=flat(recipe.to_dict()))
    accelerator.print(
        f"training {n_trainable:,} of {n_total:,} parameters ({t.trainable}"
        f"{f' + LoRA r={t.lora.r}' if t.lora.r else ''}) on {accelerator.num_processes} process(es)"
        f"{f' ({cp.dp_size} data-parallel x {cp.cp_size} context-parallel)' if cp.enabled else ''}"
        f"{f', weights sharded over all {accelerator.num_processes} (FSDP2, {fsdp.source})' if fsdp else ''}"
    )
    if state["step"] >= t.max_steps:
        accelerator.print(f"nothing to train: {checkpoint.name} is at step {state['step']} >= train.max_steps")
    return Run(accelerator, model, optimizer, cp, stream, eval_data, state, checkpoint, metrics)


def load_data(accelerator, recipe: Recipe, tokenizer) -> tuple[RowStream, list | None]:
    """The training rows in training order and the first held-out rows (None without eval data)."""
    t = recipe.train
    with accelerator.main_process_first():
        try:
            train_rows, eval_rows = build_datasets(recipe.data, tokenizer)
        except ValueError as e:
            message = str(e).strip().splitlines()[0].replace("DataConfig.", "data.")
            raise RecipeError(message if message.startswith("data") else f"data: {message}") from None
        except DatasetGenerationError as e:  # a malformed file: the reason is in the cause
            reason = str(e.__cause__ or e).strip().splitlines()[0]
            files = recipe.data.path + (f" or {recipe.data.eval_path}" if recipe.data.eval_path else "")
            raise RecipeError(f"data: cannot read {files}: {reason}") from None
    eval_data = None
    if eval_rows is not None:
        cap = t.eval_batches * t.batch_size  # independent of the number of processes
        eval_data = [eval_rows[i] for i in range(min(cap, len(eval_rows)))] if hasattr(eval_rows, "__len__") \
            else list(itertools.islice(iter(eval_rows), cap))
    return RowStream(train_rows, t.seed), eval_data


# ------------------------------------------------------------------------------------------------ the step


@dataclass
class StepResult:
    """What one step did, agreed by every process."""

    loss: float  # mean token loss of the global batch
    grad_norm: float
    targets: float  # tokens with a label, global
    tokens: int  # real tokens, global
    seconds: float
    nonfinite: list[str]  # "loss", "grad_norm": not finite, so the update was dropped
    stop: bool  # a stop signal reached some process: all stop after this step


def train_step(run: Run, recipe: Recipe, step: int, signals: StopSignals) -> StepResult:
    """Optimizer step `step` on the next rows: forward and backward over the micro-batches, clipping, and the
    update unless the loss or the gradient norm is not finite. One reduction gives every process the loss,
    whether anything was non-finite anywhere and whether a stop signal arrived anywhere (up to that point of
    the step), so all act alike."""
    t, accelerator, model, optimizer, cp = recipe.train, run.accelerator, run.model, run.optimizer, run.cp
    started = time.perf_counter()
    factor = lr_factor(step, recipe)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    set_ttt_training_step(accelerator.unwrap_model(model), step)

    rows = run.stream.take(run.state["rows"], rows_per_step(recipe, cp))[cp.dp_rank :: cp.dp_size]
    micro = [cp.shard(collate(rows[i : i + t.batch_size], accelerator.device), recipe.ttt.chunk_size)
             for i in range(0, len(rows), t.batch_size)]
    counts = [sum(count_targets(b) for b, _ in micro), sum(int(b["attention_mask"].sum()) for b, _ in micro)]
    counts = torch.tensor(counts, dtype=torch.float64, device=accelerator.device)
    targets, tokens = accelerator.reduce(counts, reduction="sum").tolist()
    scale = accelerator.num_processes / max(targets, 1.0)  # DDP/FSDP average gradients over processes: undo that

    step_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for i, (local, shard) in enumerate(micro):
        last = i == len(micro) - 1  # gradients are all-reduced once, on the last micro-batch
        if is_sharded(model):
            sync = gradient_sync(model, last)
        else:
            sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
        with sync:
            summed = loss_sum(model, local, shard)
            accelerator.backward(summed * scale)
        step_loss += summed.detach().double()
    clip = t.clip_grad_norm if t.clip_grad_norm is not None else float("inf")
    if is_sharded(model):  # the global norm over every shard
        grad_norm = clip_grad_norm(model, clip)
    else:
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), clip))

    # fp16's gradient scaler skips steps with inf gradients itself (and lowers its scale): not a divergence
    bad_grad = not math.isfinite(grad_norm) and accelerator.scaler is None
    stop = signals.received is not None
    flags = torch.stack([step_loss, step_loss.new_tensor(float(bad_grad)), step_loss.new_tensor(float(stop))])
    summed_loss, bad_grads, stops = accelerator.reduce(flags, reduction="sum").tolist()
    loss = summed_loss / max(targets, 1.0)
    nonfinite = (["loss"] if not math.isfinite(loss) else []) + (["grad_norm"] if bad_grads else [])
    if not nonfinite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, grad_norm, targets, int(tokens), time.perf_counter() - started, nonfinite, stops > 0)


def rows_per_step(recipe: Recipe, cp: ContextParallel) -> int:
    return recipe.train.batch_size * recipe.train.grad_accum * cp.dp_size  # the ranks of a CP group share rows


def on_nonfinite(run: Run, recipe: Recipe, step: int, result: StepResult, window: Window, history: list):
    """Step `step` had a non-finite loss or gradient norm and updated nothing: log it, then raise `Diverged`
    unless `train.on_nonfinite: skip` allows one more skipped step in a row."""
    t = recipe.train
    run.state["nonfinite_in_a_row"] += 1
    in_a_row = run.state["nonfinite_in_a_row"]
    what = " and ".join(f"{NONFINITE_NAMES[k]} ({getattr(result, k)})" for k in result.nonfinite)
    what += " is not finite" if len(result.nonfinite) == 1 else " are not finite"
    stop = t.on_nonfinite == "stop" or in_a_row > t.max_nonfinite_skips
    if stop:
        log_progress(run, recipe, window, history)  # the steps before it, if not logged yet
    run.metrics.write({"step": step, "loss": result.loss, "grad_norm": result.grad_norm,
                       "skipped": not stop, "diverged": stop})
    if stop:
        if t.on_nonfinite == "skip":
            what += f" ({in_a_row} steps in a row, train.max_nonfinite_skips={t.max_nonfinite_skips})"
        raise Diverged(step, what, run.checkpoint)
    run.accelerator.print(f"step {step}: {what}; its update is skipped ({in_a_row} in a row)")


# ------------------------------------------------------------------------------------------------ logging


class Window:
    """Sums over the steps since the last progress line; skipped steps count for time and tokens only."""

    def __init__(self):
        self.updates, self.loss, self.targets, self.tokens, self.seconds, self.grad_norm = 0, 0.0, 0.0, 0.0, 0.0, None

    def add(self, result: StepResult):
        self.tokens += result.tokens
        self.seconds += result.seconds
        if not result.nonfinite:
            self.updates += 1
            self.loss += result.loss * result.targets
            self.targets += result.targets
            self.grad_norm = result.grad_norm

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def log_progress(run: Run, recipe: Recipe, window: Window, history: list) -> Window:
    """Write the progress line of the window's steps (at the current step) unless none of them updated the
    model; return a fresh window."""
    if window.updates:
        t, step = recipe.train, run.state["step"]
        factor = lr_factor(step, recipe)
        record = {
            "step": step,
            "loss": window.loss / max(window.targets, 1.0),
            "lr": t.lr * factor,
            "ttt_param_lr": (t.ttt_lr if t.ttt_lr is not None else t.lr) * factor,
            "tokens": run.state["tokens"],
            "tokens_per_s": window.tokens_per_s,
            "grad_norm": window.grad_norm,
            "ttt_learning_rates": {
                str(k): v for k, v in ttt_learning_rates(run.accelerator.unwrap_model(run.model)).items()
            },
        }
        run.metrics.write(record)
        history.append(record)
    return Window()


# ------------------------------------------------------------------------------------------------ the loop


def train(recipe: Recipe) -> dict:
    """Run (or resume) the recipe's training and export; return a summary (steps, tokens, progress lines).

    Raises `RecipeError` for bad input (before any work), `Diverged` when the run diverges (nothing non-finite
    is saved) and `Preempted` after a stop signal (the step in flight is finished and checkpointed first).
    """
    t = recipe.train
    run = set_up(recipe)
    state, window, history = run.state, Window(), []
    try:
        with StopSignals(t.preempt_signals) as signals, tqdm(
            total=t.max_steps, initial=state["step"], disable=not run.accelerator.is_main_process, desc="adapt",
            dynamic_ncols=True,
        ) as bar:
            run.model.train()
            while state["step"] < t.max_steps:
                step = state["step"] + 1
                result = train_step(run, recipe, step, signals)
                if result.nonfinite:
                    on_nonfinite(run, recipe, step, result, window, history)
                else:
                    state["nonfinite_in_a_row"] = 0
                window.add(result)
                state.update(step=step, tokens=state["tokens"] + result.tokens,
                             rows=state["rows"] + rows_per_step(recipe, run.cp))
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{window.tokens_per_s:,.0f}")

                if step % t.log_every == 0 or step == t.max_steps or result.stop:
                    window = log_progress(run, recipe, window, history)
                if run.eval_data and not result.stop and (
                    (t.eval_every and step % t.eval_every == 0) or step == t.max_steps
                ):
                    run.metrics.write({"step": step, **evaluate_loss(run.accelerator, run.model, run.eval_data,
                                                                     recipe, run.cp)})
                if (t.save_every and step % t.save_every == 0) or step == t.max_steps or result.stop:
                    run.checkpoint = save_checkpoint(run.accelerator, run.model, run.optimizer, recipe, state)
                if result.stop:
                    raise Preempted(step, signals.received or "a stop signal to another process", run.checkpoint)
        return finish(run, recipe, history)
    finally:
        if t.trackers:
            run.accelerator.end_training()


def finish(run: Run, recipe: Recipe, history: list) -> dict:
    """Evaluate, export, and summarise the run.

    Evaluation comes first, so the export's model card shows the report. A model sharded by FSDP is evaluated
    as saved in the final checkpoint; one sharded by DeepSpeed from its export (re-export to add the table)."""
    accelerator = run.accelerator
    sharded = accelerator.distributed_type == DistributedType.DEEPSPEED
    report = None if sharded else evaluate_after_training(accelerator, run.model, recipe, checkpoint=run.checkpoint)
    exported = export_after_training(accelerator, recipe, run.checkpoint)
    if exported is not None:
        accelerator.print(f"exported to {exported}")
    if sharded and exported is not None:
        report = evaluate_after_training(accelerator, run.model, recipe, exported)
    elif sharded and recipe.eval is not None:
        accelerator.print("eval skipped: a sharded model is evaluated from its export; set export.dir")
    return {"step": run.state["step"], "tokens": run.state["tokens"], "checkpoint": str(run.checkpoint),
            "export": None if exported is None else str(exported), "eval": None if report is None else str(report),
            "metrics": history}


__all__ = ["train", "check_run", "train_step", "evaluate_after_training", "export_after_training"]
