"""Export a trained run: one folder anyone can load with `trust_remote_code=True`, optionally pushed to the Hub.

    from ttt_adapt.export.folder import export_model
    export_model("runs/tiny", "exports/tiny", dtype="bfloat16", push_to_hub="me/tiny-ttt", revision="v1")

`export_model` takes a training `output_dir` (its latest checkpoint) or one `checkpoint-N` folder, rebuilds the
model the recipe trained with the checkpoint's weights (`ttt_adapt.training.checkpoints.load_checkpoint_model`: loaded
strictly, finite, LoRA merged), and writes: `config.json` (the `ttt_*` model_type, `auto_map`, the TTT
settings, the base model's id), the modeling files, safetensors weights (sharded with an index above
`max_shard_size`), the tokenizer (with the chat template the run trained with, `data.chat_template_path`, if any),
`generation_config.json` (stopping at the chat template's end-of-turn token too) and a `README.md` model card.

`refresh_code(folder)` repairs an export made with older code: it rewrites the modeling files and the config
metadata to this version's code (tested with the transformers range in `TESTED_TRANSFORMERS`) without touching
the weights, and can push the changed files.

The folder is written next to `out` under a hidden temporary name and renamed into place once complete, so a
failed export leaves `out` as it was (`staging`). Bad input raises `ExportError` (one line); a failed push
(`ttt_adapt.export.hub`) raises `PushError` (one line) and leaves the export on disk. The model card is
`ttt_adapt.export.card`'s.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import uuid
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

from ttt_adapt import modeling
from ttt_adapt._util import DTYPES, RecipeError, first_line, parse_size
from ttt_adapt.data.chat import end_of_turn_id
from ttt_adapt.export import ExportError
from ttt_adapt.export.card import base_license, render_model_card, with_code_note
from ttt_adapt.export.hub import check_hub_target, push_folder
from ttt_adapt.model_setup import recipe_tokenizer
from ttt_adapt.recipe.loading import build_recipe
from ttt_adapt.training.checkpoints import (STATE_FILE, CheckpointError, latest_checkpoint, list_checkpoints,
                                            load_checkpoint_model)

REPORT = Path("eval") / "report.json"


def export_model(
    checkpoint_or_run_dir,
    out,
    *,
    dtype: str = "bfloat16",
    max_shard_size: str | int = "5GB",
    push_to_hub: str | None = None,
    private: bool = False,
    revision: str | None = None,
    overwrite: bool = False,
    commit_message: str | None = None,
    license: str | None = None,
    eval_report=None,
    best: bool = False,
) -> Path:
    """Write the model of a run's checkpoint to `out` (atomically) and optionally push it; return `out`.

    Args:
        checkpoint_or_run_dir: a training `output_dir` (its latest complete checkpoint is used) or a
            `checkpoint-N` folder.
        out: the export folder; an existing non-empty one is refused unless `overwrite`.
        dtype: bfloat16, float16 or float32 weights.
        max_shard_size: weights larger than this are split into shards plus an index (`"5GB"`, `"500MB"`, bytes).
        push_to_hub: `ORG/NAME` to upload the folder to (created if needed, `private` if new).
        revision: the Hub branch to push to (created from main if needed); `None` is main.
        commit_message: the Hub commit message.
        license: the card's license; default the recipe's `export.license`, else the base model's, else "other".
        eval_report: an evaluation `report.json`; default `<output_dir>/eval/report.json` if it describes this
            checkpoint.
        best: export the run's checkpoint with the lowest eval loss (`checkpoint_or_run_dir` is a run folder).
    """
    checkpoint = resolve_checkpoint(checkpoint_or_run_dir, best)
    torch_dtype = parse_dtype(dtype)
    try:
        shard_bytes = parse_size(max_shard_size)
    except ValueError as e:
        raise ExportError(f"max_shard_size: {e}") from None
    if push_to_hub is not None:
        check_hub_target(push_to_hub, revision)
    out = check_out(Path(out), checkpoint, overwrite)
    recipe, recipe_license = read_recipe(checkpoint)
    state = _read_json(checkpoint / STATE_FILE)
    report_path = Path(eval_report) if eval_report is not None else checkpoint.parent / REPORT
    if eval_report is not None and not report_path.is_file():
        raise ExportError(f"no such evaluation report: {report_path}")
    report = _read_json(report_path) if report_path.is_file() else None
    if eval_report is None and report is not None and report.get("checkpoint", latest_checkpoint(checkpoint.parent)
                                                                  .name) != checkpoint.name:
        report = None  # the run's report describes another checkpoint

    try:
        model = load_checkpoint_model(checkpoint, recipe)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    try:
        tokenizer = recipe_tokenizer(recipe)
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot load the tokenizer of {recipe.model.name_or_path!r}: {first_line(e)}") from None
    record_state_norms(model.config, report)
    model.to(torch_dtype)
    model.config.dtype = torch_dtype
    model.config.use_cache = True  # training turned it off; generation wants it
    chat = isinstance(getattr(tokenizer, "chat_template", None), str)
    if chat:
        stop_at_end_of_turn(model.generation_config, end_of_turn_id(tokenizer, recipe.data.chat_template_kwargs))
    card = render_model_card(
        model.config, recipe, state, checkpoint, report=report, best=best, chat=chat,
        license=license or recipe_license or base_license(recipe.model.name_or_path) or "other",
        repo_id=push_to_hub, revision=revision,
    )
    with staging(out, overwrite) as tmp:
        model.save_pretrained(tmp, max_shard_size=shard_bytes)
        tokenizer.save_pretrained(tmp)
        if not (tmp / "generation_config.json").is_file():
            model.generation_config.save_pretrained(tmp)
        (tmp / "README.md").write_text(card)
    if push_to_hub is not None:
        push_folder(out, push_to_hub, private=private, revision=revision, commit_message=commit_message)
    return out


def record_state_norms(config, report: dict | None) -> None:
    """Write the largest fast-weight state norms the evaluation measured on held-out rows of the training length
    (`report["adapted"]["state_norms"]`) into `config.ttt["state_norm_limit"]`, the shipped code's guard reference;
    a limit the recipe set stays, and a report of other TTT layers is ignored."""
    norms = ((report or {}).get("adapted") or {}).get("state_norms")
    ttt = dict(config.ttt)
    if ttt.get("state_norm_limit") is not None or not norms or norms.get("layers") != ttt["layers"]:
        return
    if all(v > 0 for v in norms["max"]):
        config.ttt = {**ttt, "state_norm_limit": [float(v) for v in norms["max"]]}


def stop_at_end_of_turn(generation_config, token_id: int | None) -> None:
    """Add the chat template's end-of-turn token to the generation config's stop tokens (`eos_token_id`)."""
    if token_id is None:
        return
    eos = generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if token_id not in eos:
        eos.append(token_id)
    generation_config.eos_token_id = eos[0] if len(eos) == 1 else eos


def refresh_code(folder, *, push_to_hub: str | None = None, private: bool = False, revision: str | None = None,
                 commit_message: str | None = None) -> Path:
    """Rewrite an export's modeling files, `config.json` metadata and model-card note to this version's code.

    The weights are not read or rewritten: the new folder links to the same files. It is staged next to `folder`,
    checked (the config loads with the new code, the stored weight names are exactly the new model's) and renamed
    into place, so a failure leaves `folder` as it was. With `push_to_hub`, only the changed files are uploaded.
    """
    folder = Path(folder)
    if push_to_hub is not None:
        check_hub_target(push_to_hub, revision)
    config = read_export_config(folder)
    check_weight_names(folder, config)
    with staging(folder, overwrite=True) as tmp:
        shutil.copytree(folder, tmp, dirs_exist_ok=True, copy_function=_link_or_copy,
                        ignore=shutil.ignore_patterns(*modeling.SHIPPED_FILES, "config.json"))
        package = Path(modeling.__file__).parent
        for name in modeling.SHIPPED_FILES:
            shutil.copyfile(package / name, tmp / name)
        config.save_pretrained(tmp)
        card = tmp / "README.md"
        if card.is_file():
            text = card.read_text()
            card.unlink()  # a hard link to the old card: never write through it
            card.write_text(with_code_note(text))
        read_export_config(tmp)  # what the new files say must load
    if push_to_hub is not None:
        changed = [*modeling.SHIPPED_FILES, "config.json", "README.md"]
        push_folder(folder, push_to_hub, private=private, revision=revision, allow_patterns=changed,
                    commit_message=commit_message or "Refresh the In-Place TTT modeling code (weights unchanged)")
    return folder


def read_export_config(folder: Path):
    """The TTT config of an export folder, read with this version's config classes (ExportError if not one)."""
    if not folder.is_dir():
        raise ExportError(f"no such export folder: {folder}")
    path = folder / "config.json"
    if not path.is_file():
        raise ExportError(f"{folder} is not an export: it holds no config.json")
    raw = _read_json(path)
    classes = _ttt_causal_lms()
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in classes:
        raise ExportError(
            f"{folder} holds a {model_type!r} model, not an In-Place TTT export ({', '.join(sorted(classes))})"
        )
    try:
        return classes[model_type].config_class.from_pretrained(folder)
    except (ValueError, TypeError, OSError) as e:
        raise ExportError(f"{path} does not load with this version's TTT config: {first_line(e)}") from None


def check_weight_names(folder: Path, config) -> None:
    """The tensors stored in `folder` must be exactly those of the model `config` describes (tied ones aside)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{folder} holds no safetensors weights")
    stored = set()
    for f in files:
        with safe_open(str(f), framework="pt") as weights:
            stored.update(weights.keys())
    with torch.device("meta"):
        model = _ttt_causal_lms()[config.model_type](config)
    expected = set(model.state_dict())
    tied = set(model._tied_weights_keys or {}) if config.tie_word_embeddings else set()
    missing, unexpected = expected - stored - tied, stored - expected
    if missing or unexpected:
        raise ExportError(
            f"the weights in {folder} do not fit this version's model code: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}; nothing was changed"
        )


def _ttt_causal_lms() -> dict:
    """{ttt_* model_type: TTT causal LM class} of every family (`ttt_adapt.modeling.FAMILIES`)."""
    return {lm.config_class.model_type: lm for lm in modeling.FAMILIES.values()}


def _link_or_copy(src, dst):
    """Hard-link (the weights are not copied); copy where the filesystem cannot link."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


# ------------------------------------------------------------------------------------------------ inputs


def resolve_checkpoint(path, best: bool = False) -> Path:
    """The checkpoint folder to export: `path` itself if it is one, else the latest checkpoint of a run, or with
    `best` the run's checkpoint with the lowest eval loss recorded in its `trainer_state.json`."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"no such checkpoint or run folder: {path}")
    if not path.is_dir():
        raise ExportError(f"not a folder: {path} (give a training output_dir or a checkpoint-N folder)")
    if (path / STATE_FILE).is_file():
        if best:
            raise ExportError(f"--best picks a checkpoint of a run: give the run folder {path.parent}, not {path.name}")
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise ExportError(f"{path} holds no run: no checkpoint-N folder with a {STATE_FILE} in it")
    if not best:
        return latest
    scored = [(state["eval_loss"], c) for c in list_checkpoints(path)
              if isinstance((state := _read_json(c / STATE_FILE)).get("eval_loss"), (int, float))
              and math.isfinite(state["eval_loss"])]
    if not scored:
        raise ExportError(f"{path} holds no checkpoint with an eval loss (a run without eval data, or with "
                          "train.keep_best=false): export the last one (without --best)")
    return min(scored, key=lambda x: x[0])[1]


def name_report_checkpoint(report: Path, checkpoint: Path) -> None:
    """Record in an evaluation `report.json` the checkpoint it evaluated (the export's card shows it only then)."""
    data = _read_json(report)
    data["checkpoint"] = Path(checkpoint).name
    tmp = report.with_name(f".{report.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, report)


def parse_dtype(dtype) -> torch.dtype:
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def check_out(out: Path, checkpoint: Path, overwrite: bool) -> Path:
    """Refuse an `out` that is a file, is non-empty without `overwrite`, or would swallow the checkpoint."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"the export folder is a file: {out}")
    resolved = out.resolve()
    if resolved == checkpoint.resolve() or resolved in checkpoint.resolve().parents:
        raise ExportError(f"the export folder {out} would replace the checkpoint it exports ({checkpoint})")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    return out


def read_recipe(checkpoint: Path):
    """The checkpoint's recipe (validated; its files are not looked at: the training data may be gone by now)
    and the `export.license` it names."""
    path = checkpoint / "recipe.yaml"
    if not path.is_file():
        raise ExportError(f"{checkpoint} holds no recipe.yaml: not a checkpoint written by ttt_adapt.training")
    try:
        recipe = build_recipe(yaml.safe_load(path.read_text()))
    except (RecipeError, yaml.YAMLError, AttributeError) as e:
        raise ExportError(f"{path}: {first_line(e)}") from None
    return recipe, recipe.export.license


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read {path}: {first_line(e)}") from None


# ------------------------------------------------------------------------------------------------ the folder


@contextlib.contextmanager
def staging(out: Path, overwrite: bool):
    """Yield an empty hidden sibling of `out`; on success rename it to `out` (replacing it), else delete it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp, old = out.with_name(f".{out.name}.tmp-{tag}"), out.with_name(f".{out.name}.old-{tag}")
    tmp.mkdir()  # not tempfile.mkdtemp: its 0700 mode would survive the rename
    try:
        yield tmp
        if out.is_dir() and any(out.iterdir()) and not overwrite:  # something appeared meanwhile
            raise ExportError(f"{out} was filled by someone else during the export; nothing was replaced")
        if out.exists():
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            if old.exists():
                os.replace(old, out)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


__all__ = ["export_model", "refresh_code", "staging", "read_export_config", "resolve_checkpoint", "name_report_checkpoint"]
