import importlib.util
import inspect
import json
import os
import random
import socket
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
IGNORE = -100

# ---------------------------------------------------------------------------------------------- the test device
# `pytest --device cuda` (or TTT_TEST_DEVICE=cuda) runs the device-capable tests (model contract, mixed precision,
# compile, loss, attention, export reload, evaluation) on that device: their models and inputs go there with
# `.to(DEVICE)` (transformers' `torch_device`), or through the `device` fixture. Everything else (gloo ranks,
# scripts in subprocesses) runs where it always runs. The default, cpu, is the suite as it always was. On CUDA,
# fp32 stays fp32 (TF32 off for matmuls and cuDNN convolutions), so the fp32 tolerances hold on every device.
DEVICE_ENV = "TTT_TEST_DEVICE"


def pytest_addoption(parser):
    parser.addoption("--device", default=None, metavar="DEVICE",
                     help=f"torch device of the device-capable tests: cpu (default), cuda, cuda:1 (env {DEVICE_ENV})")


def pytest_configure(config):
    name = config.getoption("--device") or os.environ.get(DEVICE_ENV) or "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise pytest.UsageError(f"--device {name}: not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type != "cpu":
        if not getattr(getattr(torch, device.type, None), "is_available", lambda: False)():
            pytest.exit(f"--device {name}: no {device.type} device here (torch.{device.type}.is_available() is "
                        "False): nothing run", returncode=0)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
    global DEVICE
    DEVICE = os.environ[DEVICE_ENV] = str(device)  # test modules import it; subprocesses inherit it


def selected_device() -> str:
    """The device of the device-capable tests (`--device`, or TTT_TEST_DEVICE; cpu by default)."""
    return os.environ.get(DEVICE_ENV) or "cpu"


DEVICE = selected_device()


@pytest.fixture
def device():
    """The torch device of the device-capable tests (`--device`)."""
    return torch.device(selected_device())


def cpu_only(reason: str):
    """Skip mark of a device-capable module's test that runs on CPU only, with the reason, on another device."""
    return pytest.mark.skipif(torch.device(selected_device()).type != "cpu", reason=reason)


def _cache_kw():
    from transformers import Qwen3ForCausalLM

    return "cache" if "cache" in inspect.signature(Qwen3ForCausalLM.forward).parameters else "past_key_values"


# The name the installed transformers gives the cache argument of a model forward (`cache` from 5.24).
CACHE_KW = _cache_kw()
OLD_CACHE_KW = "past_key_values" if CACHE_KW == "cache" else "cache"


# Every family `convert` takes, with what its tiny test config sets beyond the common sizes: each family's own
# details are switched on, so that the contract tests run through them (sliding windows with their cache layers,
# Gemma 3's scaled embeddings, extra norms, query_pre_attn_scalar and final logit softcapping).
FAMILY_ARCHS = {
    "qwen3": {},
    "llama": {},
    "qwen2": dict(use_sliding_window=True, sliding_window=5, max_window_layers=2),  # layers 2, 3 slide
    "mistral": dict(sliding_window=6),  # every layer slides
    "gemma3": dict(
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=5, query_pre_attn_scalar=16, final_logit_softcapping=3.0,
    ),
}


def tiny_base(arch="qwen3", seed=0, layers=4, tie=False, device="cpu", **overrides):
    """A tiny random causal LM of a family in FAMILY_ARCHS, built locally (nothing downloaded), on `device`
    (built on CPU first: the same weights on every device)."""
    import transformers

    config_cls, lm_cls = {
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    }[arch]
    torch.manual_seed(seed)
    common = dict(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, tie_word_embeddings=tie, max_position_embeddings=512,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    extra = dict(FAMILY_ARCHS[arch])
    if "layer_types" in extra:
        extra["layer_types"] = (extra["layer_types"] * layers)[:layers]
    common.update(extra)
    common.update(overrides)
    config = getattr(transformers, config_cls)(**common)
    return getattr(transformers, lm_cls)(config).eval().to(device)


def randomize_ttt(model, seed=1, scale=0.3):
    """Give the TTT parameters non-trivial values (the step-0 init makes the TTT path a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ttt." in name and not name.endswith(".lr"):
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture
def tiny():
    return tiny_base


# First lines of a subprocess script that must run without ttt_adapt (as a user loading an export would).
BLOCK_TTT_ADAPT = textwrap.dedent(
    """
    import sys
    class BlockTTTAdapt:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "ttt_adapt":
                raise ImportError("ttt_adapt must not be needed to load an export")
    sys.meta_path.insert(0, BlockTTTAdapt())
    """
)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices on a shared 2-core machine: one intra-op thread is several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def script_main(name):
    """`main(argv)` of scripts/<name>.py, called in-process (a subprocess costs seconds of imports)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_cli", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


class LargestTensor:
    """Context manager recording the largest tensor (of `dtype`, if given) any torch op makes inside it."""

    def __init__(self, dtype=None):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor) and (dtype is None or t.dtype == dtype):
                        tracker.largest = max(tracker.largest, t.numel())
                return out

        self.largest, self._mode = 0, _Mode()

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


