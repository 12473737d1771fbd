"""Evaluation: what In-Place TTT buys over its base, measured offline.

    from ttt_adapt.evaluate import EvalSettings, run_evaluation
    report = run_evaluation(EvalSettings(corpus="held_out.jsonl", lengths=[512, 1024]),
                            base="path/to/base", adapted="exports/my-ttt-model", out_dir="runs/x/eval")

Three models are measured: the base, the base freshly converted (`convert`, step-0 TTT weights: it must equal
the base, and the report records whether it does) and the adapted model.

- Loss by position: the first `seq_len` tokens of each held-out document (shorter ones right-padded, the padding
  ignored), per-token loss averaged in position bins (`bin_edges`; default powers of two from 64 up to `seq_len`).
  On corpora with query lines (`ttt_adapt.corpus`), the same for the answer tokens of queries whose binding was
  stated far earlier: where a memory of the document is needed, so where TTT should help.
- Synthetic long-context tasks, RULER-style, generated from `seed` (no download): needles inserted at seeded
  depths into a haystack of the corpus's own prose (sentences without digits), a question at the end, a greedy
  answer generated in left-padded batches and scored as RULER does (case-insensitive substring match of each
  reference, averaged). Lengths count tokens of the whole prompt.
    niah_single        one needle `Vault Drelvok holds code 4821.`; "Q: What code opens vault Drelvok? A:"
    niah_multikey      four such needles with different vaults; the question names one of them
    kv_retrieval       the whole context is `Vault ... holds code ...` lines; one is asked for
    variable_tracking  two chains `let a = 512;` `let b = a;` `let c = b;` ... spread through the prose;
                       "Q: What is the value of <last variable of the first chain>? A:"

Written to `out_dir`: `report.json` (`settings`, `bins`, token counts per bin, then `base`, `converted`, `adapted`,
each with `loss_by_position` (one value per bin), `recall_loss_by_position` and `tasks` {task: {length: accuracy}}),
`loss_by_position.png`, `report.md` (the markdown table of `markdown_table`) and `samples.jsonl` (every prompt's
answers and generations). A recipe's optional `eval` section holds `EvalSettings` fields; training then writes
`<train.output_dir>/eval/` (see `evaluate_recipe`).

lm-evaluation-harness: the same tasks as a local lm_eval task (no download), for any exported model:

    python scripts/evaluate.py --lm-eval-task lm_eval_tasks --adapted exports/tiny_qwen3 \\
        --corpus ttt_adapt/assets/corpus/eval.jsonl --lengths 512,1024
    lm_eval --model hf --model_args pretrained=exports/tiny_qwen3,trust_remote_code=True,dtype=float32 \\
        --include_path lm_eval_tasks --tasks ttt_synthetic --device cpu --batch_size 8

(`pip install lm_eval`; it is not a dependency of ttt-adapt.) The tasks are named `ttt_<task>_<length>` and tagged
`ttt_synthetic`; each is a `dataset_path: json` task over a local jsonl file, scored by `utils.py` next to it with
the same substring match.

Bad input (a missing model folder or corpus, an empty corpus, lengths beyond the model's
`max_position_embeddings`, unknown settings) raises `EvalError`, whose message is one line.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from ttt_adapt._util import first_line, looks_like_local_path, unwrap
from ttt_adapt.config import TASKS, EvalError, EvalSettings, position_bins
from ttt_adapt.convert import convert
from ttt_adapt.corpus import recall_spans
from ttt_adapt.modeling.configuration_ttt import TTTConfig

LOGIT_SLICE = 1024  # positions whose logits exist at once: (batch, 1024, vocab), not (batch, seq_len, vocab)
EQUAL_ATOL = 1e-5  # converted vs base, per-token loss: the TTT path at step 0 must change nothing


# ------------------------------------------------------------------------------------------------ inputs


def read_corpus(path, text_field: str = "text", max_docs: int | None = None) -> list[str]:
    """The documents of a .jsonl (one JSON object a line) or .txt (one document) file; EvalError if none."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"no such corpus file: {path}")
    if path.suffix == ".txt":
        docs = [path.read_text()]
    elif path.suffix in (".jsonl", ".json"):
        docs = []
        with open(path) as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    docs.append(json.loads(line)[text_field])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise EvalError(f"{path}:{i}: not a JSON object with a {text_field!r} field") from None
    else:
        raise EvalError(f"{path}: the corpus must be a .jsonl file ({{\"{text_field}\": ...}} a line) or a .txt file")
    docs = [d for d in docs if isinstance(d, str) and d.strip()]
    if not docs:
        raise EvalError(f"{path}: the corpus holds no documents")
    return docs[:max_docs]


