"""Export a trained run: one folder anyone can load with `trust_remote_code=True`, optionally pushed to the Hub.

    from ttt_adapt.export import export_model
    export_model("runs/tiny", "exports/tiny", dtype="bfloat16", push_to_hub="me/tiny-ttt", revision="v1")

`export_model` takes a training `output_dir` (its latest checkpoint) or one `checkpoint-N` folder, rebuilds the
model the recipe trained with the checkpoint's weights (`ttt_adapt.training.checkpoints.load_checkpoint_model`: loaded
strictly, finite, LoRA merged), and writes: `config.json` (the `ttt_*` model_type, `auto_map`, the TTT
settings, the base model's id), the modeling files, safetensors weights (sharded with an index above
`max_shard_size`), the tokenizer, `generation_config.json` and a `README.md` model card.

`refresh_code(folder)` repairs an export made with older code: it rewrites the modeling files and the config
metadata to this version's code (tested with the transformers range in `TESTED_TRANSFORMERS`) without touching
the weights, and can push the changed files.

The folder is written next to `out` under a hidden temporary name and renamed into place once complete, so a
failed export leaves `out` as it was. Bad input raises `ExportError` (one line); a failed push raises
`PushError` (one line) and leaves the export on disk. The Hub token is never read here except to scrub it
from error messages: `huggingface_hub` finds it (`HF_TOKEN` or `hf auth login`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import uuid
from pathlib import Path

import torch
import yaml
from huggingface_hub import create_branch, create_repo, get_token, hf_hub_download, metadata_load, upload_folder
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import safe_open

from ttt_adapt import modeling
from ttt_adapt._util import DTYPES, RecipeError, first_line, parse_size
from ttt_adapt.config import HUB_REPO_ID, build_recipe, looks_like_local_path
from ttt_adapt.model_setup import load_tokenizer
from ttt_adapt.modeling.configuration_ttt import TESTED_TRANSFORMERS
from ttt_adapt.training.checkpoints import (STATE_FILE, CheckpointError, latest_checkpoint, list_checkpoints,
                                            load_checkpoint_model)

REPORT = Path("eval") / "report.json"
BRANCH = re.compile(r"^(?!-)(?!.*\.\.)[\w.\-/]+(?<![./])$")
CODE_NOTE = re.compile(r"<!-- ttt-adapt:code -->.*?<!-- /ttt-adapt:code -->\n?", re.DOTALL)


class ExportError(RecipeError):
    """Bad export input (missing checkpoint, a folder with no run, unknown dtype, bad repo id, ...); one line."""


class PushError(ExportError):
    """The export is on disk but pushing it to the Hub failed; one line."""


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
        tokenizer = load_tokenizer(recipe)
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot load the tokenizer of {recipe.model.name_or_path!r}: {first_line(e)}") from None
    model.to(torch_dtype)
    model.config.dtype = torch_dtype
    model.config.use_cache = True  # training turned it off; generation wants it
    card = render_model_card(
        model.config, recipe, state, checkpoint, report=report, best=best,
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
    classes = modeling.CAUSAL_LM_BY_TYPE
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
        model = modeling.CAUSAL_LM_BY_TYPE[config.model_type](config)
    expected = set(model.state_dict())
    tied = set(model._tied_weights_keys or {}) if config.tie_word_embeddings else set()
    missing, unexpected = expected - stored - tied, stored - expected
    if missing or unexpected:
        raise ExportError(
            f"the weights in {folder} do not fit this version's model code: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}; nothing was changed"
        )


def code_note() -> str:
    """The model card's line about the modeling code (replaced by `refresh_code`)."""
    lo, hi = TESTED_TRANSFORMERS
    return (
        "<!-- ttt-adapt:code -->\n## Modeling code\n\nThe modeling files of this folder are tested with transformers "
        f"{lo} to {hi} (`config.json`: `ttt_code`). They refuse older releases, and every cached forward checks that "
        "the attention cache and the fast weights have read the same tokens, stopping with an error rather than "
        "generating wrong tokens under a release that routes the cache differently; `scripts/export.py "
        "--refresh-code` of a newer ttt-adapt updates them without touching the weights.\n<!-- /ttt-adapt:code -->\n"
    )


def with_code_note(card: str) -> str:
    """`card` with its modeling-code note replaced by the current one (added before Usage, or at the end)."""
    if CODE_NOTE.search(card):
        return CODE_NOTE.sub(lambda _: code_note(), card, count=1)
    at = card.find("## Usage")
    return card[:at] + code_note() + "\n" + card[at:] if at >= 0 else card.rstrip("\n") + "\n\n" + code_note()


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