# ---------------------------------------------------------------------------------------------- a tiny training run
# A tiny random Qwen3 with its own tokenizer and corpus, and the recipe that trains it in seconds (the training
# tests: test_train, test_checkpoints, test_stopping, test_progress).

TTT_LAYERS = [1, 3]


def make_tiny_files(root: Path) -> dict:
    """A tiny random Qwen3 (4 layers, tied embeddings) with a character tokenizer, and a jsonl corpus."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    chars = "abcdefghijklmnopqrstuvwxyz .,\n"
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )
    base = root / "base"
    Qwen3ForCausalLM(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))) for _ in range(40)]
    for name, n in (("train.jsonl", 24), ("eval.jsonl", 4)):
        with open(root / name, "w") as f:
            for _ in range(n):
                f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 90)))}) + "\n")
    return {"base": base, "train": root / "train.jsonl", "eval": root / "eval.jsonl", "root": root}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_tiny_files(tmp_path_factory.mktemp("tiny"))


def recipe_dict(files, out: Path, **train) -> dict:
    return {
        "model": {"name_or_path": str(files["base"])},
        "ttt": {"layers": TTT_LAYERS, "chunk_size": 32},
        "data": {"path": str(files["train"]), "eval_path": str(files["eval"]), "seq_len": 96,
                 "cache_dir": str(files["root"] / "cache")},
        "train": {"output_dir": str(out / "run"), "max_steps": 2, "batch_size": 2, "grad_accum": 2, "lr": 1e-2,
                  "weight_decay": 0.0, "log_every": 1, "warmup_steps": 0, "eval_batches": 2, **train},
        "export": {"dir": None},
    }


def write_recipe(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def load(files, tmp_path, overrides=(), train=None):
    """The tiny recipe with `train` settings merged in, written to tmp_path and loaded with `overrides`."""
    raw = recipe_dict(files, tmp_path, **(train or {}))
    from ttt_adapt.recipe import load_recipe

    return load_recipe(write_recipe(tmp_path / "recipe.yaml", raw), list(overrides))


def checkpoint_weights(recipe, step):
    return load_file(Path(recipe.train.output_dir) / f"checkpoint-{step}" / "model.safetensors")


def changed_keys(before: dict, after: dict) -> set:
    assert set(after) <= set(before), set(after) - set(before)
    return {k for k in after if not torch.equal(before[k], after[k])}


def metrics(recipe) -> list[dict]:
    return [json.loads(line) for line in (Path(recipe.train.output_dir) / "metrics.jsonl").read_text().splitlines()]



def adapt_main():
    """`main(argv)` of scripts/adapt.py."""
    return script_main("adapt")


DIVERGE = ["train.trainable=full", "train.lr=1e38", "ttt.clip_update_norm=null", "train.clip_grad_norm=null",
           "train.save_every=1", "train.keep_last=2"]


def strict_metrics(run: Path) -> list[dict]:
    """metrics.jsonl parsed as strict JSON: NaN / Infinity are refused, not read back as floats."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return [json.loads(line, parse_constant=refuse) for line in (run / "metrics.jsonl").read_text().splitlines()]


def nonfinite_tensors(folder: Path) -> list[str]:
    """Every tensor in the safetensors and torch files under `folder` that holds a NaN or an infinity."""
    bad = []
    for path in list(folder.rglob("*.safetensors")) + list(folder.rglob("*.bin")):
        tensors = load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
        stack = [(str(path), tensors)]
        while stack:
            name, value = stack.pop()
            if isinstance(value, torch.Tensor):
                if value.is_floating_point() and not torch.isfinite(value).all():
                    bad.append(name)
            elif isinstance(value, dict):
                stack += [(f"{name}/{k}", v) for k, v in value.items()]
            elif isinstance(value, (list, tuple)):
                stack += [(f"{name}/{i}", v) for i, v in enumerate(value)]
    return bad


