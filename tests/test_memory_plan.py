"""`adapt.py RECIPE --plan`: the memory plan reads the config only, counts what build_model trains, and scales."""

import pytest
from transformers import AutoConfig

from conftest import script_main
from ttt_adapt._util import parse_size
from ttt_adapt.recipe import load_recipe
from ttt_adapt.training.memory_plan import plan_memory

TINY = "recipes/tiny_qwen3.yaml"


def _plan(*overrides, **kwargs):
    recipe = load_recipe(TINY, list(overrides))
    return plan_memory(recipe, AutoConfig.from_pretrained(recipe.model.name_or_path), **kwargs)


def _item(plan, name):
    return dict((n, b) for n, b, _ in plan.items + plan.transient)[name]


@pytest.mark.parametrize("overrides", [(), ("train.trainable=full",), ("train.trainable=instruct",),
                                       ("train.lora.r=4",)])
def test_parameter_counts_are_those_of_the_model_training_builds(overrides):
    from ttt_adapt.model_setup import build_model

    model = build_model(load_recipe(TINY, list(overrides)))
    plan = _plan(*overrides, device="cpu")
    assert plan.settings["parameters"] == sum(p.numel() for p in model.parameters())
    assert plan.settings["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("overrides", [("train.lora.r=4", "train.lora.dropout=0.1"), ("train.trainable=full",
                                                                                     "train.gradient_checkpointing=true"),
                                       ("train.trainable=instruct",)])
def test_the_planned_model_is_the_one_training_builds_on_meta(overrides):
    """The plan's model comes from `build_model` on the meta device: the same modules (LoRA dropout included),
    parameters, shapes and trainable flags as the model training builds, and no memory."""
    from ttt_adapt.model_setup import build_model

    recipe = load_recipe(TINY, list(overrides))
    real = build_model(recipe)
    meta = build_model(recipe, "meta", AutoConfig.from_pretrained(recipe.model.name_or_path))
    assert all(p.is_meta for p in meta.parameters())
    assert repr(meta) == repr(real)
    if "train.lora.dropout=0.1" in overrides:  # the old meta model dropped it
        assert "Dropout(p=0.1" in repr(meta)
    assert [(n, p.shape, p.requires_grad) for n, p in meta.named_parameters()] == \
        [(n, p.shape, p.requires_grad) for n, p in real.named_parameters()]
    checkpointing = [[getattr(m, "gradient_checkpointing", False) for m in model.modules()] for model in (meta, real)]
    assert checkpointing[0] == checkpointing[1]


def test_sharding_checkpointing_context_parallelism_and_vocabulary_scale_as_they_should():
    one = _plan("train.trainable=full")
    fsdp = _plan("train.trainable=full", processes=8, fsdp=True)
    for name in ("parameters", "gradients", "optimizer states"):
        assert _item(fsdp, name) == pytest.approx(_item(one, name) / 8, abs=1)
    ckpt = _plan("train.gradient_checkpointing=true")
    assert _item(ckpt, "activations kept") < _item(one, "activations kept") / 2
    cp = _plan("parallel.cp_size=2", "data.seq_len=1024", processes=2)
    assert cp.settings["tokens_per_device"] == one.settings["tokens_per_device"] // 2
    longer = _plan("data.seq_len=4096")
    assert _item(longer, "activations kept") > 3.5 * _item(one, "activations kept")
    assert one.fits(parse_size("80GB")) and not one.fits(parse_size("1MB"))


def test_cli_prints_the_plan_and_the_verdict(capsys):
    main = script_main("adapt")
    assert main([TINY, "--plan", "--device-memory", "80GB", "--processes", "2", "--fsdp"]) == 0
    out = capsys.readouterr().out
    for word in ("parameters", "optimizer states", "activations kept", "loss buffers", "fast-weight states",
                 "total", "fits in 74.5 GiB", "FSDP"):
        assert word in out, word
    assert main([TINY, "--plan", "--device-memory", "1MB", "--device", "cpu"]) == 0
    assert "does NOT fit" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--plan", "--device-memory", "lots"], "expected a size like 80GB"),
    (["--plan", "--processes", "3", "parallel.cp_size=2", "data.seq_len=1024"], "not a multiple of parallel.cp_size"),
    (["--fsdp"], "go with --plan"),
    (["--plan", "model.name_or_path=/no/such/model"], "model.name_or_path"),
])
def test_bad_plan_options_are_one_line_errors(args, message, capsys):
    assert script_main("adapt")([TINY, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_plan_after_a_run_whose_export_exists(capsys, tmp_path):
    """A plan writes nothing: an existing, non-empty export folder (the main job ran) is no reason to refuse it."""
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    main = script_main("adapt")
    assert main([TINY, f"export.dir={export}", "--plan", "--device", "cpu"]) == 0
    assert "total" in capsys.readouterr().out
    assert main([TINY, "model.name_or_path=no/such/folder/", "--plan"]) == 2  # the inputs are still checked