def load_model(name_or_path, dtype: str = "float32", device=None):
    """A causal LM in eval mode (a TTT export loads through ttt_adapt's registered Auto classes); one-line errors."""
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, name_or_path, "a model", dtype=getattr(torch, dtype))
    return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()


def _config(model_or_path):
    """The config of a loaded model (peft unwrapped) or of a model folder / hub id; one-line errors."""
    if not isinstance(model_or_path, (str, Path)):
        return unwrap(model_or_path).config
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, model_or_path, "a model config")


def load_tokenizer(name_or_path):
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, name_or_path, "a tokenizer")


def _from_pretrained(auto_class, name_or_path, what: str, **kwargs):
    """`auto_class.from_pretrained` with one-line errors for a missing folder or an unloadable one."""
    name = str(name_or_path)
    if looks_like_local_path(name) and not Path(name).is_dir():
        raise EvalError(f"no such model folder: {name}")
    try:
        return auto_class.from_pretrained(name, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise EvalError(f"cannot load {what} from {name}: {first_line(e, None)}") from None


def check_lengths(settings: EvalSettings, config, name: str) -> None:
    """EvalError if the loss length or a task length (plus generated tokens) exceeds the model's positions."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:
        return
    if settings.seq_len > limit:
        raise EvalError(f"seq_len {settings.seq_len} exceeds the max_position_embeddings of {name} ({limit})")
    for length in settings.lengths if settings.tasks else []:
        if length + settings.max_new_tokens > limit:
            raise EvalError(
                f"task length {length} (+{settings.max_new_tokens} generated tokens) exceeds the "
                f"max_position_embeddings of {name} ({limit})"
            )


# ------------------------------------------------------------------------------------------------ loss by position


def tokenize_documents(tokenizer, docs: list[str], seq_len: int, pad_id: int) -> dict:
    """The first `seq_len` tokens of each document, right-padded: input_ids, attention_mask and `recall` (the tokens
    that overlap a query answer of `ttt_adapt.corpus.recall_spans`; all False for other corpora)."""
    fast = getattr(tokenizer, "is_fast", False)
    enc = tokenizer(docs, return_offsets_mapping=fast, truncation=True, max_length=seq_len)
    ids = torch.full((len(docs), seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros(len(docs), seq_len, dtype=torch.bool)
    recall = torch.zeros(len(docs), seq_len, dtype=torch.bool)
    for i, doc in enumerate(docs):
        row = enc["input_ids"][i]
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = True
        if fast:
            spans = recall_spans(doc)
            for j, (s, e) in enumerate(enc["offset_mapping"][i]):
                recall[i, j] = e > s and any(s < b and e > a for a, b in spans)
    keep = mask.sum(1) >= 2  # a 1-token document has nothing to predict
    if not keep.any():
        raise EvalError("no held-out document has 2 or more tokens")
    return {"input_ids": ids[keep], "attention_mask": mask[keep], "recall": recall[keep]}


@torch.no_grad()
def token_losses(model, rows: dict, batch_size: int) -> torch.Tensor:
    """(N, L) loss of predicting token j from tokens < j (column 0 and padding: 0).

    Runs the decoder (`model.model`) once and the LM head on `LOGIT_SLICE` positions at a time: a 150k vocabulary
    at 32k positions would not fit as one logits tensor."""
    lm = unwrap(model)  # peft injects LoRA in place: the unwrapped modules still apply it
    device = next(lm.parameters()).device
    out = []
    for i in range(0, len(rows["input_ids"]), batch_size):
        x = rows["input_ids"][i : i + batch_size].to(device)
        m = rows["attention_mask"][i : i + batch_size].to(device)
        hidden = lm.model(input_ids=x, attention_mask=m.long(), use_cache=False).last_hidden_state
        loss = torch.zeros(x.shape, dtype=torch.float32, device=device)
        for s in range(0, x.shape[1] - 1, LOGIT_SLICE):
            e = min(s + LOGIT_SLICE, x.shape[1] - 1)
            logits = lm.lm_head(hidden[:, s:e]).float()
            loss[:, s + 1 : e + 1] = F.cross_entropy(logits.transpose(1, 2), x[:, s + 1 : e + 1], reduction="none")
        out.append((loss * m).cpu())
    return torch.cat(out)


def bin_means(losses: torch.Tensor, weights: torch.Tensor, edges: list[int]) -> list[float | None]:
    """Mean of `losses` where `weights` is set, per position bin [edges[k], edges[k+1]); None for an empty bin."""
    means = []
    for a, b in zip(edges, edges[1:]):
        w = weights[:, a:b].double()
        n = float(w.sum())
        means.append(float((losses[:, a:b].double() * w).sum() / n) if n else None)
    return means


def predicted_positions(rows: dict) -> torch.Tensor:
    """Positions whose token is predicted: real tokens except each row's first."""
    t = rows["attention_mask"].clone()
    t[:, 0] = False
    return t


# ------------------------------------------------------------------------------------------------ synthetic tasks

_ONSETS = "b d f g k l m n p r s t v z br dr gr kr pl st tr sh th".split()
_VOWELS = "a e i o u ai ei ou".split()
_CODAS = ["", "", "n", "r", "s", "k", "l", "m"]
_SENTENCE = re.compile(r"[A-Z][^\d:;=\n]{10,300}[.!?]")  # plain prose: no numbers, bindings or queries


def _name(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


def filler_sentences(docs: list[str], limit: int = 4000) -> list[str]:
    """Distinct prose sentences of the corpus without digits, colons or `vault`: the haystack."""
    found = {}
    for doc in docs:
        for s in re.split(r"(?<=[.!?])\s+", doc):
            s = s.strip()
            if _SENTENCE.fullmatch(s) and "vault" not in s.lower():
                found.setdefault(s, None)
                if len(found) >= limit:
                    return list(found)
    return list(found)


def make_samples(task: str, length: int, n: int, tokenizer, filler: list[list[int]], seed: int) -> list[dict]:
    """`n` prompts of `task` of exactly `length` tokens, the same for the same seed.

    `filler` holds the token ids of haystack sentences (each tokenised with a leading space). A sample holds
    `input_ids`, `prompt` (its text), `answers` and `needles` ({text, depth, position}: the needle's first token
    is `input_ids[position]`, `position / length` about `depth`)."""
    if task not in TASKS:
        raise EvalError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    if not filler:
        raise EvalError("the corpus has no plain prose sentences (no digits or colons) to build haystacks from")
    rng = random.Random(f"ttt_adapt.evaluate/{seed}/{task}/{length}")  # a str seed is hashed stably
    return [_sample(task, length, tokenizer, filler, rng) for _ in range(n)]


def _sample(task, length, tokenizer, filler, rng) -> dict:
    used = set()

    def fresh(make):
        while (word := make()) in used:
            pass
        used.add(word)
        return word

    def vault_name():
        return fresh(lambda: _name(rng, rng.randint(2, 3)).capitalize())

    def vault():
        return vault_name(), fresh(lambda: str(rng.randint(1000, 9999)))

    def next_piece():  # of the haystack
        return filler[rng.randrange(len(filler))]

    if task in ("niah_single", "niah_multikey"):
        pairs = [vault() for _ in range(1 if task == "niah_single" else 4)]
        key, value = rng.choice(pairs)
        needles = [f" Vault {k} holds code {v}." for k, v in pairs]
        depths = [rng.random() for _ in needles]
        query, answer = f"\n\nQ: What code opens vault {key}? A:", value
    elif task == "kv_retrieval":
        key, value = vault()
        needles, depths = [f"Vault {key} holds code {value}.\n"], [rng.random()]
        query, answer = f"\n\nQ: What code opens vault {key}? A:", value
        codes = [str(c) for c in range(1000, 10000) if str(c) != value]  # other lines' codes may repeat, not this

        def next_piece():  # noqa: F811 - this haystack is more key-value lines
            return _encode(tokenizer, f"Vault {vault_name()} holds code {rng.choice(codes)}.\n")
    else:  # variable_tracking: two chains, a value then copies; each chain's lines in order
        needles, depths, chains = [], [], []
        for _ in range(2):
            value, names = fresh(lambda: str(rng.randint(100, 999))), [fresh(lambda: _name(rng, 1)) for _ in range(4)]
            needles += [f" let {names[0]} = {value};"] + [f" let {b} = {a};" for a, b in zip(names, names[1:])]
            depths += sorted(rng.random() for _ in names)
            chains.append((names[-1], value))
        query, answer = f"\n\nQ: What is the value of {chains[0][0]}? A:", chains[0][1]

    prefix = tokenizer("", add_special_tokens=True)["input_ids"]  # BOS for tokenizers that add one
    needle_ids = [_encode(tokenizer, t) for t in needles]
    query_ids = _encode(tokenizer, query)
    budget = length - len(prefix) - sum(map(len, needle_ids)) - len(query_ids)
    if budget < 1:
        raise EvalError(f"task length {length} is too short for {task}: its needles and question alone take "
                        f"{length - budget} tokens")
    hay, bounds = [], [0]
    while len(hay) < budget:
        hay += next_piece()
        bounds.append(len(hay))
    hay, bounds = hay[:budget], [b for b in bounds if b < budget] + [budget]  # the last piece is cut at the budget
    # each needle goes to the piece boundary nearest its depth; ties keep the needles' order (chains stay in order)
    at = [min(bounds, key=lambda b: abs(b - d * budget)) for d in depths]
    ids, cursor, positions = list(prefix), 0, [0] * len(needles)
    for i in sorted(range(len(needles)), key=lambda i: (at[i], i)):
        ids += hay[cursor : at[i]]
        cursor = at[i]
        positions[i] = len(ids)
        ids += needle_ids[i]
    ids += hay[cursor:] + query_ids
    return {
        "task": task,
        "length": length,
        "input_ids": ids,
        "prompt": tokenizer.decode(ids, skip_special_tokens=True),
        "answers": [answer],
        "needles": [{"text": t.strip(), "depth": round(d, 4), "position": p}
                    for t, d, p in zip(needles, depths, positions)],
    }


def task_samples(settings: EvalSettings, tokenizer, docs: list[str]) -> list[dict]:
    """Every prompt of `settings.tasks` x `settings.lengths`, haystacks from the prose of `docs`."""
    if not settings.tasks:
        return []
    filler = [_encode(tokenizer, " " + s) for s in filler_sentences(docs)]
    return [s for task in settings.tasks for length in settings.lengths
            for s in make_samples(task, length, settings.num_samples, tokenizer, filler, settings.seed)]


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def score(generation: str, answers: list[str]) -> float:
    """RULER's match: the fraction of reference answers found (case-insensitive) in the generation."""
    return sum(a.lower() in generation.lower() for a in answers) / len(answers)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy continuations of token-id prompts, in left-padded batches."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts = []
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, p in enumerate(batch):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=pad, use_cache=True,
        )
        texts += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return texts


# ------------------------------------------------------------------------------------------------ the run


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
    for model, what in ((base, "base"), (adapted, "adapted")):
        if isinstance(model, (str, Path)) and looks_like_local_path(str(model)) and not Path(model).is_dir():
            raise EvalError(f"no such {what} model folder: {model}")
    docs = read_corpus(settings.corpus, settings.text_field)
    if tokenizer is None:
        source = base if isinstance(base, (str, Path)) else adapted
        if not isinstance(source, (str, Path)):
            raise EvalError("pass `tokenizer` when both models are given in memory")
        tokenizer = load_tokenizer(source)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    samples = task_samples(settings, tokenizer, docs)  # before loading models: a length too short fails fast

    # configs first: wrong models and lengths fail before any weights load
    base_name = _describe(base)
    adapted_name = str(adapted) if isinstance(adapted, (str, Path)) else "the adapted model (in memory)"
    check_lengths(settings, _config(base), base_name)
    adapted_config = _config(adapted)
    ttt_settings = getattr(adapted_config, "ttt", None)
    if ttt_settings is None:
        raise EvalError(f"{adapted_name} is not an In-Place TTT model (its config has no `ttt` settings)")
    check_lengths(settings, adapted_config, adapted_name)
    device = None
    if not isinstance(adapted, (str, Path)):
        first = next(adapted.parameters())
        device, dtype = first.device, str(first.dtype).removeprefix("torch.")
    base_model = base if not isinstance(base, (str, Path)) else load_model(base, dtype, device)
    adapted_model = adapted if not isinstance(adapted, (str, Path)) else load_model(adapted, dtype, base_model.device)

    rows = tokenize_documents(tokenizer, docs[: settings.max_docs], settings.seq_len, pad_id)
    edges = settings.bins
    weights = {"all": predicted_positions(rows), "recall": predicted_positions(rows) & rows["recall"]}

    report = {
        "settings": dataclasses.asdict(settings),
        "models": {"base": _describe(base), "adapted": _describe(adapted)},
        "bins": edges,
        "tokens_per_bin": [int(weights["all"][:, a:b].sum()) for a, b in zip(edges, edges[1:])],
        "recall_tokens_per_bin": [int(weights["recall"][:, a:b].sum()) for a, b in zip(edges, edges[1:])],
    }
    generations = {}

    def measure(name, model):
        log(f"evaluate: {name}: loss by position on {len(rows['input_ids'])} documents of <= {settings.seq_len} tokens")
        losses = token_losses(model, rows, settings.batch_size)
        result = {"loss_by_position": bin_means(losses, weights["all"], edges)}
        if weights["recall"].any():
            result["recall_loss_by_position"] = bin_means(losses, weights["recall"], edges)
        if name != "converted" and samples:
            log(f"evaluate: {name}: {len(samples)} task prompts at lengths {settings.lengths}")
            generations[name] = generate(model, tokenizer, [s["input_ids"] for s in samples], settings.batch_size,
                                         settings.max_new_tokens)
            result["tasks"] = {
                task: {str(length): _mean([score(g, s["answers"]) for s, g in zip(samples, generations[name])
                                           if s["task"] == task and s["length"] == length])
                       for length in settings.lengths}
                for task in settings.tasks
            }
        report[name] = result
        return losses

    was_training = adapted_model.training
    adapted_model.eval()
    try:
        base_losses = measure("base", base_model)
        if getattr(base_model.config, "ttt", None) is not None:
            report["converted"] = {"skipped": "the base is already an In-Place TTT model"}
        else:
            converted = convert(base_model, TTTConfig.from_dict(dict(ttt_settings))).eval()
            diff = float((measure("converted", converted) - base_losses).abs().max())
            report["converted"].update(max_abs_loss_diff=diff, equals_base=diff <= EQUAL_ATOL)
            if diff > EQUAL_ATOL:
                log(f"evaluate: WARNING: the freshly converted model differs from the base "
                    f"(max |loss diff| {diff:.3g})")
            del converted
        measure("adapted", adapted_model)
    finally:
        adapted_model.train(was_training)
    report["seconds"] = round(time.time() - started, 1)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown_table(report))
    plot_loss_by_position(report, out / "loss_by_position.png")
    with open(out / "samples.jsonl", "w") as f:
        for i, s in enumerate(samples):
            record = {k: s[k] for k in ("task", "length", "answers", "needles")}
            record.update({f"{m}_generation": generations[m][i] for m in generations})
            f.write(json.dumps(record) + "\n")
    log(f"evaluate: wrote {out / 'report.json'} ({report['seconds']} s)")
    return report


