"""Continued training of an In-Place TTT model: the Accelerate loop, in one page.

`set_up(recipe, accelerator, base)` builds the `Run` (the recipe, the model of `ttt_adapt.model_setup`, the
corpus packed by `ttt_adapt.data`, the `TrainState` resumed from the latest checkpoint in `train.output_dir`);
`train(run)` then runs the steps: `train_step` (AdamW with warmup + cosine, gradient accumulation, clipping),
progress lines to `metrics.jsonl` and trackers (`ttt_adapt.training.progress`), the eval loss and checkpoints
(`ttt_adapt.training.checkpoints`). `ttt_adapt.pipeline.adapt` runs the checks before it
(`ttt_adapt.training.preflight`) and the evaluation and export after it.

The loss of a step is the mean over every real token of the global batch (all processes, all accumulation
micro-batches): each micro-batch contributes `sum of its token losses / global token count`, times the number
of processes because DDP/FSDP average gradients over all of them (with context parallelism each rank of a
group holds part of the same rows, so its share of the loss is summed, not averaged, across the group).

The rows come from `ttt_adapt.training.rows` (their order is a pure function of `train.seed`, the number of packed
rows and a row cursor stored in each checkpoint, so a resumed run reads exactly the rows the uninterrupted run
would have read), the optimizer and its schedule from `ttt_adapt.training.optimizer`.

A run stops early, cleanly, in two ways (`ttt_adapt.training.stopping`): a step whose loss or gradient norm is
not finite on any process, or whose loss spikes above `train.spike_factor` times the median of the recent steps,
updates nothing and raises `Diverged` (`train.on_nonfinite` / `train.on_spike: stop`) or is skipped (`skip`), as
`ttt_adapt.training.divergence` decides; the checkpoint whose weights gave that loss is set aside
(`checkpoint-N.diverged`) and retention never deletes the newest checkpoint a good step has vouched for
(`TrainState.good_checkpoint`), so rerunning resumes from a good one; a stop signal (`train.preempt_signals`)
lets the step in flight finish, checkpoints it and raises `Preempted`. One reduction per step makes every
process agree on both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from datasets.exceptions import DatasetGenerationError
from tqdm.auto import tqdm

from ttt_adapt._util import RecipeError, first_line
from ttt_adapt.attention import use_packed_attention
from ttt_adapt.compat import enable_activation_checkpointing
from ttt_adapt.data.mix import build_datasets
from ttt_adapt.distributed.context_parallel import ContextParallel, prepare_model
from ttt_adapt.distributed.fsdp import build_sharded_model, clip_grad_norm, fsdp_mesh, gradient_sync, is_sharded
from ttt_adapt.loss import IGNORE_INDEX, loss_sum
from ttt_adapt.model_setup import build_model, compile_decoder_layers
from ttt_adapt.modeling.modeling_ttt import set_ttt_training_step, ttt_learning_rates
from ttt_adapt.recipe.sections import Recipe
from ttt_adapt.training.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from ttt_adapt.training.divergence import Verdict, nonfinite_verdict, set_aside, spike_verdict
from ttt_adapt.training.optimizer import ADAM_BETAS, applied_lrs, apply_recipe_to_optimizer, lr_factor, param_groups
from ttt_adapt.training.preflight import Preflight
from ttt_adapt.training.progress import MetricsFile, Progress, flat, write_atomically
from ttt_adapt.training.resume import describe_changes
from ttt_adapt.training.rows import RowStream, collate, count_labels, rows_per_step, split_batch
from ttt_adapt.training.stopping import Diverged, Preempted, StopSignals, spike_ratio


# ------------------------------------------------------------------------------------------------ eval loss


@torch.no_grad()
def evaluate_loss(run: Run) -> dict:
    """Mean token loss over the held-out rows `run.eval_data`, split across data-parallel groups (same rows on
    every run) and sharded across the ranks of each context-parallel group."""
    accelerator, model, cp, recipe = run.accelerator, run.model, run.cp, run.recipe
    world, rank = cp.dp_size, cp.dp_rank
    rows = run.eval_data
    if not rows:
        return {}
    # Every process runs the same number of forwards (FSDP gathers inside forward); rows beyond the real
    # ones are repeats that are not counted.
    per_rank = math.ceil(len(rows) / world)
    mine = [(rows[(rank + k * world) % len(rows)], rank + k * world < len(rows)) for k in range(per_rank)]
    batch_size = recipe.train.batch_size
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for i in range(0, per_rank, batch_size):
        part = mine[i : i + batch_size]
        batch = collate([r for r, _ in part], accelerator.device)
        keep = torch.tensor([real for _, real in part], device=accelerator.device)
        batch["labels"] = torch.where(keep[:, None], batch["labels"], IGNORE_INDEX)
        local, shard = split_batch(batch, cp, recipe.ttt.chunk_size)
        total += torch.stack([loss_sum(model, local, shard).double(), torch.tensor(float(count_labels(local)))
                              .to(total)])
    model.train()
    total = accelerator.reduce(total, reduction="sum")
    return {"eval_loss": float(total[0] / total[1].clamp(min=1)), "eval_tokens": int(total[1])}


# ------------------------------------------------------------------------------------------------ set-up


@dataclass
class TrainState:
    """What a checkpoint stores to resume (its `trainer_state.json`)."""

    step: int = 0
    tokens: int = 0
    rows: int = 0  # the data cursor: rows of the training order consumed
    num_rows: int | None = None  # packed training rows (None: streaming)
    nonfinite_in_a_row: int = 0
    spikes_in_a_row: int = 0
    recent_losses: list = dataclasses.field(default_factory=list)  # the spike guard's window (updated steps)
    good_checkpoint: int | None = None  # newest checkpoint whose weights gave a finite, unspiked next step
    eval_loss: float | None = None  # measured at this step (None: not evaluated)
    best_checkpoint: int | None = None  # the checkpoint with the lowest eval loss (train.keep_best)
    best_eval_loss: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Run:
    """What the loop works with, built by `set_up`. `state` is saved in every checkpoint."""

    recipe: Recipe
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    cp: ContextParallel
    stream: RowStream
    eval_data: list | None
    state: TrainState
    checkpoint: Path | None  # the newest checkpoint: resumed from or written
    progress: Progress
    resumed_step: int = 0  # the step this session started from


def make_accelerator(recipe: Recipe) -> Accelerator:
    """The run's Accelerator (it joins the process group a launcher set up)."""
    t = recipe.train
    cpu = not torch.accelerator.is_available()  # also makes multi-process CPU runs use gloo
    if cpu and t.mixed_precision == "fp16":  # Accelerate would train in fp32 without a word
        raise RecipeError("train.mixed_precision: fp16 needs a GPU (CPU autocast has no fp16 gradient scaler); "
                          "use bf16 or no")
    mixed_precision = t.mixed_precision  # bf16: autocast (Accelerate), or FSDP's bf16 policy when we shard
    accelerator = Accelerator(
        cpu=cpu, mixed_precision=mixed_precision, log_with=t.trackers or None, project_dir=t.output_dir
    )
    if cpu and mixed_precision == "bf16":
        accelerator.print("train.mixed_precision=bf16 on CPU: bf16 autocast runs, but slower than fp32 on most CPUs "
                          "(useful to test the GPU's code path)")
    return accelerator


