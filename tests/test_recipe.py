"""Recipe schema: loading, overrides, and a one-line error naming the key or path for every bad input."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import script_main

from ttt_adapt.recipe import Recipe, RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "a long document"}\n{"text": "another one"}\n')
    (tmp_path / "model").mkdir()
    return path


def minimal(tmp_path) -> dict:
    return {
        "model": {"name_or_path": str(tmp_path / "model")},
        "data": {"path": str(tmp_path / "docs.jsonl")},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 5},
    }


def write(tmp_path, raw, name="recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


def error_of(path, overrides=()) -> str:
    """The one-line error a recipe gets before any work: from the schema (`load_recipe`) or, for the files and
    folders it names, from `ttt_adapt.training.preflight.check_files`."""
    from ttt_adapt.training.preflight import check_files

    with pytest.raises(RecipeError) as err:
        check_files(load_recipe(path, list(overrides)))
    message = str(err.value)
    assert "\n" not in message and message.strip() == message and message
    return message


def test_minimal_recipe_gets_defaults(tmp_path, corpus):
    recipe = load_recipe(write(tmp_path, minimal(tmp_path)))
    assert isinstance(recipe, Recipe)
    assert recipe.ttt.layers is None and recipe.ttt.chunk_size == 1024
    assert recipe.train.trainable == "ttt" and recipe.train.lora.r == 0 and recipe.train.resume is True
    assert recipe.data.seq_len == 2048 and recipe.parallel.cp_size == 1 and recipe.export.dir is None
    assert recipe.eval is None and recipe.train.resolved_warmup_steps == 0
    assert yaml.safe_load(yaml.safe_dump(recipe.to_dict()))["train"]["max_steps"] == 5


def test_overrides_take_yaml_values(tmp_path, corpus):
    path = write(tmp_path, minimal(tmp_path))
    recipe = load_recipe(path, [
        "ttt.layers=[0,2]", "train.max_steps=3", "train.lora.r=8", "train.lr=5e-6", "train.ttt_lr=1",
        "train.warmup_ratio=0.5", "train.clip_grad_norm=null", "train.trackers=[]", "eval.lengths=[512, 1024]",
        "export.dir=out dir", "data.eval_fraction=0",
    ])
    assert recipe.ttt.layers == [0, 2] and recipe.train.max_steps == 3 and recipe.train.lora.r == 8
    assert recipe.train.lr == 5e-6 and recipe.train.ttt_lr == 1.0 and isinstance(recipe.train.ttt_lr, float)
    assert recipe.train.resolved_warmup_steps == 2 and recipe.train.clip_grad_norm is None
    assert recipe.eval.lengths == [512, 1024] and recipe.export.dir == "out dir"
    assert recipe.data.eval_fraction == 0


def test_words_yaml_reads_as_booleans_load_as_the_words(tmp_path, corpus):
    """`no` (train.mixed_precision's documented default) and `off` (a ttt.state_norm_guard value) are booleans to
    YAML, bare in a file or on the command line, and so are false/False/off for them: each loads as the key's word."""
    path = write(tmp_path, f"""
model:
  name_or_path: {tmp_path / 'model'}
ttt:
  state_norm_guard: off
data:
  path: {tmp_path / 'docs.jsonl'}
train:
  output_dir: {tmp_path / 'run'}
  max_steps: 5
  mixed_precision: no
""")
    recipe = load_recipe(path)
    assert recipe.train.mixed_precision == "no" and recipe.ttt.state_norm_guard == "off"
    for no, off in (("no", "off"), ("false", "Off"), ("False", "OFF"), ("'no'", "'off'")):
        recipe = load_recipe(path, ["train.mixed_precision=bf16", "ttt.state_norm_guard=warn",
                                    f"train.mixed_precision={no}", f"ttt.state_norm_guard={off}"])
        assert recipe.train.mixed_precision == "no" and recipe.ttt.state_norm_guard == "off"
    assert yaml.safe_load(yaml.safe_dump(recipe.to_dict()))["train"]["mixed_precision"] == "no"  # saved quoted


def choice_cases():
    from ttt_adapt.recipe.sections import CHOICES

    for key, words in CHOICES.items():
        for word in words:
            yield key, word


@pytest.mark.parametrize("key, word", list(choice_cases()))
def test_every_word_of_a_key_with_choices_loads_bare(tmp_path, corpus, key, word):
    """Every word of every key that takes a fixed set (`CHOICES`), written bare, in a file and as an override."""
    raw = minimal(tmp_path)
    if key == "data.mix.format":
        raw["data"] = {"mix": [{"path": str(tmp_path / "docs.jsonl"), "format": "WORD"}]}
        read = lambda r: r.data.mix[0].format  # noqa: E731
    elif key == "train.trackers":
        raw["train"]["trackers"] = ["WORD"]
        read = lambda r: r.train.trackers[0]  # noqa: E731
    else:
        section, name = key.split(".")
        raw.setdefault(section, {})[name] = "WORD"
        read = lambda r: getattr(getattr(r, section), name)  # noqa: E731
    path = write(tmp_path, yaml.safe_dump(raw).replace("WORD", word))
    assert read(load_recipe(path)) == word
    if key not in ("data.mix.format", "train.trackers"):
        assert read(load_recipe(write(tmp_path, minimal(tmp_path), "plain.yaml"), [f"{key}={word}"])) == word


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.mixed_precision=yes"], "train.mixed_precision: must be one of no, bf16, fp16; got boolean True"),
        (["ttt.state_norm_guard=on"], "ttt.state_norm_guard: must be one of warn, clamp, off; got boolean True"),
        (["train.trackers=[off]"], "train.trackers[0]: must be one of tensorboard"),
        (["export.revision=no"], "export.revision: expected a string, got boolean False (YAML reads a bare yes/no/on/"
                                 "off/true/false as a boolean: quote the word)"),
    ],
)
def test_a_boolean_for_a_string_key_is_one_line(tmp_path, corpus, overrides, expected):
    """A YAML boolean no word of the key stands for, or for a key that takes any string, is refused in one line."""
    assert expected in error_of(write(tmp_path, minimal(tmp_path)), overrides)