def evaluate_recipe(recipe, adapted, out_dir=None) -> dict:
    """`run_evaluation` for a training run: its base (`model.name_or_path`), `adapted` (the trained model in memory,
    or a folder), the recipe's `eval` settings; writes `<train.output_dir>/eval/` unless `out_dir` is given."""
    out_dir = out_dir if out_dir is not None else Path(recipe.train.output_dir) / "eval"
    return run_evaluation(recipe.eval, recipe.model.name_or_path, adapted, out_dir, dtype=recipe.model.dtype)


# ------------------------------------------------------------------------------------------------ outputs


def markdown_table(report: dict) -> str:
    """One row per position bin (all tokens, then recall answers) and per task and length; base, adapted, difference."""
    edges = report["bins"]
    header = "| metric | base | adapted | adapted - base |\n|---|---|---|---|\n"
    rows = []
    for key, label in (("loss_by_position", "loss"), ("recall_loss_by_position", "recall-answer loss")):
        if key not in report["base"]:
            continue
        for k, (a, b) in enumerate(zip(edges, edges[1:])):
            if report["base"][key][k] is None and report["adapted"][key][k] is None:
                continue  # no such tokens in this bin (e.g. no recall answer that early)
            rows.append((f"{label}, positions {a}-{b}", report["base"][key][k], report["adapted"][key][k]))
    for task, by_length in report["base"].get("tasks", {}).items():
        for length, value in by_length.items():
            rows.append((f"{task} @ {length} tokens (accuracy)", value, report["adapted"]["tasks"][task][length]))
    lines = [f"| {m} | {_fmt(b)} | {_fmt(a)} | {_fmt(a - b, '+') if a is not None and b is not None else ''} |"
             for m, b, a in rows]
    converted = report.get("converted", {})
    note = ""
    if "equals_base" in converted:
        note = (f"\nFreshly converted model vs base: max |per-token loss difference| = "
                f"{converted['max_abs_loss_diff']:.2g} ({'equal' if converted['equals_base'] else 'NOT equal'}).\n")
    return header + "\n".join(lines) + "\n" + note


