"""Synthetic long-context tasks, RULER-style, generated offline from a seed; their scoring, greedy generation in
left-padded batches, and the writer of the same tasks as a local lm-evaluation-harness task folder."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import torch
import yaml

from ttt_adapt.eval.settings import TASKS, EvalError, EvalSettings


HAYSTACK_CORPUS = Path(__file__).parents[1] / "assets" / "corpus" / "eval.jsonl"  # `--lm-eval-task`'s default prose


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


def attention_reach(config) -> int | None:
    """How far back attention alone can carry a token: `num_hidden_layers x sliding_window` when every attention
    layer of `config` has a sliding window (`layer_types` all "sliding_attention", or, without `layer_types`,
    `use_sliding_window` from layer 0 on), since each layer looks `sliding_window` tokens back; None when some
    layer attends to everything (or there is no window): then attention sees the whole prompt."""
    window = getattr(config, "sliding_window", None)
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(window, int) or window <= 0 or not isinstance(layers, int):
        return None
    types = getattr(config, "layer_types", None)
    if types is not None:
        every = len(types) > 0 and all(t == "sliding_attention" for t in types)
    else:
        every = bool(getattr(config, "use_sliding_window", False)) and getattr(config, "max_window_layers", 0) == 0
    return layers * window if every else None


def make_samples(task: str, length: int, n: int, tokenizer, filler: list[list[int]], seed: int,
                 min_distance: int | None = None) -> list[dict]:
    """`n` prompts of `task` of exactly `length` tokens, the same for the same seed.

    `filler` holds the token ids of haystack sentences (each tokenised with a leading space). A sample holds
    `input_ids`, `prompt` (its text), `answers`, `min_distance` and `needles` ({text, depth, position, distance}:
    the needle's first token is `input_ids[position]`, `distance` the tokens from its last token to the question's
    first). Depths are drawn in [0, 1) over the haystack; with `min_distance` (the model's `attention_reach`) over
    the part of it at least `min_distance` tokens before the question only, so that attention cannot carry any
    needle to the question: only the fast weights can. Without it, `position / length` is about `depth`."""
    if task not in TASKS:
        raise EvalError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    if not filler:
        raise EvalError("the corpus has no plain prose sentences (no digits or colons) to build haystacks from")
    rng = random.Random(f"ttt_adapt.evaluate/{seed}/{task}/{length}")  # a str seed is hashed stably
    return [_sample(task, length, tokenizer, filler, rng, min_distance) for _ in range(n)]


def _sample(task, length, tokenizer, filler, rng, min_distance=None) -> dict:
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
    else:  # variable_tracking: two chains, a value then copies; each chain's lines in order
        needles, depths, chains = [], [], []
        for _ in range(2):
            value, names = fresh(lambda: str(rng.randint(100, 999))), [fresh(lambda: _name(rng, 1)) for _ in range(4)]
            needles += [f" let {names[0]} = {value};"] + [f" let {b} = {a};" for a, b in zip(names, names[1:])]
            depths += sorted(rng.random() for _ in names)
            chains.append((names[-1], value))
        query, answer = f"\n\nQ: What is the value of {chains[0][0]}? A:", chains[0][1]

    def next_piece():  # of the haystack: more key-value lines for kv_retrieval, else a prose sentence
        if task == "kv_retrieval":
            return _encode(tokenizer, f"Vault {vault_name()} holds code {rng.choice(codes)}.\n")
        return filler[rng.randrange(len(filler))]

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
    # the haystack a needle may go into: all of it, or what lies >= min_distance tokens before the question (a
    # needle at boundary b is followed by budget - b haystack tokens, the needles after it, then the question)
    room = budget if min_distance is None else budget - min_distance + 1
    if room < 0:
        raise EvalError(f"task length {length} is too short for {task} beyond the attention window: its needles must "
                        f"lie {min_distance}+ tokens before the question (the model's sliding window x its layers), "
                        f"which leaves no room; use lengths of {length - room}+ tokens")
    bounds = [b for b in bounds if b <= room]
    # each needle goes to the piece boundary nearest its depth; ties keep the needles' order (chains stay in order)
    at = [min(bounds, key=lambda b: abs(b - d * room)) for d in depths]
    ids, cursor, positions = list(prefix), 0, [0] * len(needles)
    for i in sorted(range(len(needles)), key=lambda i: (at[i], i)):
        ids += hay[cursor : at[i]]
        cursor = at[i]
        positions[i] = len(ids)
        ids += needle_ids[i]
    ids += hay[cursor:]
    question = len(ids)
    ids += query_ids
    return {
        "task": task,
        "length": length,
        "input_ids": ids,
        "prompt": tokenizer.decode(ids, skip_special_tokens=True),
        "answers": [answer],
        "min_distance": min_distance,
        "needles": [{"text": t.strip(), "depth": round(d, 4), "position": p, "distance": question - (p + len(n) - 1)}
                    for t, d, p, n in zip(needles, depths, positions, needle_ids)],
    }


def task_samples(settings: EvalSettings, tokenizer, docs: list[str], window: int | None = None) -> list[dict]:
    """Every prompt of `settings.tasks` x `settings.lengths`, haystacks from the prose of `docs`; needles at least
    `window` tokens before the question when given (the model's `attention_reach`)."""
    if not settings.tasks:
        return []
    filler = [_encode(tokenizer, " " + s) for s in filler_sentences(docs)]
    return [s for task in settings.tasks for length in settings.lengths
            for s in make_samples(task, length, settings.num_samples, tokenizer, filler, settings.seed, window)]


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


LM_EVAL_UTILS = '''"""Scoring of the ttt-adapt synthetic tasks (written by ttt_adapt.eval.write_lm_eval_task)."""


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