def test_a_quoted_word_for_a_free_string_key_loads(tmp_path, corpus):
    recipe = load_recipe(write(tmp_path, minimal(tmp_path)), ["export.revision='no'", "data.name=\"off\""])
    assert recipe.export.revision == "no" and recipe.data.name == "off"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        # unknown keys
        (["trian.max_steps=3"], "trian: unknown key (did you mean 'train'?)"),
        (["train.max_step=3"], "train.max_step: unknown key (did you mean 'max_steps'?)"),
        (["train.lora.rank=3"], "train.lora.rank: unknown key"),
        (["ttt.chunk=3"], "ttt.chunk: unknown key (did you mean 'chunk_size'?)"),
        (["data.seqlen=3"], "data.seqlen: unknown key (did you mean 'seq_len'?)"),
        # wrong types
        (["train.max_steps=ten"], "train.max_steps: expected an integer, got string 'ten'"),
        (["train.max_steps=2.5"], "train.max_steps: expected an integer"),
        (["train.resume=maybe"], "train.resume: expected true or false"),
        (["train.gradient_checkpointing=1"], "train.gradient_checkpointing: expected true or false"),
        (["train.lr=fast"], "train.lr: expected a number"),
        (["ttt.layers=[0, x]"], "ttt.layers[1]: expected an integer"),
        (["ttt.layers=3"], "ttt.layers: expected a list of integers, got integer 3"),
        (["train.trackers=wandb"], "train.trackers: expected a list of strings"),
        (["train.lora=8"], "train.lora: must be a mapping"),
        (["model.name_or_path=7"], "model.name_or_path: expected a string"),
        (["eval=3"], "eval: must be a mapping"),
        (["data.seq_len=true"], "data.seq_len: expected an integer"),
        (["train.lr=.nan"], "train.lr: expected a finite number"),
        # out of range
        (["train.max_steps=0"], "train.max_steps: must be >= 1, got 0"),
        (["train.batch_size=-1"], "train.batch_size: must be >= 1"),
        (["train.lr=0"], "train.lr: must be > 0"),
        (["train.ttt_lr=-1e-3"], "train.ttt_lr: must be > 0"),
        (["train.trainable=lora"], "train.trainable: must be one of ttt, instruct, full"),
        (["train.mixed_precision=fp8"], "train.mixed_precision: must be one of no, bf16, fp16"),
        (["train.lora.r=-1"], "train.lora.r: must be >= 0"),
        (["train.lora.r=4", "train.lora.dropout=1"], "train.lora.dropout: must be in [0, 1)"),
        (["train.lora.r=4", "train.lora.target_modules=[]"], "train.lora.target_modules: is empty"),
        (["train.lora.r=4", "train.trainable=full"], "train.lora.r: LoRA needs train.trainable: ttt"),
        (["train.lora.r=4", "train.lora.target_modules=[q_proj, ttt]"], "train.lora.target_modules: ['ttt'] are TTT"),
        (["train.warmup_steps=2", "train.warmup_ratio=0.1"], "train.warmup_steps: set either"),
        (["train.warmup_steps=6"], "train.warmup_steps: must be in [0, max_steps=5]"),
        (["train.warmup_ratio=1.5"], "train.warmup_ratio: must be in [0, 1]"),
        (["train.min_lr_ratio=2"], "train.min_lr_ratio: must be in [0, 1]"),
        (["train.clip_grad_norm=0"], "train.clip_grad_norm: must be > 0 or null"),
        (["train.keep_last=0"], "train.keep_last: must be >= 1"),
        (["train.trackers=[tensorbord]"], "train.trackers: must be one of tensorboard"),
        (["train.trackers=[wandb, wandb]"], "train.trackers: lists a tracker twice"),
        (["train.on_nonfinite=ignore"], "train.on_nonfinite: must be one of stop, skip; got 'ignore'"),
        (["train.max_nonfinite_skips=0"], "train.max_nonfinite_skips: must be >= 1, got 0"),
        (["train.preempt_signals=[SIGTERM, USR1]"], "train.preempt_signals: 'USR1' is not a signal a process can"),
        (["train.preempt_signals=[SIGKILL]"], "train.preempt_signals: 'SIGKILL' is not a signal a process can"),
        (["train.preempt_signals=SIGTERM"], "train.preempt_signals: expected a list of strings"),
        (["train.preempt_signals=[SIGTERM, SIGTERM]"], "train.preempt_signals: lists a signal twice"),
        (["parallel.cp_size=0"], "parallel.cp_size: must be >= 1, got 0"),
        (["model.dtype=fp32"], "model.dtype: must be one of float32, bfloat16, float16"),
        (["model.attn_implementation=fast"], "model.attn_implementation: must be one of"),
        (["export.dtype=int8"], "export.dtype: must be one of"),
        (["export.max_shard_size=big"], "export.max_shard_size: must be a size"),
        (["export.dir=x", "export.push_to_hub=not a repo"], "export.push_to_hub: must be a hub repo id"),
        (["export.push_to_hub=org/name"], "export.push_to_hub: needs export.dir"),
        (["ttt.layers=[]"], "ttt.layers: is empty"),
        (["ttt.layers=[0, -6]"], "ttt.layers: layer indices must be >= 0"),
        (["ttt.layers=[0, 6, 6]"], "ttt.layers: repeats a layer"),
        (["ttt.chunk_size=0"], "ttt.chunk_size: must be an integer >= 1, got 0"),
        (["ttt.conv_kernel_size=4"], "ttt.conv_kernel_size: must be a positive odd integer"),
        (["ttt.lr_mode=vector"], "ttt.lr_mode: must be one of"),
        (["ttt.target=logits"], "ttt.target: must be one of"),
        (["data.seq_len=1"], "data.seq_len: must be an integer >= 2, got 1"),
        (["data.eval_fraction=1.5"], "data.eval_fraction: must be in [0, 1)"),
        # missing files and folders
        (["model.name_or_path=./no/such/model"], "model.name_or_path: no such folder: ./no/such/model"),
        (["data.path=/no/such/docs.jsonl"], "data.path: no such file or folder '/no/such/docs.jsonl'"),
        (["data.eval_path=/no/such/eval.jsonl"], "data.eval_path: no such file or folder"),
        (["train.output_dir=RECIPE"], "train.output_dir: is a file, not a folder"),
        # malformed overrides
        (["train.max_steps"], "override 'train.max_steps': expected dotted.key=value"),
        (["=3"], "override '=3': expected dotted.key=value"),
        (["train..max_steps=3"], "override 'train..max_steps=3': expected dotted.key=value"),
        (["ttt.layers=[0,"], "override 'ttt.layers=[0,': the value is not valid YAML"),
        (["train.max_steps.x=1"], "override 'train.max_steps.x=1': train.max_steps is not a section"),
    ],
)
def test_bad_input_is_one_line_naming_the_key(tmp_path, corpus, overrides, expected):
    path = write(tmp_path, minimal(tmp_path))
    overrides = [o.replace("RECIPE", str(path)) for o in overrides]
    assert expected in error_of(path, overrides)


