"""Continued training of an In-Place TTT model: the Accelerate loop, in one page.

`train(recipe)` checks the run (base model, output folder, trackers) before any work, loads the base model,
converts it (`ttt_adapt.convert`), picks what is trained (`ttt`, `full`, or LoRA on the rest with the TTT
modules trained in full), packs the corpus (`ttt_adapt.data`) and runs AdamW with warmup + cosine, gradient
accumulation and clipping. It checkpoints with `accelerator.save_state`, resumes from the latest checkpoint
in `train.output_dir`, logs to `metrics.jsonl` (and trackers), and at the end runs the recipe's `eval` section
(`ttt_adapt.evaluate`) and writes the export (`ttt_adapt.export`).

The loss of a step is the mean over every real token of the global batch (all processes, all accumulation
micro-batches): each micro-batch contributes `sum of its token losses / global token count`, times the number
of processes because DDP/FSDP average gradients over all of them (with context parallelism each rank of a
group holds part of the same rows, so its share of the loss is summed, not averaged, across the group).

Data order is a pure function of `train.seed`, the number of packed rows and a row cursor stored in each
checkpoint, so a resumed run reads exactly the rows the uninterrupted run would have read.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from datasets.exceptions import DatasetGenerationError
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ttt_adapt import convert
from ttt_adapt.compat import enable_activation_checkpointing
from ttt_adapt.config import Recipe, RecipeError
from ttt_adapt.data import IGNORE_INDEX, build_datasets
from ttt_adapt.modeling import BASE_MODEL_TYPES, TTT_MODEL_TYPES
from ttt_adapt.modeling.modeling_ttt import set_ttt_training_step, ttt_learning_rates
from ttt_adapt.parallel import ContextParallel, loss_sum, prepare_model

SUPPORTED_MODEL_TYPES = BASE_MODEL_TYPES  # the families `convert` takes (ttt_adapt.modeling_ttt.FAMILIES)
CONVERTED_MODEL_TYPES = TTT_MODEL_TYPES
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
ADAM_BETAS = (0.9, 0.95)  # the usual choice for LM pretraining; torch's default 0.999 adapts too slowly


def is_ttt_param(name: str) -> bool:
    """TTT parameters live in each TTT layer's `mlp.ttt` submodule (also under peft's modules_to_save)."""
    return ".mlp.ttt." in name


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
        from ttt_adapt.evaluate import settings_from_recipe

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


def load_tokenizer(recipe: Recipe):
    """The base model's tokenizer; it must have an eos token (packing ends every document with it)."""
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.name_or_path)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token (needed to separate packed documents)")
    return tokenizer


# ------------------------------------------------------------------------------------------------ model


def build_model(recipe: Recipe):
    """The model to train: base loaded, converted, trainable parameters chosen (LoRA via peft if asked).

    Seeded with `train.seed`, so the same recipe always builds the same initial TTT (and LoRA) weights.
    """
    set_seed(recipe.train.seed)
    m = recipe.model
    kwargs = {"dtype": getattr(torch, m.dtype)}
    if m.attn_implementation is not None:
        kwargs["attn_implementation"] = m.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(m.name_or_path, **kwargs)
    if model.config.model_type not in CONVERTED_MODEL_TYPES:
        model = convert(model, recipe.ttt)
    model.config.use_cache = False
    t = recipe.train
    if t.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if t.lora.r > 0:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=t.lora.r,
            lora_alpha=t.lora.alpha,
            lora_dropout=t.lora.dropout,
            target_modules=list(t.lora.target_modules),
            modules_to_save=["ttt"],  # suffix match: model.layers.N.mlp.ttt (the TTTParams of each TTT layer)
            task_type="CAUSAL_LM",
        )
        try:
            model = get_peft_model(model, lora)
        except ValueError as e:  # e.g. a target module name the model does not have
            reason = str(e).strip().splitlines()[0]
            raise RecipeError(f"train.lora.target_modules: peft refused {t.lora.target_modules}: {reason}") from None
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(t.trainable == "full" or is_ttt_param(name))
    if not any(is_ttt_param(n) and p.requires_grad for n, p in model.named_parameters()):
        raise RuntimeError("no trainable TTT parameter found after conversion")
    return model


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


