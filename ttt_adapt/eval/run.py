"""The evaluation run: the base, the base freshly converted (must equal it) and the adapted model with its
fast-weight controls, measured and written to a folder (see the package docstring)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from ttt_adapt._util import looks_like_local_path
from ttt_adapt.convert import convert
from ttt_adapt.eval.inputs import describe, load_model, load_tokenizer, model_config, read_corpus
from ttt_adapt.eval.long_context import long_documents, measure_long_context
from ttt_adapt.eval.loss_by_position import (
    CONFIDENCE,
    RESAMPLES,
    bootstrap_difference,
    by_position,
    predicted_positions,
    stateless_token_losses,
    swapped_token_losses,
    token_losses,
    tokenize_documents,
)
from ttt_adapt.eval.recall import IN_LENGTH, measure_recall_file, read_recall_file, recall_by_distance
from ttt_adapt.eval.report import report_warnings, write_report
from ttt_adapt.eval.settings import EvalError, EvalSettings, check_lengths
from ttt_adapt.eval.state_norms import state_norms
from ttt_adapt.eval.swapped_state import swap_partners
from ttt_adapt.eval.tasks import attention_reach, generate, score, task_samples
from ttt_adapt.modeling.configuration_ttt import TTTConfig

EQUAL_ATOL = 1e-5  # converted vs base, per-token loss: the TTT path at step 0 must change nothing


def run_evaluation(settings: EvalSettings | dict, base, adapted, out_dir, *, tokenizer=None, dtype: str = "float32",
                   log=print) -> dict:
    """Measure `base`, `base` converted and `adapted`; write report.json, report.md, the plot and samples.jsonl.

    Args:
        settings: `EvalSettings` (or a mapping of its fields); `corpus` must be set.
        base: the base model's folder / hub id, or a loaded causal LM of a family `convert` takes.
        adapted: the TTT model's folder (an export), or a loaded TTT model (peft-wrapped is fine). It is left
            in the train/eval mode it came in.
        out_dir: where the files go (created).
        tokenizer: default the base folder's (else the adapted folder's).
        dtype: dtype models loaded from folders get (an in-memory adapted model's own dtype wins).
    Returns the report (also in `out_dir/report.json`).
    """
    started = time.time()
    settings = EvalSettings.from_dict(settings) if isinstance(settings, dict) else settings.validate()
    if settings.corpus is None:
        raise EvalError("eval.corpus: not set (a held-out .jsonl file)")
    _check_folders(base, adapted)
    docs = read_corpus(settings.corpus, settings.text_field)
    tokenizer = tokenizer if tokenizer is not None else _default_tokenizer(base, adapted)
    records = read_recall_file(settings.recall_file) if settings.recall_file else None  # a bad file: before models
    samples = task_samples(settings, tokenizer, docs, window=attention_reach(model_config(adapted)))  # fails fast
    ttt_settings = _check_models(settings, base, adapted)  # configs first: no weights load for a wrong model
    base_model, adapted_model = _load_models(base, adapted, dtype)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = tokenize_documents(tokenizer, docs[: settings.max_docs], settings.seq_len, pad_id)
    weights = {"all": predicted_positions(rows), "recall": predicted_positions(rows) & rows["recall"]}
    report = _header(settings, base, adapted, weights)
    measure = dict(rows=rows, weights=weights, settings=settings, tokenizer=tokenizer, log=log)
    generations = {}
    was_training = adapted_model.training
    adapted_model.eval()
    try:
        report["base"], base_losses, generations["base"] = measure_model("base", base_model, samples, **measure)
        report["converted"] = converted_check(base_model, ttt_settings, base_losses, **measure)
        report["adapted"], adapted_losses, generations["adapted"] = measure_model("adapted", adapted_model, samples,
                                                                                   **measure)
        report["adapted"]["state_norms"] = state_norms(adapted_model, rows, settings.batch_size)
        controls = {}
        report.update(state_controls(adapted_model, rows, adapted_losses, weights, settings, log, keep=controls))
        report["recall_by_distance"] = in_length_recall(base_losses, adapted_losses, controls, rows, settings, log)
        if settings.resolved_max_length:
            report["long_context"] = measure_long_context(base_model, adapted_model, tokenizer,
                                                          long_documents(settings, docs), settings, log)
        if records is not None:
            report["recall_file"] = measure_recall_file(base_model, adapted_model, tokenizer, records, settings, log)
    finally:
        adapted_model.train(was_training)
    report["warnings"] = report_warnings(report)  # every one-line flag, each saying where it was raised
    report["seconds"] = round(time.time() - started, 1)
    path = write_report(out_dir, report, samples, {k: v for k, v in generations.items() if v is not None})
    log(f"evaluate: wrote {path} ({report['seconds']} s)")
    return report


def measure_model(name, model, samples, *, rows, weights, settings, tokenizer, log):
    """(result, per-token losses, generations or None) of one model: loss by position, then the tasks if any."""
    log(f"evaluate: {name}: loss by position on {len(rows['input_ids'])} documents of <= {settings.seq_len} tokens")
    losses = token_losses(model, rows, settings.batch_size)
    result = by_position(losses, weights, settings.bins)
    if not samples:
        return result, losses, None
    log(f"evaluate: {name}: {len(samples)} task prompts at lengths {settings.lengths}")
    generations = generate(model, tokenizer, [s["input_ids"] for s in samples], settings.batch_size,
                           settings.max_new_tokens)
    result["tasks"] = {
        task: {str(length): _mean([score(g, s["answers"]) for s, g in zip(samples, generations)
                                   if s["task"] == task and s["length"] == length])
               for length in settings.lengths}
        for task in settings.tasks
    }
    return result, losses, generations


def converted_check(base_model, ttt_settings, base_losses, *, rows, weights, settings, tokenizer, log) -> dict:
    """The base freshly converted with the adapted model's TTT settings: its loss by position and whether it equals
    the base's (it must: step-0 TTT weights change nothing)."""
    if getattr(base_model.config, "ttt", None) is not None:
        return {"skipped": "the base is already an In-Place TTT model"}
    converted = convert(base_model, TTTConfig.from_dict(dict(ttt_settings))).eval()
    result, losses, _ = measure_model("converted", converted, [], rows=rows, weights=weights, settings=settings,
                                      tokenizer=tokenizer, log=log)
    diff = float((losses - base_losses).abs().max())
    if diff > EQUAL_ATOL:
        log(f"evaluate: WARNING: the freshly converted model differs from the base (max |loss diff| {diff:.3g})")
    return {**result, "max_abs_loss_diff": diff, "equals_base": diff <= EQUAL_ATOL}


def state_controls(model, rows: dict, own: torch.Tensor, weights: dict, settings: EvalSettings, log=print,
                   keep: dict | None = None) -> dict:
    """The fast-weight controls of the adapted model: `adapted_swapped_state` (each document read with the fast
    weights of another, `swap_partners`), `adapted_no_state` (fast weights never written) and `own_minus_swapped`
    (per bin, own - swapped loss with its bootstrap interval over the documents that have a partner).

    `keep`, when given, receives the per-token losses (`adapted_swapped_state`: the paired rows only,
    `adapted_no_state`: every row) and `paired` (the rows that have a partner), for measures that reuse them."""
    edges = settings.bins
    partners = swap_partners(rows["attention_mask"].sum(1).tolist())
    paired = [i for i, p in enumerate(partners) if p is not None]
    log(f"evaluate: adapted: swapped-state and no-state controls on {len(paired)} documents")
    swapped = swapped_token_losses(model, rows, partners, settings.batch_size)[paired]
    none = stateless_token_losses(model, rows, settings.batch_size)
    if keep is not None:
        keep.update(adapted_swapped_state=swapped, adapted_no_state=none, paired=paired)
    kept = {k: w[paired] for k, w in weights.items()}
    difference = {"documents": len(paired), "resamples": RESAMPLES, "confidence": CONFIDENCE}
    for key, w in (("loss_by_position", kept["all"]), ("recall_loss_by_position", kept["recall"])):
        if key == "loss_by_position" or w.any():
            difference[key] = bootstrap_difference(own[paired], swapped, w, edges, seed=settings.seed)
    return {
        "adapted_swapped_state": {"documents": len(paired), **by_position(swapped, kept, edges)},
        "adapted_no_state": by_position(none, weights, edges),
        "own_minus_swapped": difference,
    }


def in_length_recall(base: torch.Tensor, adapted: torch.Tensor, controls: dict, rows: dict,
                     settings: EvalSettings, log=print) -> dict | None:
    """`recall_by_distance` on the held-out documents of the training length, from the losses already computed:
    base, adapted, the swapped state (over the paired documents) and no state; None when they hold no marked answers.
    Its flag is logged as a WARNING."""
    losses = {"base": base, "adapted": adapted, **{k: v for k, v in controls.items() if k != "paired"}}
    section = recall_by_distance(losses, rows, settings.seq_len, controls.get("paired"), seed=settings.seed)
    if section is not None and section["flag"]:
        log(f"evaluate: WARNING: {section['flag']} ({IN_LENGTH})")
    return section


def evaluate_recipe(recipe, adapted, out_dir=None) -> dict:
    """`run_evaluation` for a training run: its base (`model.name_or_path`), `adapted` (the trained model in memory,
    or a folder), the recipe's `eval` settings; writes `<train.output_dir>/eval/` unless `out_dir` is given. A chat
    recipe (`data.format: chat`) is measured on its held-out conversations (`ttt_adapt.eval.chat`)."""
    out_dir = out_dir if out_dir is not None else Path(recipe.train.output_dir) / "eval"
    if recipe.data.format == "chat":  # held-out conversations (data.eval_path): `ttt_adapt.eval.chat`
        from ttt_adapt.eval.chat import run_chat_evaluation
        from ttt_adapt.model_setup import recipe_tokenizer

        settings = recipe.eval_settings()
        if settings.corpus is None:
            raise EvalError("eval.corpus: not set, and the recipe has no data.eval_path to default to")
        name = describe(adapted)
        if isinstance(adapted, (str, Path)):
            adapted = load_model(adapted, recipe.model.dtype)
        base = load_model(recipe.model.name_or_path, recipe.model.dtype, next(adapted.parameters()).device)
        return run_chat_evaluation(settings, base, adapted, recipe_tokenizer(recipe), out_dir,
                                   recipe.data.chat_template_kwargs, names=(recipe.model.name_or_path, name))
    return run_evaluation(recipe.eval, recipe.model.name_or_path, adapted, out_dir, dtype=recipe.model.dtype)


def _check_folders(base, adapted) -> None:
    for model, what in ((base, "base"), (adapted, "adapted")):
        if isinstance(model, (str, Path)) and looks_like_local_path(str(model)) and not Path(model).is_dir():
            raise EvalError(f"no such {what} model folder: {model}")


def _default_tokenizer(base, adapted):
    source = base if isinstance(base, (str, Path)) else adapted
    if not isinstance(source, (str, Path)):
        raise EvalError("pass `tokenizer` when both models are given in memory")
    return load_tokenizer(source)


def _check_models(settings: EvalSettings, base, adapted) -> dict:
    """Lengths against both models' configs; the adapted model's TTT settings (EvalError if it has none)."""
    adapted_name = str(adapted) if isinstance(adapted, (str, Path)) else "the adapted model (in memory)"
    check_lengths(settings, model_config(base), describe(base))
    adapted_config = model_config(adapted)
    ttt_settings = getattr(adapted_config, "ttt", None)
    if ttt_settings is None:
        raise EvalError(f"{adapted_name} is not an In-Place TTT model (its config has no `ttt` settings)")
    check_lengths(settings, adapted_config, adapted_name)
    return ttt_settings


def _load_models(base, adapted, dtype: str):
    """Both models, on the in-memory adapted model's device and in its dtype if it is one."""
    device = None
    if not isinstance(adapted, (str, Path)):
        first = next(adapted.parameters())
        device, dtype = first.device, str(first.dtype).removeprefix("torch.")
    base_model = base if not isinstance(base, (str, Path)) else load_model(base, dtype, device)
    adapted_model = adapted if not isinstance(adapted, (str, Path)) else load_model(adapted, dtype, base_model.device)
    return base_model, adapted_model


def _header(settings: EvalSettings, base, adapted, weights: dict) -> dict:
    edges = settings.bins
    return {
        "settings": dataclasses.asdict(settings),
        "models": {"base": describe(base), "adapted": describe(adapted)},
        "bins": edges,
        "tokens_per_bin": [int(weights["all"][:, a:b].sum()) for a, b in zip(edges, edges[1:])],
        "recall_tokens_per_bin": [int(weights["recall"][:, a:b].sum()) for a, b in zip(edges, edges[1:])],
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
