"""Export: a folder that reloads without ttt_adapt (trust_remote_code), LoRA merged, atomic writes, the model card,
the CLI's one-line errors, and the Hub push at the client's API boundary (no network)."""

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import metadata_load
from huggingface_hub.errors import HfHubHTTPError
from safetensors.torch import load_file, load_model, save_file
from conftest import BLOCK_TTT_ADAPT, DEVICE, make_tiny_files, recipe_dict, script_main, write_recipe

import ttt_adapt.export.card as card_module
import ttt_adapt.export.folder as folder_module
import ttt_adapt.export.hub as hub_module
from ttt_adapt.eval.report import markdown_table
from ttt_adapt.export import ExportError, PushError
from ttt_adapt.export.card import render_model_card
from ttt_adapt.export.folder import export_model
from ttt_adapt.model_setup import build_model
from ttt_adapt.pipeline import adapt
from ttt_adapt.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
SECRET = "hf_export_test_SeCrEtToKeN_0123456789"
# fp32 reload is exact (on every device: the reload runs the same kernels on the same device as the expected logits);
# merged LoRA differs by rounding; a bf16 cast in memory also rounds the rotary buffers
ATOL = {"plain": 0, "lora": 1e-5, "bf16": 1e-2}
MODELING_FILES = {"configuration_ttt.py", "modeling_ttt.py", "ttt_layer.py", "ttt_state.py"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished tiny runs: `plain` (TTT parameters, 2 steps, a checkpoint per step) and `lora` (1 step)."""
    root = tmp_path_factory.mktemp("export")
    files = make_tiny_files(root)
    recipes = {}
    for name, settings in (("plain", {"max_steps": 2, "save_every": 1}),
                           ("lora", {"max_steps": 1, "lora": {"r": 4, "alpha": 8}})):
        (root / name).mkdir()
        raw = recipe_dict(files, root / name, batch_size=1, grad_accum=1, **settings)
        recipes[name] = load_recipe(write_recipe(root / name / "recipe.yaml", raw))
        adapt(recipes[name])
    return {"root": root, "base": files["base"], **recipes}


@pytest.fixture(scope="module")
def exports(runs):
    """fp32 exports of both runs (from their output_dir) and a bf16 export split into several shards."""
    root = runs["root"] / "exports"
    return {
        "plain": export_model(runs["plain"].train.output_dir, root / "plain", dtype="float32"),
        "lora": export_model(runs["lora"].train.output_dir, root / "lora", dtype="float32"),
        "bf16": export_model(runs["plain"].train.output_dir, root / "bf16", dtype="bfloat16", max_shard_size="30KB"),
    }


def trained_model(recipe, step):
    """The model as training left it: the recipe's model with the checkpoint's weights (LoRA unmerged)."""
    model = build_model(recipe)
    load_model(model, Path(recipe.train.output_dir) / f"checkpoint-{step}" / "model.safetensors")
    return model.eval()


# ---------------------------------------------------------------------------------------------- reload


RELOAD = BLOCK_TTT_ADAPT + textwrap.dedent(
    """
    import json
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForCausalLM, pipeline
    for case in json.loads(sys.argv[1]):
        expected = load_file(case["expected"], device=case["device"])
        lm = AutoModelForCausalLM.from_pretrained(case["folder"], trust_remote_code=True).eval().to(case["device"])
        assert type(lm).__name__ == "TTTQwen3ForCausalLM", type(lm).__name__
        assert lm.dtype == getattr(torch, case["dtype"]), lm.dtype
        with torch.no_grad():
            torch.testing.assert_close(lm(expected["ids"]).logits, expected["logits"], rtol=0, atol=case["atol"])
            if "hidden" in expected:
                model = AutoModel.from_pretrained(case["folder"], trust_remote_code=True).eval().to(case["device"])
                assert type(model).__name__ == "TTTQwen3Model", type(model).__name__
                torch.testing.assert_close(model(expected["ids"]).last_hidden_state, expected["hidden"], rtol=0, atol=0)
        if case["pipeline"]:
            generate = pipeline("text-generation", model=case["folder"], trust_remote_code=True)
            text = generate("abc de", max_new_tokens=6, do_sample=False)[0]["generated_text"]
            assert text.startswith("abc de") and len(text) > len("abc de"), text
            # the model card's usage, as a user copies it (stdin closed: a trust_remote_code prompt fails here)
            card = open(case["folder"] + "/README.md").read()
            usage = card.split("## Usage")[1].split("```python")[1].split("```")[0]
            exec(usage.replace("path/to/this/folder", case["folder"]), {})
        print("ok", case["folder"])
    """
)


def test_exports_reload_without_ttt_adapt_and_give_the_trained_logits(runs, exports, tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(3, 33, (2, 40)).to(DEVICE)  # longer than one chunk (32): the trained fast-weight path is used
    plain, lora = trained_model(runs["plain"], 2).to(DEVICE), trained_model(runs["lora"], 1).to(DEVICE)
    with torch.no_grad():
        untrained = build_model(runs["plain"]).eval().to(DEVICE)(ids).logits
        expected = {
            "plain": {"ids": ids, "logits": plain(ids).logits, "hidden": plain.model(ids).last_hidden_state},
            "lora": {"ids": ids, "logits": lora(input_ids=ids).logits},  # peft forward, LoRA not merged
            "bf16": {"ids": ids, "logits": plain.to(torch.bfloat16)(ids).logits},
        }
    assert not torch.allclose(expected["plain"]["logits"], untrained)  # training changed the outputs
    cases = []
    for name, tensors in expected.items():
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp_path / f"{name}.safetensors"))
        cases.append({"folder": str(exports[name]), "expected": str(tmp_path / f"{name}.safetensors"), "device": DEVICE,
                      "dtype": "bfloat16" if name == "bf16" else "float32", "atol": ATOL[name],
                      "pipeline": name == "plain"})
    (tmp_path / "reload.py").write_text(RELOAD)
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="")
    proc = subprocess.run([sys.executable, str(tmp_path / "reload.py"), json.dumps(cases)], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ok ") == 3
    assert "Do you wish to run the custom code?" not in proc.stdout  # transformers' prompt (15 s in a terminal)


# ---------------------------------------------------------------------------------------------- the folder


def test_export_folder_holds_config_code_weights_tokenizer_and_card(runs, exports):
    folder = exports["plain"]
    files = {p.name for p in folder.iterdir()}
    assert MODELING_FILES | {"config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json",
                             "README.md"} <= files
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "ttt_qwen3" and config["dtype"] == "float32" and config["use_cache"] is True
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    assert config["ttt"] == dict(runs["plain"].ttt.to_dict(), layers=[1, 3])
    assert config["base_model_name_or_path"] == str(runs["base"])

    sharded = exports["bf16"]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2 and shards <= {p.name for p in sharded.iterdir()}
    assert not (sharded / "model.safetensors").exists()
    assert all(t.dtype == torch.bfloat16 for s in shards for t in load_file(sharded / s).values())

    card = (folder / "README.md").read_text()
    meta = metadata_load(folder / "README.md")
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "other" and "in-place-ttt" in meta["tags"]
    assert "base_model" not in meta  # a local base has no Hub id to link
    state = json.loads((Path(runs["plain"].train.output_dir) / "checkpoint-2" / "trainer_state.json").read_text())
    assert "| steps | 2 |" in card and f"| tokens | {state['tokens']:,} |" in card
    assert "| chunk_size | 32 |" in card and "checkpoint-2" in card
    assert str(runs["root"]) not in card  # local directories are not published
    assert "trust_remote_code=True" in card and "revision" in card


def test_lora_export_is_merged(exports):
    plain, lora = exports["plain"], exports["lora"]
    assert {p.name for p in lora.iterdir()} == {p.name for p in plain.iterdir()}  # no adapter_* files
    keys = set(load_file(lora / "model.safetensors"))
    assert keys == set(load_file(plain / "model.safetensors"))
    assert not [k for k in keys if "lora" in k or "modules_to_save" in k or "original_module" in k]
    assert "LoRA r=4 (merged)" in (lora / "README.md").read_text()


def test_model_card_eval_table_license_and_hub_metadata(runs, tmp_path):
    """A copied checkpoint with an evaluation report next to it and `export.license` in its recipe."""
    run = tmp_path / "run"
    checkpoint = run / "checkpoint-2"
    shutil.copytree(Path(runs["plain"].train.output_dir) / "checkpoint-2", checkpoint)
    raw = yaml.safe_load((checkpoint / "recipe.yaml").read_text())
    raw["export"]["license"] = "apache-2.0"
    raw["data"]["path"] = str(tmp_path / "deleted.jsonl")  # exporting needs no training data
    (checkpoint / "recipe.yaml").write_text(yaml.safe_dump(raw))
    (run / "eval").mkdir()
    report = {  # the evaluation's report.json (ttt_adapt.eval): the card shows its one table
        "bins": [0, 32, 64, 96],
        "settings": {"seq_len": 96, "seed": 0},  # how the evaluation ran: not a model column
        "base": {"loss_by_position": [3.5, 3.25, 3.0], "tasks": {"niah_single": {"64": 0.25}}},
        "adapted": {"loss_by_position": [3.5, 3.0, 2.5], "tasks": {"niah_single": {"64": 0.5}}},
        "adapted_swapped_state": {"documents": 8, "loss_by_position": [3.5, 3.125, 2.75]},
        "adapted_no_state": {"loss_by_position": [3.5, 3.25, 3.0]},
        "own_minus_swapped": {"documents": 8, "resamples": 1000, "confidence": 0.95, "loss_by_position": [
            {"mean": 0.0, "low": 0.0, "high": 0.0}, {"mean": -0.125, "low": -0.25, "high": -0.0625},
            {"mean": -0.25, "low": -0.5, "high": -0.125}]},
    }
    (run / "eval" / "report.json").write_text(json.dumps(report))
    out = export_model(checkpoint, tmp_path / "export", dtype="float32")
    card = (out / "README.md").read_text()
    assert metadata_load(out / "README.md")["license"] == "apache-2.0"
    assert markdown_table(report) in card
    assert "| metric | base | adapted | adapted, swapped state | adapted, no state | adapted - base |" in card
    assert "| loss, positions 64-96 | 3.0000 | 2.5000 | 2.7500 | 3.0000 | -0.5000 | -0.2500 [-0.5000, -0.1250] |" in card
    assert "| settings |" not in card and "| seq_len |" not in card

    from transformers import AutoConfig

    recipe = runs["plain"]
    hub_recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, name_or_path="Qwen/Qwen3-0.6B-Base"))
    card = render_model_card(AutoConfig.from_pretrained(out), hub_recipe, {"step": 2, "tokens": 192}, checkpoint,
                             repo_id="org/tiny-ttt", revision="v1")
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "Qwen/Qwen3-0.6B-Base" and meta["base_model_relation"] == "finetune"
    assert 'from_pretrained("org/tiny-ttt", trust_remote_code=True, revision="v1")' in card


# ---------------------------------------------------------------------------------------------- atomic


def test_export_is_atomic_and_refuses_to_overwrite(runs, exports, tmp_path, monkeypatch):
    run = runs["plain"].train.output_dir
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_model(run, out)
    with pytest.raises(ExportError, match="would replace the checkpoint"):
        export_model(run, run, overwrite=True)

    class BrokenTokenizer:
        def save_pretrained(self, folder):
            (Path(folder) / "tokenizer.json").write_text("{")  # half written, then the disk fills up
            raise OSError("No space left on device")

    monkeypatch.setattr(folder_module, "recipe_tokenizer", lambda recipe: BrokenTokenizer())
    with pytest.raises(OSError, match="No space left"):
        export_model(run, out, overwrite=True)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    export_model(run, out, dtype="float32", overwrite=True)
    assert {p.name for p in out.iterdir()} == {p.name for p in exports["plain"].iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_checkpoint_with_nonfinite_weights_is_not_exported(runs, tmp_path):
    """Training never saves one; a checkpoint from elsewhere (or edited) is refused before anything is written."""
    checkpoint = tmp_path / "run" / "checkpoint-2"
    shutil.copytree(Path(runs["plain"].train.output_dir) / "checkpoint-2", checkpoint)
    weights = load_file(checkpoint / "model.safetensors")
    name = next(k for k in weights if ".mlp.ttt." in k)
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ExportError, match=r"model.safetensors holds non-finite weights \(the run diverged\)"):
        export_model(checkpoint, tmp_path / "export", dtype="float32")
    assert not (tmp_path / "export").exists()


# ---------------------------------------------------------------------------------------------- the CLI


def export_main():
    return script_main("export")


def test_cli_bad_input_is_one_line_and_exit_2(runs, tmp_path, capsys):
    main = export_main()
    run = runs["plain"].train.output_dir
    (tmp_path / "empty").mkdir()
    cases = {
        "no such checkpoint": ["--checkpoint", tmp_path / "missing", "--out", tmp_path / "a"],
        "holds no run": ["--checkpoint", tmp_path / "empty", "--out", tmp_path / "a"],
        "invalid choice": ["--checkpoint", run, "--out", tmp_path / "a", "--dtype", "int8"],
        "ORG/NAME": ["--checkpoint", run, "--out", tmp_path / "a", "--push-to-hub", "not a repo"],
        "--": ["--checkpoint", run, "--out", tmp_path / "a", "--push-to-hub", "org/bad--name"],
        "max_shard_size": ["--checkpoint", run, "--out", tmp_path / "a", "--max-shard-size", "lots"],
        "required": ["--out", tmp_path / "a"],
    }
    for expected, argv in cases.items():
        assert main([str(a) for a in argv]) == 2, expected
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("export.py: error:") and expected in err, err
    assert not (tmp_path / "a").exists()

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "export.py"), "--checkpoint", str(tmp_path / "missing"),
                           "--out", str(tmp_path / "a")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no such checkpoint" in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------------------- the Hub


class FakeHub:
    """Stands in for huggingface_hub's create_repo / create_branch / upload_folder; records what was asked."""

    def __init__(self, fail=None):
        self.calls, self.fail = [], fail

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        self.calls.append(("upload_folder", kwargs["repo_id"], dict(kwargs, files=files)))
        if self.fail:
            raise self.fail
        return types.SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc")

    def install(self, monkeypatch):
        for name in ("create_repo", "create_branch", "upload_folder"):
            monkeypatch.setattr(hub_module, name, getattr(self, name))
        return self


def test_push_asks_for_the_right_repo_files_and_branch_and_never_shows_the_token(runs, tmp_path, monkeypatch,
                                                                                 capsys, caplog):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    caplog.set_level(logging.DEBUG)
    hub = FakeHub().install(monkeypatch)
    main = export_main()
    out = tmp_path / "export"
    argv = ["--checkpoint", str(runs["plain"].train.output_dir), "--out", str(out), "--dtype", "float32",
            "--push-to-hub", "org/tiny-ttt", "--private", "--revision", "exp-1", "--commit-message", "first export"]
    assert main(argv) == 0
    assert [c[0] for c in hub.calls] == ["create_repo", "create_branch", "upload_folder"]
    _, repo, kwargs = hub.calls[0]
    assert repo == "org/tiny-ttt" and kwargs["private"] is True and kwargs["exist_ok"] is True
    assert hub.calls[1][2]["branch"] == "exp-1"
    upload = hub.calls[2][2]
    assert Path(upload["folder_path"]) == out and upload["revision"] == "exp-1"
    assert upload["commit_message"] == "first export"
    assert upload["files"] == sorted(p.name for p in out.iterdir()) and "config.json" in upload["files"]
    assert all(not c[2].get("token") for c in hub.calls)  # huggingface_hub resolves the token itself
    assert 'revision="exp-1"' in (out / "README.md").read_text()
    printed = capsys.readouterr()
    assert "pushed to https://huggingface.co/org/tiny-ttt" in printed.out

    # A refused upload: one line, exit 1, the export stays on disk; the token appears nowhere.
    response = types.SimpleNamespace(status_code=403, headers={}, request=None)
    hub = FakeHub(fail=HfHubHTTPError(f"403 Forbidden for token {SECRET}", response=response)).install(monkeypatch)
    argv = ["--checkpoint", str(runs["plain"].train.output_dir), "--out", str(tmp_path / "kept"),
            "--push-to-hub", "org/tiny-ttt"]
    assert main(argv) == 1
    failed = capsys.readouterr()
    last = failed.err.strip().split("\n")[-1]  # above it: the export's progress bars
    assert last.startswith("export.py: error: push to org/tiny-ttt failed") and "no write access" in last
    assert str(tmp_path / "kept") in last and "Traceback" not in failed.err
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"] and hub.calls[1][2]["revision"] is None
    assert hub.calls[0][2]["private"] is None  # not --private: the account's default visibility
    assert (tmp_path / "kept" / "config.json").is_file()

    hub = FakeHub(fail=ConnectionError(f"cannot reach huggingface.co (token={SECRET})")).install(monkeypatch)
    with pytest.raises(PushError, match="ConnectionError") as err:
        hub_module.push_folder(out, "org/tiny-ttt")
    assert SECRET not in str(err.value) and "***" in str(err.value)

    seen = printed.out + printed.err + failed.out + failed.err + caplog.text
    assert SECRET not in seen
    for folder in (out, tmp_path / "kept"):
        assert not [p for p in folder.iterdir() if SECRET in p.read_text(errors="ignore")]


# ---------------------------------------------------------------------------------------------- refresh


def test_refresh_code_rewrites_code_and_metadata_not_weights(exports, tmp_path, monkeypatch, capsys):
    from ttt_adapt import modeling
    from ttt_adapt.modeling.configuration_ttt import TESTED_TRANSFORMERS

    folder = tmp_path / "published"
    shutil.copytree(exports["plain"], folder)
    # Make it an export of older code: other modeling files, stale metadata, a card without the code note.
    (folder / "modeling_ttt.py").write_text((folder / "modeling_ttt.py").read_text() + "\n# older code\n")
    config = json.loads((folder / "config.json").read_text())
    config["ttt_code"] = {"transformers_tested": ["5.0.0", "5.23.0"]}
    (folder / "config.json").write_text(json.dumps(config))
    card = card_module.CODE_NOTE.sub("", (folder / "README.md").read_text())
    (folder / "README.md").write_text(card)
    weights = folder / "model.safetensors"
    before = {"inode": weights.stat().st_ino, "bytes": weights.read_bytes()}

    main = export_main()
    for _ in range(2):  # idempotent
        assert main(["--refresh-code", str(folder)]) == 0
    assert "refreshed the modeling code" in capsys.readouterr().out
    package = Path(modeling.__file__).parent
    for name in MODELING_FILES:
        assert (folder / name).read_bytes() == (package / name).read_bytes()
    after = json.loads((folder / "config.json").read_text())
    assert after["ttt_code"] == {"transformers_tested": list(TESTED_TRANSFORMERS)}
    unchanged = {k: v for k, v in config.items() if k not in ("ttt_code", "transformers_version")}
    assert {k: after.get(k) for k in unchanged} == unchanged
    assert weights.stat().st_ino == before["inode"] and weights.read_bytes() == before["bytes"]  # never rewritten
    text = (folder / "README.md").read_text()
    assert text.count("<!-- ttt-adapt:code -->") == 1 and TESTED_TRANSFORMERS[1] in text
    assert text.replace(card_module.code_note() + "\n", "") == card  # the rest of the card as it was
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    ids = torch.randint(3, 33, (1, 40))
    with torch.no_grad():
        from transformers import AutoModelForCausalLM

        a = AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits
        b = AutoModelForCausalLM.from_pretrained(exports["plain"]).eval()(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)

    # Pushing uploads only what changed.
    hub = FakeHub().install(monkeypatch)
    assert main(["--refresh-code", str(folder), "--push-to-hub", "org/tiny-ttt"]) == 0
    upload = hub.calls[-1][2]
    assert sorted(upload["allow_patterns"]) == sorted([*MODELING_FILES, "config.json", "README.md"])
    assert "weights unchanged" in upload["commit_message"]


def test_refresh_code_bad_input_changes_nothing(exports, tmp_path, capsys):
    main = export_main()
    not_export = tmp_path / "other"
    not_export.mkdir()
    (not_export / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    broken = tmp_path / "broken"
    shutil.copytree(exports["plain"], broken)
    (broken / "modeling_ttt.py").write_text("# older code\n")
    tensors = load_file(broken / "model.safetensors")
    tensors.pop(next(k for k in tensors if ".mlp.ttt." in k))
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    cases = [
        (["--refresh-code", str(tmp_path / "missing")], "no such export folder"),
        (["--refresh-code", str(not_export)], "not an In-Place TTT export"),
        (["--refresh-code", str(broken)], "do not fit this version's model code: missing"),
        (["--refresh-code", str(broken), "--out", str(tmp_path / "x")], "cannot be combined"),
        (["--push-to-hub", "org/x"], "--checkpoint and --out (or --refresh-code DIR)"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert (broken / "modeling_ttt.py").read_text() == "# older code\n"