# ---------------------------------------------------------------------------------------------- several ranks
# test_parallel and test_sharding: gloo process groups spawned on CPU, and the tiny models and packed batches
# whose single-process logits and gradients the ranks must reproduce.


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_on_ranks(n, fn, *args):
    """Run `fn(rank, world, *args)` in `n` fresh processes joined in one gloo process group."""
    import torch.multiprocessing as mp

    mp.start_processes(_rank_main, args=(n, free_port(), fn, args), nprocs=n, join=True, start_method="spawn")


def packed_batch(doc_lengths_per_row, vocab=97, seed=0):
    """Rows of packed documents: positions restart at each document, labels -100 at document starts."""
    g = torch.Generator().manual_seed(seed)
    ids, pos, labels = [], [], []
    for docs in doc_lengths_per_row:
        row_ids = torch.randint(3, vocab, (sum(docs),), generator=g)
        ids.append(row_ids)
        pos.append(torch.cat([torch.arange(n) for n in docs]))
        lab = row_ids.clone()
        start = 0
        for n in docs:
            lab[start] = IGNORE
            start += n
        labels.append(lab)
    return {"input_ids": torch.stack(ids), "position_ids": torch.stack(pos), "labels": torch.stack(labels)}


# Chunk 4, 2 ranks. Rows of 16 tokens (8 per rank) and of 24 (12 per rank) place document starts and chunk
# boundaries every way relative to the shard boundary: aligned, a chunk straddling it (with 1..3 tokens on
# either side, so the conv halo is cut by the chunk edge), a document ending or starting exactly there, a
# document starting right after a straddling head, a document covering several shards.
ROWS_16 = [[16], [3, 10, 3], [8, 8], [6, 2, 8], [9, 7], [2, 3, 11]]
ROWS_24 = [[1, 23], [5, 19], [24], [11, 13], [12, 1, 11]]
QWEN3_CASE = dict(arch="qwen3", ttt=dict(layers=[0, 2], chunk_size=4), rows=ROWS_16)


def cp_model(case):
    """The float64 TTT model of a multi-rank test case (randomised TTT weights, optional LoRA / checkpointing)."""
    from ttt_adapt import TTTConfig, convert
    from ttt_adapt.compat import enable_activation_checkpointing

    base = tiny_base(case["arch"], **case.get("base", {})).double()
    model = randomize_ttt(convert(base, TTTConfig(**case["ttt"])), scale=0.3).double()
    model.train()
    if case.get("lora"):  # down_proj wrapped by peft: the TTT layer adds its fast-weight part to the LoRA output
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        lora = LoraConfig(r=2, target_modules=["down_proj", "q_proj"], modules_to_save=["ttt"],
                          init_lora_weights=False)
        model = get_peft_model(model, lora).double()
    if case.get("checkpointing"):
        enable_activation_checkpointing(model)
    return model


def cp_reference(case, batch):
    """One process: the logits, the summed loss and every parameter gradient of `cp_model(case)` on `batch`."""
    import torch.nn.functional as F

    model = cp_model(case)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE,
                           reduction="sum")
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def gather_sequence(cp, local, length=None):
    """(B, L/cp, ...) per rank -> (B, L, ...) on every rank of `cp`'s group (not differentiable), trimmed to
    `length`."""
    import torch.distributed as dist

    parts = [torch.empty_like(local) for _ in range(cp.cp_size)]
    dist.all_gather(parts, local.contiguous(), group=cp.group)
    full = torch.cat(parts, 1)
    return full if length is None else full[:, :length]


def assert_same_metrics(a: list[dict], b: list[dict]):
    """Two runs' metrics lines agree: losses and gradient norms within 1e-5 relative, token counts exactly."""
    for x, y in zip(a, b):
        for key in ("loss", "eval_loss", "grad_norm"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-5), (key, x, y)
        for key in ("tokens", "eval_tokens"):
            if key in x:
                assert y[key] == x[key], (key, x, y)