def test_bad_recipe_files(tmp_path, corpus):
    assert error_of(tmp_path / "missing.yaml") == f"no such recipe file: {tmp_path / 'missing.yaml'}"
    broken = error_of(write(tmp_path, "train:\n\tmax_steps: 3\n", "broken.yaml"))
    assert broken.startswith(f"{tmp_path / 'broken.yaml'}: broken YAML (line 2, column 1): ")
    assert "a recipe must be a mapping" in error_of(write(tmp_path, "- a\n- b\n", "list.yaml"))
    assert error_of(write(tmp_path, "", "empty.yaml")) == "model: missing section"
    raw = minimal(tmp_path)
    del raw["train"]["output_dir"]
    assert error_of(write(tmp_path, raw)) == "train.output_dir: missing (required)"
    raw = minimal(tmp_path)
    raw["extra"] = {}
    assert error_of(write(tmp_path, raw)).startswith("extra: unknown key")
    raw = minimal(tmp_path)
    raw["data"] = None
    assert error_of(write(tmp_path, raw)) == "data: missing section"


def test_export_folder_is_not_overwritten_unless_asked(tmp_path, corpus):
    out = tmp_path / "export"
    out.mkdir()
    (out / "config.json").write_text("{}")
    path = write(tmp_path, minimal(tmp_path))
    assert "export.dir" in error_of(path, [f"export.dir={out}"]) and "export.overwrite=true" in error_of(
        path, [f"export.dir={out}"]
    )
    assert load_recipe(path, [f"export.dir={out}", "export.overwrite=true"]).export.overwrite


