"""The main job, `adapt(recipe)`: preflight -> train -> evaluate -> export (what `scripts/adapt.py` runs).

    from ttt_adapt.pipeline import adapt
    from ttt_adapt.recipe import load_recipe
    summary = adapt(load_recipe("recipes/tiny_qwen3.yaml"))

Every process runs it. The checks (`ttt_adapt.training.preflight`) come before anything is built or written; the
training loop (`ttt_adapt.training.loop`) resumes from the latest checkpoint in `train.output_dir`; then the
recipe's `eval` section runs on the main process (`ttt_adapt.eval`) and the final checkpoint is exported
(`ttt_adapt.export`). Evaluation comes first, so the export's model card shows the report.
"""

from __future__ import annotations

from pathlib import Path

from ttt_adapt.distributed.fsdp import is_sharded
from ttt_adapt.export.folder import REPORT, export_model, name_report_checkpoint
from ttt_adapt.recipe.sections import Recipe
from ttt_adapt.training.checkpoints import checkpoint_path, load_checkpoint_model
from ttt_adapt.training.loop import Run, make_accelerator, set_up, train
from ttt_adapt.training.preflight import preflight
from ttt_adapt.training.stopping import StopAtOnce


def adapt(recipe: Recipe) -> dict:
    """Check, train (or resume), evaluate and export the recipe's run; return a summary (steps, tokens, the
    final checkpoint, the export and eval folders, the progress lines).

    Raises `RecipeError` for bad input (before any work), `Diverged` when the run diverges (nothing non-finite
    is saved), `Preempted` after a stop signal during training (the step in flight is finished and checkpointed
    first) and `Interrupted` after one during set-up, the final evaluation or the export (at once; the run is
    left resumable).
    """
    with StopAtOnce(recipe.train.preempt_signals, "during set-up: nothing was trained or written; rerun the same "
                                                  "command") as stop:
        accelerator = make_accelerator(recipe)
        checked = preflight(recipe, accelerator)
        run = set_up(recipe, accelerator, checked)
        try:
            history = train(run)  # stop signals: the step in flight finishes and is checkpointed (Preempted)
            stop.during = (f"during the final evaluation or export: training is complete in {run.checkpoint}; rerun "
                           "the same command to evaluate and export it")
            report = evaluate_after_training(run)
            exported = export_after_training(run)
            if exported is not None:
                accelerator.print(f"exported to {exported}")
        finally:
            if recipe.train.trackers:
                accelerator.end_training()
    return {"step": run.state.step, "tokens": run.state.tokens, "checkpoint": str(run.checkpoint),
            "export": None if exported is None else str(exported), "eval": None if report is None else str(report),
            "metrics": history}


def exported_checkpoint(run: Run) -> Path:
    """The checkpoint the run exports: the final one, or with `export.checkpoint: best` the one with the lowest
    eval loss (the final one, said so, when no checkpoint was evaluated)."""
    if run.recipe.export.checkpoint == "best":
        best = run.state.best_checkpoint
        if best is not None and checkpoint_path(run.recipe.train.output_dir, best).is_dir():
            return checkpoint_path(run.recipe.train.output_dir, best)
        run.accelerator.print("export.checkpoint=best: no checkpoint has an eval loss (no eval data, or "
                              "train.keep_best=false): exporting the final one")
    return run.checkpoint


def evaluate_after_training(run: Run) -> Path | None:
    """Run the recipe's `eval` section (`ttt_adapt.eval.evaluate_recipe`: base, converted base, adapted) on
    the main process, into `<train.output_dir>/eval/`, for the model the run exports (`exported_checkpoint`):
    the one in memory when that is the final one, else (or for a model sharded across processes) the one in
    the checkpoint, loaded whole on the main process. The report names the checkpoint. None without `eval`."""
    recipe, accelerator = run.recipe, run.accelerator
    if recipe.eval is None:
        return None
    from ttt_adapt.eval import evaluate_recipe

    checkpoint = exported_checkpoint(run)
    if accelerator.is_main_process:
        if is_sharded(run.model) or checkpoint != run.checkpoint:
            adapted = load_checkpoint_model(checkpoint, recipe)
        else:
            adapted = accelerator.unwrap_model(run.model)
        evaluate_recipe(recipe, adapted)
        name_report_checkpoint(Path(recipe.train.output_dir) / REPORT, checkpoint)
    accelerator.wait_for_everyone()
    return Path(recipe.train.output_dir) / "eval"


def export_after_training(run: Run) -> Path | None:
    """Write the exported checkpoint's model (`exported_checkpoint`) to `export.dir` with
    `ttt_adapt.export.folder.export_model` (LoRA merged, model card, optional push), on the main process; None when the
    recipe asks for no export."""
    e = run.recipe.export
    if e.dir is None:
        return None
    checkpoint = exported_checkpoint(run)
    best = e.checkpoint == "best" and run.state.best_checkpoint is not None
    if run.accelerator.is_main_process:
        export_model(  # best: the run folder, whose lowest-eval-loss checkpoint is `checkpoint`
            checkpoint.parent if best else checkpoint, e.dir, best=best, dtype=e.dtype, max_shard_size=e.max_shard_size,
            push_to_hub=e.push_to_hub, private=e.private, revision=e.revision, overwrite=e.overwrite,
            commit_message=e.commit_message, license=e.license,
        )
    run.accelerator.wait_for_everyone()
    return Path(e.dir)


__all__ = ["adapt", "exported_checkpoint", "evaluate_after_training", "export_after_training"]