def set_up(recipe: Recipe, accelerator: Accelerator, checked: Preflight) -> Run:
    """The model and optimizer, the data, and the state of the checkpoint being resumed (the latest one in
    `train.output_dir`, if any), for a run that passed `ttt_adapt.training.preflight.preflight`."""
    t = recipe.train
    fsdp = checked.fsdp
    out = Path(t.output_dir)
    checkpoint = latest_checkpoint(out)

    cp = ContextParallel(recipe.parallel.cp_size, accelerator.device.type)
    counts = {}

    def prepare(model):
        if cp.enabled:
            prepare_model(model)
        elif recipe.model.attn_implementation in (None, "sdpa", "eager"):  # flash/flex isolate documents themselves
            use_packed_attention(model)  # packed rows without the dense L x L mask transformers builds for these
        if t.compile:  # before sharding, as torchtitan does: FSDP's hooks stay outside the compiled layers
            compile_decoder_layers(model)
        counts["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        counts["total"] = sum(p.numel() for p in model.parameters())
        if fsdp is not None and fsdp.activation_checkpointing and not t.gradient_checkpointing:
            enable_activation_checkpointing(model)

    if cp.enabled and recipe.model.attn_implementation not in (None, "sdpa"):
        accelerator.print(f"parallel.cp_size={cp.cp_size}: attention runs as all-gather SDPA "
                          f"(model.attn_implementation={recipe.model.attn_implementation} is not used)")
    if fsdp is not None:  # sharded before the optimizer exists: it must hold the sharded parameters
        model = build_sharded_model(recipe, checked.config, fsdp_mesh(accelerator.device.type), accelerator.device,
                                    prepare, mixed_precision=accelerator.mixed_precision,
                                    reshard_after_forward=fsdp.reshard_after_forward)
    else:
        model = build_model(recipe, config=checked.config)
        prepare(model)
    n_trainable, n_total = counts["trainable"], counts["total"]
    fused = accelerator.device.type in ("cpu", "cuda")  # torch's one-kernel AdamW where it has one
    optimizer = torch.optim.AdamW(param_groups(model, recipe), betas=ADAM_BETAS, eps=1e-8, fused=fused)
    stream, eval_data = load_data(accelerator, recipe, checked.tokenizer)
    if fsdp is None:  # a sharded model is not handed to Accelerate, which would wrap it again (DDP on CPU)
        model, optimizer = accelerator.prepare(model, optimizer)

    state = TrainState(num_rows=stream.num_rows)
    if checkpoint is not None:
        state = TrainState(**load_checkpoint(accelerator, checkpoint, model, optimizer))
        apply_recipe_to_optimizer(optimizer, recipe)  # the recipe as given, not the checkpoint's settings
        changes = describe_changes(checkpoint, recipe)
        if changes:
            accelerator.print(changes)
        if state.num_rows != stream.num_rows:
            accelerator.print(f"warning: the data changed since {checkpoint.name}: the data order differs")
            state.num_rows = stream.num_rows
        accelerator.print(f"resuming from {checkpoint} (step {state.step})")

    metrics = MetricsFile(accelerator, out)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_atomically(out / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    metrics.truncate(after_step=state.step)  # drop the lines of steps being redone
    if t.trackers:
        accelerator.init_trackers(out.name, config=flat(recipe.to_dict()))
    accelerator.print(
        f"training {n_trainable:,} of {n_total:,} parameters ({t.trainable}"
        f"{f' + LoRA r={t.lora.r}' if t.lora.r else ''}) on {accelerator.num_processes} process(es)"
        f"{f' ({cp.dp_size} data-parallel x {cp.cp_size} context-parallel)' if cp.enabled else ''}"
        f"{f', weights sharded over all {accelerator.num_processes} (FSDP2, {fsdp.source})' if fsdp else ''}"
    )
    if state.step >= t.max_steps:
        accelerator.print(f"nothing to train: {checkpoint.name} is at step {state.step} >= train.max_steps")
    return Run(recipe, accelerator, model, optimizer, cp, stream, eval_data, state, checkpoint, Progress(metrics),
               resumed_step=state.step)


def load_data(accelerator, recipe: Recipe, tokenizer) -> tuple[RowStream, list | None]:
    """The training rows in training order and the first held-out rows (None without eval data)."""
    t = recipe.train
    with accelerator.main_process_first():
        try:
            train_rows, eval_rows = build_datasets(recipe.data, tokenizer, log=accelerator.print)
        except ValueError as e:
            message = first_line(e, None)
            raise RecipeError(message if message.startswith("data") else f"data: {message}") from None
        except DatasetGenerationError as e:  # a malformed file: the reason is in the cause
            paths = [s.path for _, s in recipe.data.sources()] + [recipe.data.eval_path] * bool(recipe.data.eval_path)
            files = " or ".join(paths)
            raise RecipeError(f"data: cannot read {files}: {first_line(e.__cause__ or e, None)}") from None
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
    labelled: float  # tokens with a label, global
    tokens: int  # real tokens, global
    seconds: float
    nonfinite: list[str]  # "loss", "grad_norm": not finite, so the update was dropped
    stop: bool  # a stop signal reached some process: all stop after this step
    spike: float | None = None  # the loss over the median of the recent ones when above train.spike_factor
    on_spike: str = "stop"  # what a spike does (train.on_spike)

    @property
    def updated(self) -> bool:
        """The optimizer applied this step's update (finite, and not a spike stopped or skipped)."""
        return not self.nonfinite and (self.spike is None or self.on_spike == "warn")


def train_step(run: Run, step: int, signals: StopSignals) -> StepResult:
    """Optimizer step `step` on the next rows: forward and backward over the micro-batches, clipping, and the
    update unless the loss or the gradient norm is not finite. One reduction gives every process the loss,
    whether anything was non-finite anywhere and whether a stop signal arrived anywhere (up to that point of
    the step), so all act alike."""
    recipe, accelerator, model, optimizer, cp = run.recipe, run.accelerator, run.model, run.optimizer, run.cp
    t = recipe.train
    started = time.perf_counter()
    factor = lr_factor(step, recipe)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    set_ttt_training_step(accelerator.unwrap_model(model), step)

    rows = run.stream.take(run.state.rows, rows_per_step(recipe, cp))[cp.dp_rank :: cp.dp_size]
    micro = [split_batch(collate(rows[i : i + t.batch_size], accelerator.device), cp, recipe.ttt.chunk_size)
             for i in range(0, len(rows), t.batch_size)]
    counts = [sum(count_labels(b) for b, _ in micro), sum(int(b["attention_mask"].sum()) for b, _ in micro)]
    counts = torch.tensor(counts, dtype=torch.float64, device=accelerator.device)
    labelled, tokens = accelerator.reduce(counts, reduction="sum").tolist()
    scale = accelerator.num_processes / max(labelled, 1.0)  # DDP/FSDP average gradients over processes: undo that

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
    loss = summed_loss / max(labelled, 1.0)
    nonfinite = (["loss"] if not math.isfinite(loss) else []) + (["grad_norm"] if bad_grads else [])
    # the loss is the reduced one, identical on every process: all take the same decision
    ratio = None if nonfinite else spike_ratio(loss, run.state.recent_losses, t.spike_warmup)
    result = StepResult(loss, grad_norm, labelled, int(tokens), time.perf_counter() - started, nonfinite, stops > 0,
                        ratio if ratio is not None and ratio > t.spike_factor else None, t.on_spike)
    if result.updated:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return result


def on_bad_step(run: Run, step: int, verdict: Verdict):
    """Act on the `Verdict` of a step that updated nothing (or spiked under `train.on_spike: warn`): log it, then
    raise `Diverged` (setting aside the checkpoint whose weights gave its loss), or say its update is skipped."""
    if verdict.warn:
        run.accelerator.print(f"warning: step {step}: {verdict.what}; training on (train.on_spike=warn)")
        return
    if verdict.stop:
        log_progress(run)  # the steps before it, if not logged yet
    run.progress.metrics.write(verdict.record)
    if verdict.stop:
        out = Path(run.recipe.train.output_dir)
        aside = set_aside(run.accelerator, out, step, run.state.good_checkpoint, run.resumed_step)
        advice = {"remedy": verdict.remedy} if verdict.remedy else {}
        raise Diverged(step, verdict.what, latest_checkpoint(out), aside, **advice)
    run.accelerator.print(f"step {step}: {verdict.what}; its update is skipped ({verdict.in_a_row} in a row)")


def log_progress(run: Run) -> None:
    """The progress line of the steps since the last one, at the current step (`Progress.write_line`), with the
    learning rates the optimizer applied (the recipe's times the schedule; `lr` of a group that trains nothing
    is the recipe's)."""
    t, step = run.recipe.train, run.state.step
    factor = lr_factor(step, run.recipe)
    applied = applied_lrs(run.optimizer)
    lr = applied.get("base", applied.get("base_no_decay", t.lr * factor))
    ttt_lr = applied.get("ttt", applied.get("ttt_no_decay", (t.ttt_lr if t.ttt_lr is not None else t.lr) * factor))
    run.progress.write_line(
        step, run.state.tokens, lr=lr, ttt_param_lr=ttt_lr,
        ttt_learning_rates=lambda: ttt_learning_rates(run.accelerator.unwrap_model(run.model)),
    )


# ------------------------------------------------------------------------------------------------ the loop


def train(run: Run) -> list[dict]:
    """Run (or resume) the training steps of `run` (from `set_up`); return the progress lines written.

    Raises `Diverged` when the run diverges (nothing non-finite is saved) and `Preempted` after a stop signal
    (the step in flight is finished and checkpointed first).
    """
    t, state = run.recipe.train, run.state
    keep_best = t.keep_best if t.keep_best is not None else bool(run.eval_data)  # on when the run evaluates
    with StopSignals(t.preempt_signals) as signals, tqdm(
        total=t.max_steps, initial=state.step, disable=not run.accelerator.is_main_process, desc="adapt",
        dynamic_ncols=True,
    ) as bar:
        run.model.train()
        while state.step < t.max_steps:
            step = state.step + 1
            result = train_step(run, step, signals)
            if result.nonfinite:
                on_bad_step(run, step, nonfinite_verdict(state, t, step, result))
            elif result.spike is not None:
                on_bad_step(run, step, spike_verdict(state, t, step, result))
            if not result.nonfinite:
                state.nonfinite_in_a_row = 0
            if result.spike is None:
                state.spikes_in_a_row = 0
            if result.updated:
                state.recent_losses = [*state.recent_losses, result.loss][-t.spike_window:]
            if not result.nonfinite and result.spike is None and run.checkpoint is not None \
                    and run.checkpoint.name == f"checkpoint-{step - 1}":
                state.good_checkpoint = step - 1  # its weights gave this good step
            run.progress.add(result)
            state.step, state.tokens = step, state.tokens + result.tokens
            state.rows += rows_per_step(run.recipe, run.cp)
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{run.progress.window.tokens_per_s:,.0f}")

            if step % t.log_every == 0 or step == t.max_steps or result.stop:
                log_progress(run)
            saving = (t.save_every and step % t.save_every == 0) or step == t.max_steps or result.stop
            state.eval_loss = None
            if run.eval_data and not result.stop and (
                (t.eval_every and step % t.eval_every == 0) or step == t.max_steps or (saving and keep_best)
            ):
                evaluated = evaluate_loss(run)
                run.progress.metrics.write({"step": step, **evaluated})
                state.eval_loss = evaluated["eval_loss"]
            if saving:
                if keep_best and state.eval_loss is not None and math.isfinite(state.eval_loss) and (
                        state.best_eval_loss is None or state.eval_loss < state.best_eval_loss):
                    state.best_checkpoint, state.best_eval_loss = step, state.eval_loss
                keep = tuple(s for s in (state.good_checkpoint, state.best_checkpoint if keep_best else None)
                             if s is not None)
                run.checkpoint = save_checkpoint(run.accelerator, run.model, run.optimizer, run.recipe,
                                                 state.to_dict(), keep=keep)
            if result.stop:
                raise Preempted(step, signals.received or "a stop signal to another process", run.checkpoint)
    return run.progress.history


__all__ = ["Run", "TrainState", "make_accelerator", "set_up", "train", "train_step", "evaluate_loss", "collate",
           "split_batch", "RowStream", "lr_factor", "param_groups"]