def test_hub_ids_are_not_checked_on_disk(tmp_path, corpus):
    path = write(tmp_path, minimal(tmp_path))
    assert load_recipe(path, ["model.name_or_path=Qwen/Qwen3-4B-Base"]).model.name_or_path == "Qwen/Qwen3-4B-Base"


# recipe -> decoder layers of its model (Qwen2.5-7B 28, Mistral-7B-v0.3 32, gemma-3-1b-pt 26)
PUBLISHED = {"qwen3_4b.yaml": 36, "qwen3_8b.yaml": 36, "llama3_1_8b.yaml": 32, "qwen2_5_7b.yaml": 28,
             "mistral_7b.yaml": 32, "gemma3_1b.yaml": 26}


def test_every_shipped_recipe_is_checked():
    instruct = {"qwen3_4b_instruct.yaml", "llama3_1_8b_instruct.yaml", "tiny_qwen3_chat.yaml"}  # test_chat_recipes.py
    assert {p.name for p in (REPO / "recipes").glob("*.yaml")} == {*PUBLISHED, "tiny_qwen3.yaml", *instruct}


@pytest.mark.parametrize("name, num_layers", PUBLISHED.items())
def test_published_recipes(tmp_path, corpus, name, num_layers):
    """The published settings, with the data path (the one thing a user must fill in) pointed at a file."""
    recipe = load_recipe(REPO / "recipes" / name, [f"data.path={corpus}", f"train.output_dir={tmp_path / 'run'}"])
    layers = recipe.ttt.resolved_layers(num_layers)
    assert layers == list(range(0, num_layers, 6))  # every 6th layer from 0
    assert recipe.ttt.chunk_size in (1024, 4096)
    t = recipe.train
    assert (t.trainable, t.lr, t.weight_decay, t.clip_grad_norm) == ("full", 5e-6, 0.1, 1.0)
    assert (t.warmup_ratio, t.mixed_precision, t.gradient_checkpointing) == (0.02, "bf16", True)
    assert recipe.data.seq_len == 32768
    # the shipped data path is a placeholder that fails with one clear line until the user fills it in
    assert "data.path: no such file or folder" in error_of(REPO / "recipes" / name)