# ------------------------------------------------------------------------------------------------ checkpoints


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints (`checkpoint-N` holding a trainer state) in `output_dir`, oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def latest_checkpoint(output_dir) -> Path | None:
    """The newest complete checkpoint folder in `output_dir`, or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(accelerator, recipe: Recipe, state: dict) -> Path:
    """`accelerator.save_state` into a temporary folder, renamed into place once complete; keep the last K."""
    out = Path(recipe.train.output_dir)
    final = out / f"checkpoint-{state['step']}"
    tmp = out / f".tmp-checkpoint-{state['step']}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(out)[: -recipe.train.keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


# ------------------------------------------------------------------------------------------------ export


def evaluate_after_training(accelerator, model, recipe: Recipe, exported: Path | None = None) -> Path | None:
    """Run the recipe's `eval` section (`ttt_adapt.evaluate.evaluate_recipe`: base, converted base, adapted) on
    the main process, into `<train.output_dir>/eval/`. The adapted model is the one in memory, or the export
    folder `exported` when given (needed when the model is sharded across processes). None without `eval`."""
    if recipe.eval is None:
        return None
    from ttt_adapt.evaluate import evaluate_recipe

    if accelerator.is_main_process:
        evaluate_recipe(recipe, exported if exported is not None else accelerator.unwrap_model(model))
    accelerator.wait_for_everyone()
    return Path(recipe.train.output_dir) / "eval"


def export_after_training(accelerator, recipe: Recipe, checkpoint: Path) -> Path | None:
    """Write the final checkpoint's model to `export.dir` with `ttt_adapt.export.export_model` (LoRA merged,
    model card, optional push), on the main process; None when the recipe asks for no export."""
    e = recipe.export
    if e.dir is None:
        return None
    from ttt_adapt.export import export_model  # imports this module: import it late

    if accelerator.is_main_process:
        export_model(
            checkpoint, e.dir, dtype=e.dtype, max_shard_size=e.max_shard_size, push_to_hub=e.push_to_hub,
            private=e.private, revision=e.revision, overwrite=e.overwrite, commit_message=e.commit_message,
            license=e.license,
        )
    accelerator.wait_for_everyone()
    return Path(e.dir)


# ------------------------------------------------------------------------------------------------ the loop


def train(recipe: Recipe) -> dict:
    """Run (or resume) the recipe's training and export; return a summary (steps, tokens, last losses)."""
    t = recipe.train
    cpu = not torch.accelerator.is_available()  # also makes multi-process CPU runs use gloo
    mixed_precision = "no" if cpu else t.mixed_precision  # CPU autocast is slow and gains nothing: fp32 on CPU
    accelerator = Accelerator(
        cpu=cpu, mixed_precision=mixed_precision, log_with=t.trackers or None, project_dir=t.output_dir
    )
    check_run(recipe)
    check_world(recipe, accelerator.num_processes)
    if mixed_precision != t.mixed_precision:
        accelerator.print(f"train.mixed_precision={t.mixed_precision} needs a GPU: training in fp32 on CPU")
    out = Path(t.output_dir)
    resume_from = latest_checkpoint(out)

    tokenizer = load_tokenizer(recipe)
    model = build_model(recipe)
    cp = ContextParallel(recipe.parallel.cp_size, accelerator.device.type)
    if cp.enabled:
        prepare_model(model)
        if recipe.model.attn_implementation not in (None, "sdpa"):
            accelerator.print(f"parallel.cp_size={cp.cp_size}: attention runs as all-gather SDPA "
                              f"(model.attn_implementation={recipe.model.attn_implementation} is not used)")
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    fused = accelerator.device.type in ("cpu", "cuda")  # torch's one-kernel AdamW where it has one
    optimizer = torch.optim.AdamW(param_groups(model, recipe), betas=ADAM_BETAS, eps=1e-8, fused=fused)

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
    stream = RowStream(train_rows, t.seed)
    eval_data = None
    if eval_rows is not None:
        cap = t.eval_batches * t.batch_size  # independent of the number of processes
        eval_data = [eval_rows[i] for i in range(min(cap, len(eval_rows)))] if hasattr(eval_rows, "__len__") \
            else list(itertools.islice(iter(eval_rows), cap))

    model, optimizer = accelerator.prepare(model, optimizer)

    state = {"step": 0, "tokens": 0, "rows": 0, "num_rows": stream.num_rows}
    if resume_from is not None:
        try:
            accelerator.load_state(str(resume_from))
        except (RuntimeError, KeyError, ValueError) as e:
            raise RecipeError(
                f"train.output_dir: {resume_from} does not match this recipe's model "
                f"({str(e).strip().splitlines()[0][:200]}); use another train.output_dir"
            ) from None
        state.update(json.loads((resume_from / STATE_FILE).read_text()))
        if state["num_rows"] != stream.num_rows:
            accelerator.print(f"warning: the data changed since {resume_from.name}: the data order differs")
            state["num_rows"] = stream.num_rows
        accelerator.print(f"resuming from {resume_from} (step {state['step']})")

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        _truncate_metrics(out / "metrics.jsonl", after_step=state["step"])  # drop lines of steps being redone
    if t.trackers:
        accelerator.init_trackers(out.name, config=_flat(recipe.to_dict()))
    accelerator.print(
        f"training {n_trainable:,} of {n_total:,} parameters ({t.trainable}"
        f"{f' + LoRA r={t.lora.r}' if t.lora.r else ''}) on {accelerator.num_processes} process(es)"
        f"{f' ({cp.dp_size} data-parallel x {cp.cp_size} context-parallel)' if cp.enabled else ''}"
    )
    if state["step"] >= t.max_steps:
        accelerator.print(f"nothing to train: {resume_from.name} is at step {state['step']} >= train.max_steps")

    world = accelerator.num_processes
    rows_per_step = t.batch_size * t.grad_accum * cp.dp_size  # the ranks of a CP group share rows
    last_checkpoint = resume_from
    window = {"loss": 0.0, "targets": 0.0, "tokens": 0.0, "seconds": 0.0}  # since the last metrics line
    history = []
    bar = tqdm(total=t.max_steps, initial=state["step"], disable=not accelerator.is_main_process,
               desc="adapt", dynamic_ncols=True)
    model.train()
    while state["step"] < t.max_steps:
        started = time.perf_counter()
        step = state["step"] + 1
        factor = lr_factor(step, recipe)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        set_ttt_training_step(accelerator.unwrap_model(model), step)

        rows = stream.take(state["rows"], rows_per_step)[cp.dp_rank :: cp.dp_size]
        micro = [cp.shard(collate(rows[i : i + t.batch_size], accelerator.device), recipe.ttt.chunk_size)
                 for i in range(0, len(rows), t.batch_size)]
        counts = [sum(count_targets(b) for b, _ in micro), sum(int(b["attention_mask"].sum()) for b, _ in micro)]
        counts = torch.tensor(counts, dtype=torch.float64, device=accelerator.device)
        targets, tokens = accelerator.reduce(counts, reduction="sum").tolist()
        scale = world / max(targets, 1.0)  # DDP/FSDP average gradients over processes: undo that

        step_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        for i, (local, shard) in enumerate(micro):
            last = i == len(micro) - 1  # gradients are all-reduced once, on the last micro-batch
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                summed = loss_sum(model, local, shard)
                accelerator.backward(summed * scale)
            step_loss += summed.detach().double()
        clip = t.clip_grad_norm if t.clip_grad_norm is not None else float("inf")
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        step_loss = float(accelerator.reduce(step_loss, reduction="sum")) / max(targets, 1.0)
        state.update(step=step, tokens=state["tokens"] + int(tokens), rows=state["rows"] + rows_per_step)
        window["loss"] += step_loss * targets
        window["targets"] += targets
        window["tokens"] += tokens
        window["seconds"] += time.perf_counter() - started
        tokens_per_s = window["tokens"] / max(window["seconds"], 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")

        if step % t.log_every == 0 or step == t.max_steps:
            record = {
                "step": step,
                "loss": window["loss"] / max(window["targets"], 1.0),
                "lr": t.lr * factor,
                "ttt_param_lr": (t.ttt_lr if t.ttt_lr is not None else t.lr) * factor,
                "tokens": state["tokens"],
                "tokens_per_s": tokens_per_s,
                "grad_norm": grad_norm,
                "ttt_learning_rates": {
                    str(k): v for k, v in ttt_learning_rates(accelerator.unwrap_model(model)).items()
                },
            }
            _log(accelerator, out, record)
            history.append(record)
            window = dict.fromkeys(window, 0.0)
        if eval_data and ((t.eval_every and step % t.eval_every == 0) or step == t.max_steps):
            _log(accelerator, out, {"step": step, **evaluate_loss(accelerator, model, eval_data, recipe, cp)})
        if (t.save_every and step % t.save_every == 0) or step == t.max_steps:
            last_checkpoint = save_checkpoint(accelerator, recipe, state)
    bar.close()

    # Evaluate before exporting, so the export's model card shows the report; a model sharded across
    # processes (FSDP, DeepSpeed) is evaluated from its export instead (re-export to add the table).
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    report = None if sharded else evaluate_after_training(accelerator, model, recipe)
    exported = export_after_training(accelerator, recipe, last_checkpoint)
    if exported is not None:
        accelerator.print(f"exported to {exported}")
    if sharded and exported is not None:
        report = evaluate_after_training(accelerator, model, recipe, exported)
    elif sharded and recipe.eval is not None:
        accelerator.print("eval skipped: a sharded model is evaluated from its export; set export.dir")
    if t.trackers:
        accelerator.end_training()
    return {"step": state["step"], "tokens": state["tokens"], "checkpoint": str(last_checkpoint),
            "export": None if exported is None else str(exported), "eval": None if report is None else str(report),
            "metrics": history}


def _truncate_metrics(path: Path, after_step: int):
    """Keep the metrics lines of steps <= `after_step` (all of them are redone otherwise)."""
    if not path.is_file():
        path.write_text("")
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= after_step]
    path.write_text("".join(line + "\n" for line in kept))


def _log(accelerator, out: Path, record: dict):
    """One JSON line in metrics.jsonl (main process) and the same numbers to the trackers."""
    if accelerator.is_main_process:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    if accelerator.trackers:
        accelerator.log(_flat({k: v for k, v in record.items() if k != "step"}, sep="/"), step=record["step"])


def _flat(d: dict, prefix: str = "", sep: str = ".") -> dict:
    """Nested dict -> flat {a.b: value}; lists become strings (trackers take scalars only)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flat(v, key, sep))
        else:
            out[key] = str(v) if isinstance(v, (list, tuple)) or v is None else v
    return out


__all__ = [
    "train",
    "check_run",
    "build_model",
    "load_tokenizer",
    "latest_checkpoint",
    "list_checkpoints",
    "evaluate_after_training",
    "export_after_training",
]