def plot_loss_by_position(report: dict, path) -> None:
    """PNG: loss per position bin (and recall-answer loss, when measured) for base, converted and adapted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = report["bins"]
    x = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
    keys = [k for k in ("loss_by_position", "recall_loss_by_position") if k in report["base"]]
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, style in (("base", "o-"), ("converted", "x:"), ("adapted", "s-")):
            values = report.get(name, {}).get(key)
            if values:
                ax.plot([xi for xi, v in zip(x, values) if v is not None], [v for v in values if v is not None],
                        style, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [f"{a}-{b}" for a, b in zip(edges, edges[1:])], rotation=30, fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel("position in document (tokens)")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title("all tokens" if key == "loss_by_position" else "answers of long-range queries")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


LM_EVAL_UTILS = '''"""Scoring of the ttt-adapt synthetic tasks (written by ttt_adapt.evaluate.write_lm_eval_task)."""


def process_results(doc, results):
    generation = results[0].lower()
    return {"contains": sum(a.lower() in generation for a in doc["answers"]) / len(doc["answers"])}
'''


def write_lm_eval_task(out_dir, samples: list[dict], max_new_tokens: int = 8, tag: str = "ttt_synthetic") -> list[str]:
    """Write lm-evaluation-harness tasks for `samples` (of `make_samples`) into `out_dir`: one `ttt_<task>_<length>`
    task (YAML + jsonl) per task and length, all tagged `tag`, and the `utils.py` they score with. Returns the names.
    Run them with `lm_eval --include_path out_dir --tasks <tag or names>` (see the module docstring)."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "utils.py").write_text(LM_EVAL_UTILS)
    names = []
    for task, length in dict.fromkeys((s["task"], s["length"]) for s in samples):
        name = f"ttt_{task}_{length}"
        with open(out / f"{name}.jsonl", "w") as f:
            for s in samples:
                if (s["task"], s["length"]) == (task, length):
                    f.write(json.dumps({"prompt": s["prompt"], "answers": s["answers"]}) + "\n")
        spec = {
            "task": name,
            "tag": [tag],
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(out / f"{name}.jsonl")}},
            "test_split": "test",
            "output_type": "generate_until",
            "doc_to_text": "{{prompt}}",
            "doc_to_target": "{{answers[0]}}",
            # no `until`: lm_eval then stops at eos or max_gen_toks, as `generate` here does
            "generation_kwargs": {"max_gen_toks": max_new_tokens, "do_sample": False},
            "process_results": "!function utils.process_results",
            "metric_list": [{"metric": "contains", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        }
        text = yaml.safe_dump(spec, sort_keys=False).replace("'!function utils.process_results'",
                                                               "!function utils.process_results")
        (out / f"{name}.yaml").write_text(text)
        names.append(name)
    return names


# ------------------------------------------------------------------------------------------------ helpers


def _describe(model) -> str:
    return str(model) if isinstance(model, (str, Path)) else f"{type(unwrap(model)).__name__} (in memory)"


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fmt(v, sign: str = "") -> str:
    return "" if v is None else f"{v:{sign}.4f}"


__all__ = [
    "EvalError",
    "EvalSettings",
    "TASKS",
    "position_bins",
    "read_corpus",
    "tokenize_documents",
    "token_losses",
    "bin_means",
    "filler_sentences",
    "make_samples",
    "task_samples",
    "score",
    "generate",
    "run_evaluation",
    "evaluate_recipe",
    "markdown_table",
    "plot_loss_by_position",
    "write_lm_eval_task",
]