def test_run_check_names_the_supported_families(tmp_path, corpus):
    """A multimodal checkpoint (e.g. Gemma 3 4b) is refused before any work with one line naming what is supported;
    a text-only Gemma 3 passes (once its folder holds a tokenizer)."""
    import shutil

    from transformers import Gemma3Config, Gemma3TextConfig

    from ttt_adapt.training.preflight import check_run

    recipe = write(tmp_path, minimal(tmp_path))
    text = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8)
    Gemma3Config(text_config=text, vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=2, image_size=28, patch_size=14)).save_pretrained(tmp_path / "model")
    with pytest.raises(RecipeError) as err:
        check_run(load_recipe(recipe))
    assert str(err.value) == (
        f"model.name_or_path: {str(tmp_path / 'model')!r} is a multimodal 'gemma3' model; In-Place TTT converts "
        "text-only causal LMs with a gated MLP of model_type qwen3, qwen2, llama, mistral, gemma3_text"
    )
    (tmp_path / "model" / "config.json").unlink()
    Gemma3TextConfig(**dict(text, vocab_size=1024)).save_pretrained(tmp_path / "model")
    with pytest.raises(RecipeError, match="holds no tokenizer"):  # transformers makes one of 5 special tokens
        check_run(load_recipe(recipe, ["ttt.layers=[0]"]))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REPO / "ttt_adapt" / "assets" / "tiny_qwen3_base" / name, tmp_path / "model" / name)
    assert check_run(load_recipe(recipe, ["ttt.layers=[0]"])).config.model_type == "gemma3_text"


def test_tiny_recipe_is_valid():
    tiny = REPO / "recipes" / "tiny_qwen3.yaml"
    recipe_assets = REPO / "ttt_adapt" / "assets" / "tiny_qwen3_base"
    if not recipe_assets.is_dir():
        pytest.skip("the embedded tiny base model is not built in this checkout")
    cwd = os.getcwd()
    os.chdir(REPO)  # recipe paths are relative to the current directory
    try:
        recipe = load_recipe(tiny, ["export.overwrite=true"])
    finally:
        os.chdir(cwd)
    assert recipe.ttt.chunk_size == 128 and recipe.data.seq_len == 1024 and recipe.train.trainable == "ttt"


def adapt_main():
    """`main(argv)` of scripts/adapt.py, called in-process (each subprocess costs seconds of imports)."""
    return script_main("adapt")


@pytest.mark.parametrize(
    "args, named",
    [
        (["missing.yaml"], "adapt.py: error: no such recipe file: missing.yaml"),
        (["BROKEN"], "broken YAML"),
        (["RECIPE", "train.max_steps=0"], "adapt.py: error: train.max_steps: must be >= 1"),
        (["RECIPE", "train.max_step=3"], "adapt.py: error: train.max_step: unknown key"),
        (["RECIPE", "train.lr=fast"], "adapt.py: error: train.lr: expected a number"),
        (["RECIPE", "data.path=nope.jsonl"], "adapt.py: error: data.path: no such file or folder 'nope.jsonl'"),
        (["RECIPE", "model.name_or_path=./nope"], "adapt.py: error: model.name_or_path: no such folder"),
        (["RECIPE", "ttt.layers"], "adapt.py: error: override 'ttt.layers': expected dotted.key=value"),
        ([], "usage: adapt.py RECIPE.yaml"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, corpus, capsys, monkeypatch, args, named):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, minimal(tmp_path))
    broken = write(tmp_path, "model: [\n", "broken.yaml")
    args = [{"RECIPE": str(path), "BROKEN": str(broken)}.get(a, a) for a in args]
    assert adapt_main()(args) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and named in captured.err and not captured.out


def test_cli_process_exits_2_without_traceback(tmp_path, corpus):
    path = write(tmp_path, minimal(tmp_path))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "adapt.py"), str(path), "ttt.chunk_size=0"],
                            cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2 and not result.stdout
    assert result.stderr == "adapt.py: error: ttt.chunk_size: must be an integer >= 1, got 0\n"