def check_hub_target(repo_id: str, revision: str | None = None) -> None:
    """`repo_id` must be ORG/NAME as the Hub accepts it; `revision` a plausible branch name."""
    if not isinstance(repo_id, str) or not HUB_REPO_ID.match(repo_id):
        raise ExportError(f"push_to_hub must be a Hub repo id ORG/NAME, got {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ExportError(f"push_to_hub: {first_line(e)}") from None
    if revision is not None and not BRANCH.match(revision):
        raise ExportError(f"revision must be a branch name such as main or v1, got {revision!r}")


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
    """The checkpoint's recipe (validated, without its `export` section) and the `export.license` it names."""
    path = checkpoint / "recipe.yaml"
    if not path.is_file():
        raise ExportError(f"{checkpoint} holds no recipe.yaml: not a checkpoint written by ttt_adapt's training")
    try:
        raw = yaml.safe_load(path.read_text())
        # The export settings describe the training run's own export (its folder may exist by now): not ours.
        export = raw.pop("export", None) or {}
        # Nor is the training data read here: it may be gone, so its files are not checked.
        data = raw.get("data")
        if isinstance(data, dict):
            raw["data"] = dict(data, path="unused-by-export", eval_path=None)
        recipe = build_recipe(raw)
        if isinstance(data, dict):
            recipe.data = dataclasses.replace(recipe.data, path=data.get("path"), eval_path=data.get("eval_path"))
        return recipe, export.get("license")
    except (RecipeError, yaml.YAMLError, AttributeError) as e:
        raise ExportError(f"{path}: {first_line(e)}") from None


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


# ------------------------------------------------------------------------------------------------ model card


def render_model_card(config, recipe, state: dict, checkpoint: Path, *, report=None, license="other",
                      repo_id=None, revision=None, best: bool = False) -> str:
    """The README.md: Hub metadata, TTT settings, training summary, evaluation table, usage."""
    base = recipe.model.name_or_path
    family = config.model_type.removeprefix("ttt_")
    metadata = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "license": license,
        "tags": ["in-place-ttt", "test-time-training", "long-context", "ttt-adapt", family, "custom_code"],
    }
    if not looks_like_local_path(base):  # the Hub only links Hub ids
        metadata.update(base_model=base, base_model_relation="finetune")
    name = repo_id.split("/")[-1] if repo_id else Path(checkpoint).parent.name
    shown_base = base if not looks_like_local_path(base) else f"a local checkpoint ({Path(base).name})"
    t = recipe.train
    trained = f"{t.trainable} parameters" + (f" + LoRA r={t.lora.r} (merged)" if t.lora.r else "")
    parts = [
        f"---\n{yaml.safe_dump(metadata, sort_keys=False)}---\n",
        f"# {name}\n",
        f"In-Place Test-Time Training version of {shown_base}, made with ttt-adapt: the MLPs of layers "
        f"{config.ttt['layers']} update their `down_proj` as fast weights, chunk by chunk, while reading "
        "a sequence, so the model keeps adapting to long contexts at inference time.\n",
        "## TTT settings\n",
        _table(["setting", "value"], [[k, _fmt(v)] for k, v in config.ttt.items()]),
        "## Training\n",
        _table(["", ""], [
            ["base model", shown_base],
            ["steps", _fmt(state.get("step"))],
            ["tokens", f"{state['tokens']:,}" if isinstance(state.get("tokens"), int) else "?"],
            ["trained", trained],
            ["sequence length", _fmt(recipe.data.seq_len)],
            ["rows per step", f"{t.batch_size} x {t.grad_accum} (x data-parallel processes)"],
            ["learning rate", f"{_fmt(t.lr)} (TTT parameters {_fmt(t.ttt_lr if t.ttt_lr is not None else t.lr)})"],
            ["checkpoint", f"{Path(checkpoint).name} (step {_fmt(state.get('step'))}"
                           + (", the lowest eval loss of the run)" if best else ")")],
            *([["eval loss at that step", _fmt(state["eval_loss"])]] if state.get("eval_loss") is not None else []),
        ]),
        "<details><summary>Recipe</summary>\n\n```yaml\n"
        + yaml.safe_dump(_public({k: v for k, v in recipe.to_dict().items() if k != "export"}), sort_keys=False)
        + "```\n\n</details>\n",
    ]
    if report:
        parts += ["## Evaluation\n", eval_table(report)]
    load_from = repo_id or "path/to/this/folder"
    pin = f', revision="{revision}"' if revision else ""
    parts += [
        code_note(),
        "## Usage\n",
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'tokenizer = AutoTokenizer.from_pretrained("{load_from}"{pin})\n'
        f'model = AutoModelForCausalLM.from_pretrained("{load_from}", trust_remote_code=True{pin})\n'
        'inputs = tokenizer("A long document ...", return_tensors="pt")\n'
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))\n```\n",
        "`trust_remote_code=True` runs the Python files of this repository (`configuration_ttt.py`, "
        "`modeling_ttt.py`, `ttt_layer.py`; they need only torch and transformers). Read them, then pin "
        "`revision` to the commit you read so later pushes cannot change the code you run.\n",
    ]
    return "\n".join(parts)


def eval_table(report: dict) -> str:
    """A markdown table of an evaluation report: one row per metric, one column per model (`base`, `adapted`,
    any other entry holding metrics), plus adapted - base. Position bins are labelled from the report's
    `bins` / `bin_edges` / `position_bins` list when it has one."""
    models = [k for k in ("base", "converted", "adapted") if isinstance(report.get(k), dict)]
    metadata = ("settings", "models")  # how the evaluation ran, not a model's results
    models += [k for k, v in report.items() if isinstance(v, dict) and k not in models + list(metadata) and _flatten(v)]
    labels = next((report[k] for k in ("bins", "position_bins", "bin_edges") if isinstance(report.get(k), list)), None)
    flat = {m: _flatten(report[m], bins=labels) for m in models}
    rows = list(dict.fromkeys(key for m in models for key in flat[m]))
    delta = "base" in flat and "adapted" in flat
    header = ["metric", *models] + (["adapted - base"] if delta else [])
    body = []
    for key in rows:
        values = [flat[m].get(key) for m in models]
        row = [key, *(_fmt(v) if v is not None else "" for v in values)]
        if delta:
            a, b = flat["adapted"].get(key), flat["base"].get(key)
            row.append(f"{a - b:+.4g}" if a is not None and b is not None else "")
        body.append(row)
    return _table(header, body)


def _flatten(value, prefix: str = "", bins=None) -> dict:
    """Nested dicts/lists of numbers -> {"a / b": number}; lists as long as `bins` (or one shorter, for edges)
    are labelled by bin."""
    if isinstance(value, bool):
        return {}
    if isinstance(value, (int, float)):
        return {prefix: value}
    out = {}
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = [(_bin_label(bins, i, len(value)), v) for i, v in enumerate(value)]
    else:
        return out
    for key, v in items:
        out.update(_flatten(v, f"{prefix} / {key}" if prefix else str(key), bins))
    return out


def _bin_label(bins, i: int, n: int) -> str:
    if bins and len(bins) == n:
        b = bins[i]
        return f"{b[0]}-{b[1]}" if isinstance(b, (list, tuple)) and len(b) == 2 else str(b)
    if bins and len(bins) == n + 1:
        return f"{bins[i]}-{bins[i + 1]}"
    return str(i)


def _table(header: list, rows: list[list]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "null" if v is None else str(v)


def _public(d):
    """The recipe without local directory names: a local path is shown by its last component."""
    if isinstance(d, dict):
        return {k: _public(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_public(v) for v in d]
    if isinstance(d, str) and os.sep in d and looks_like_local_path(d):
        return Path(d).name
    return d


def base_license(name_or_path: str) -> str | None:
    """The `license` in the base model's model card (a local README.md, or the Hub's), if any."""
    try:
        card = Path(name_or_path) / "README.md"
        if looks_like_local_path(name_or_path):
            meta = metadata_load(card) if card.is_file() else None
        else:
            meta = metadata_load(hf_hub_download(name_or_path, "README.md"))
    except Exception:  # offline, no card, malformed YAML: the card then says "other"
        return None
    return (meta or {}).get("license")


# ------------------------------------------------------------------------------------------------ the Hub


def push_folder(folder, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, allow_patterns: list[str] | None = None) -> str:
    """Upload `folder` (or its files matching `allow_patterns`) to the Hub model repo `repo_id` (created if
    missing, on branch `revision`, created from main if missing); return the commit URL. Raise `PushError` (one
    line, token scrubbed) on any failure."""
    check_hub_target(repo_id, revision)
    message = commit_message or f"Upload In-Place TTT model ({Path(folder).name})"
    try:
        create_repo(repo_id, private=private or None, exist_ok=True)  # None: the account's default visibility
        if revision not in (None, "main"):
            create_branch(repo_id, branch=revision, exist_ok=True)
        info = upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision, commit_message=message,
                             allow_patterns=allow_patterns)
    except Exception as e:  # network, auth, offline mode, quota ...: all mean "not pushed"; say why in one line
        raise PushError(f"push to {repo_id} failed ({_push_reason(e)}); the export is kept in {folder}") from None
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")


def _push_reason(e: Exception) -> str:
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status in (401, 403):
        reason = f"HTTP {status}: no write access; log in with `hf auth login` or set HF_TOKEN to a write token"
    else:
        reason = f"{type(e).__name__}: {first_line(e)}"
    token = get_token()
    return reason.replace(token, "***") if token else reason


__all__ = ["export_model", "refresh_code", "resolve_checkpoint", "name_report_checkpoint", "push_folder", "render_model_card", "ExportError", "PushError"]
