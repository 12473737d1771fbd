"""Evaluation: what In-Place TTT buys over its base, measured offline.

    from ttt_adapt.eval import EvalSettings, run_evaluation
    report = run_evaluation(EvalSettings(corpus="held_out.jsonl", lengths=[512, 1024]),
                            base="path/to/base", adapted="exports/my-ttt-model", out_dir="runs/x/eval")

Three models are measured: the base, the base freshly converted (`convert`, step-0 TTT weights: it must equal
the base, and the report records whether it does) and the adapted model, which is measured twice more to tell
what its fast weights learn from the context from a context-independent shift:
- swapped state: each held-out document read with the fast weights another held-out document at least as long
  writes (cut to its length), chunk for chunk: chunk c of document A reads W_down + sum_{c' < c} dW_c'(B) while
  attention, h and everything else come from A (`fast_weight_sources`). own - swapped per bin, with a bootstrap
  interval over documents (`bootstrap_difference`): below 0, the fast weights carry what the document said; the
  gain over the base that survives the swap is adaptation.
- no state: the fast weights never written (every TTT MLP computes `down_proj(h)` alone).

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
`adapted_swapped_state`, `adapted_no_state`, each with `loss_by_position` (one value per bin),
`recall_loss_by_position` and, for base and adapted, `tasks` {task: {length: accuracy}}; `own_minus_swapped` with
{mean, low, high} per bin, `documents`, `resamples`, `confidence`),
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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from ttt_adapt.config import RecipeError, looks_like_local_path
from ttt_adapt.convert import convert
from ttt_adapt.corpus import recall_spans
from ttt_adapt.modeling.configuration_ttt import TTTConfig
from ttt_adapt.modeling.ttt_layer import INIT, TTTMLP, ZERO, FlatLayout, fast_weight_scan

TASKS = ("niah_single", "niah_multikey", "kv_retrieval", "variable_tracking")
LOGIT_SLICE = 1024  # positions whose logits exist at once: (batch, 1024, vocab), not (batch, seq_len, vocab)
EQUAL_ATOL = 1e-5  # converted vs base, per-token loss: the TTT path at step 0 must change nothing
HAYSTACK_CORPUS = Path(__file__).parents[1] / "assets" / "corpus" / "eval.jsonl"  # `--lm-eval-task`'s default prose
RESAMPLES, CONFIDENCE = 1000, 0.95  # the bootstrap interval of own - swapped, over documents


class EvalError(RecipeError):
    """Bad evaluation input (missing model or corpus, empty corpus, lengths beyond the model, bad settings).

    The message is one line."""


@dataclass
class EvalSettings:
    """What to evaluate; the keys of a recipe's `eval` section.

    Args:
        corpus: held-out documents, a .jsonl (one JSON object per line, text in `text_field`) or a .txt file (one
            document); from a recipe, default `data.eval_path`.
        seq_len: tokens per document for the loss by position; from a recipe, default `data.seq_len`.
        bin_edges: position bin edges, from 0 up to `seq_len`; default powers of two from 64 (0, 64, 128, ..., seq_len).
        lengths: prompt lengths (tokens) of the synthetic tasks.
        tasks: which synthetic tasks (`TASKS`); empty for none.
        num_samples: prompts per task and length.
        max_docs: held-out documents used for the loss (the first ones of the file); null for all.
        batch_size: rows per forward / generate call.
        max_new_tokens: greedy tokens generated per prompt.
        seed: the synthetic tasks' seed (the same seed gives the same prompts).
    """

    corpus: str | None = None
    text_field: str = "text"
    seq_len: int = 1024
    bin_edges: list[int] | None = None
    lengths: list[int] = field(default_factory=lambda: [512, 1024])
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    num_samples: int = 8
    max_docs: int | None = 32
    batch_size: int = 8
    max_new_tokens: int = 8
    seed: int = 0

    @classmethod
    def from_dict(cls, raw: dict, prefix: str = "eval") -> EvalSettings:
        """Build from a plain mapping (a recipe's `eval` section), checking keys and types; one-line EvalError."""
        if not isinstance(raw, dict):
            raise EvalError(f"{prefix}: must be a mapping of settings")
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in raw.items():
            if key not in known:
                raise EvalError(f"{prefix}.{key}: unknown key (known: {', '.join(known)})")
            kind = {"corpus": str, "text_field": str, "bin_edges": list, "lengths": list, "tasks": list}.get(key, int)
            if value is None and key in ("corpus", "bin_edges", "max_docs"):
                continue
            if isinstance(value, bool) or not isinstance(value, kind):
                expected = {int: "an integer", str: "a string", list: "a list"}[kind]
                raise EvalError(f"{prefix}.{key}: expected {expected}, got {value!r}")
        return cls(**raw).validate(prefix)

    def validate(self, prefix: str = "eval") -> EvalSettings:
        """Check values (not files or models); return self."""
        def positive(key, value, minimum=1):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise EvalError(f"{prefix}.{key}: must be an integer >= {minimum}, got {value!r}")

        positive("seq_len", self.seq_len, 2)
        for key in ("num_samples", "batch_size", "max_new_tokens"):
            positive(key, getattr(self, key))
        positive("seed", self.seed, 0)
        if self.max_docs is not None:
            positive("max_docs", self.max_docs)
        for length in self.lengths:
            positive("lengths", length, 16)
        if len(set(self.lengths)) != len(self.lengths):
            raise EvalError(f"{prefix}.lengths: repeats a length: {self.lengths}")
        for task in self.tasks:
            if task not in TASKS:
                raise EvalError(f"{prefix}.tasks: unknown task {task!r} (known: {', '.join(TASKS)})")
        if self.tasks and not self.lengths:
            raise EvalError(f"{prefix}.lengths: is empty; name at least one length for the tasks")
        if self.bin_edges is not None:
            edges = self.bin_edges
            if not all(isinstance(e, int) and not isinstance(e, bool) for e in edges) or len(edges) < 2 \
                    or edges[0] != 0 or edges[-1] != self.seq_len or any(a >= b for a, b in zip(edges, edges[1:])):
                raise EvalError(
                    f"{prefix}.bin_edges: must be increasing integers from 0 to seq_len={self.seq_len}, got {edges}"
                )
        return self

    @property
    def bins(self) -> list[int]:
        return self.bin_edges or position_bins(self.seq_len)


def position_bins(seq_len: int, first: int = 64) -> list[int]:
    """Bin edges 0, first, 2*first, 4*first, ... up to `seq_len` (the last bin ends at `seq_len`)."""
    edges, edge = [0], first
    while edge < seq_len:
        edges.append(edge)
        edge *= 2
    return edges + [seq_len]


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

    name = str(name_or_path)
    if looks_like_local_path(name) and not Path(name).is_dir():
        raise EvalError(f"no such model folder: {name}")
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=getattr(torch, dtype))
    except (OSError, ValueError, KeyError) as e:
        raise EvalError(f"cannot load a model from {name}: {_first_line(e)}") from None
    return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()


def _config(model_or_path):
    """The config of a loaded model (peft unwrapped) or of a model folder / hub id; one-line errors."""
    if not isinstance(model_or_path, (str, Path)):
        return _unwrap(model_or_path).config
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, model_or_path, "a model config")


def load_tokenizer(name_or_path):
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, name_or_path, "a tokenizer")


def _from_pretrained(auto_class, name_or_path, what: str):
    """`auto_class.from_pretrained` with one-line errors for a missing folder or an unloadable one."""
    name = str(name_or_path)
    if looks_like_local_path(name) and not Path(name).is_dir():
        raise EvalError(f"no such model folder: {name}")
    try:
        return auto_class.from_pretrained(name)
    except (OSError, ValueError, KeyError) as e:
        raise EvalError(f"cannot load {what} from {name}: {_first_line(e)}") from None


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
    """(N, L) loss of predicting token j from tokens < j (column 0 and padding: 0)."""
    lm = _unwrap(model)  # peft injects LoRA in place: the unwrapped modules still apply it
    ids, mask = rows["input_ids"], rows["attention_mask"]
    return torch.cat([_batch_losses(lm, ids[i : i + batch_size], mask[i : i + batch_size])
                      for i in range(0, len(ids), batch_size)])


@torch.no_grad()
def swapped_token_losses(model, rows: dict, partners: list[int | None], batch_size: int) -> torch.Tensor:
    """`token_losses` of each document read with the fast weights its partner (`swap_partners`) writes, chunk for
    chunk; documents without a partner: 0. Each forward holds the documents and their partners (cut to the
    documents' lengths), about `batch_size` rows."""
    lm = _unwrap(model)
    ids, mask = rows["input_ids"], rows["attention_mask"]
    out = torch.zeros(ids.shape)
    docs = [i for i, p in enumerate(partners) if p is not None]
    step = max(1, batch_size // 2)
    for k in range(0, len(docs), step):
        batch = docs[k : k + step]
        donors = [partners[i] for i in batch]
        n = len(batch)
        with fast_weight_sources(lm, [n + i for i in range(n)] * 2):  # rows i read row n + i; those their own
            losses = _batch_losses(lm, torch.cat([ids[batch], ids[donors]]), torch.cat([mask[batch], mask[batch]]))
        out[batch] = losses[:n]
    return out


@torch.no_grad()
def stateless_token_losses(model, rows: dict, batch_size: int) -> torch.Tensor:
    """`token_losses` with the fast weights never written: every TTT MLP computes `down_proj(h)` alone."""
    with fast_weight_sources(model, None):
        return token_losses(model, rows, batch_size)


def _batch_losses(lm, x, m):
    """Runs the decoder (`lm.model`) once and the LM head on `LOGIT_SLICE` positions at a time: a 150k vocabulary
    at 32k positions would not fit as one logits tensor."""
    device = next(lm.parameters()).device
    x, m = x.to(device), m.to(device)
    hidden = lm.model(input_ids=x, attention_mask=m.long(), use_cache=False).last_hidden_state
    loss = torch.zeros(x.shape, dtype=torch.float32, device=device)
    for s in range(0, x.shape[1] - 1, LOGIT_SLICE):
        e = min(s + LOGIT_SLICE, x.shape[1] - 1)
        logits = lm.lm_head(hidden[:, s:e]).float()
        loss[:, s + 1 : e + 1] = F.cross_entropy(logits.transpose(1, 2), x[:, s + 1 : e + 1], reduction="none")
    return (loss * m).cpu()


def bin_means(losses: torch.Tensor, weights: torch.Tensor, edges: list[int]) -> list[float | None]:
    """Mean of `losses` where `weights` is set, per position bin [edges[k], edges[k+1]); None for an empty bin."""
    means = []
    for a, b in zip(edges, edges[1:]):
        w = weights[:, a:b].double()
        n = float(w.sum())
        means.append(float((losses[:, a:b].double() * w).sum() / n) if n else None)
    return means


def bootstrap_difference(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor, edges: list[int],
                         resamples: int = RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0) -> list[dict | None]:
    """Per position bin: the token-weighted mean of `a - b` (N documents x L positions, where `weights` is set) and
    its percentile bootstrap interval, documents resampled with replacement; None for an empty bin or < 2 documents.
    """
    n = a.shape[0]
    draws = torch.randint(n, (resamples, n), generator=torch.Generator().manual_seed(seed)) if n else None
    quantiles = torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=torch.float64)
    out = []
    for lo, hi in zip(edges, edges[1:]):
        w = weights[:, lo:hi].double()
        sums, counts = ((a - b)[:, lo:hi].double() * w).sum(1), w.sum(1)
        if n < 2 or not counts.sum():
            out.append(None)
            continue
        boot = sums[draws].sum(1) / counts[draws].sum(1)  # a resample without tokens in the bin: nan, left out
        low, high = torch.nanquantile(boot, quantiles).tolist()
        out.append({"mean": float(sums.sum() / counts.sum()), "low": low, "high": high})
    return out


def targets(rows: dict) -> torch.Tensor:
    """Positions whose token is predicted: real tokens except each row's first."""
    t = rows["attention_mask"].clone()
    t[:, 0] = False
    return t


# ------------------------------------------------------------------------------------------------ swapped state


def swap_partners(lengths: list[int]) -> list[int | None]:
    """For each document, another one at least as long whose fast weights it reads in the swapped control (cut to
    its length, so of the same length); None for the single longest document when no other is as long.

    Documents are ordered by length (longest first, then by index); each reads its predecessor's state, the first
    one its successor's."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    partners = [None] * len(lengths)
    for k, i in enumerate(order):
        if k > 0:
            partners[i] = order[k - 1]
        elif len(order) > 1 and lengths[order[1]] == lengths[i]:
            partners[i] = order[1]
    return partners


@contextmanager
def fast_weight_sources(model, sources: list[int | None] | None):
    """Inside, every forward of `model` (a TTT model, no cache) reads fast weights per row as `sources` says:
    `sources[r] == r` its own, `j` row j's (a row reading its own, and as long as row r), None none (the TTT MLPs
    then compute plain `down_proj(h)`); `sources=None`: no row reads any.

    Row r's chunk c reads `W_down + sum_{c' < c} dW_c'` of row j, chunk for chunk, while attention, h and everything
    else come from row r itself. Row j's updates are computed by the TTT layer's own functions from row j's
    activations in the same forward, so later TTT layers see row j's own-state activations."""
    mlps = [m for m in _unwrap(model).modules() if isinstance(m, TTTMLP)]
    if not mlps:
        raise EvalError("the swapped-state control needs an In-Place TTT model (no TTT layer found)")
    hooks = [m.register_forward_hook(lambda mlp, args, out: _read_sources(mlp, args[0], out, sources)) for m in mlps]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _read_sources(mlp, x, y, sources):
    """The TTT MLP's output `y` with each row's fast-weight read replaced as `sources` says."""
    ctx = mlp.ttt_context
    if ctx is None or ctx.layer_states is not None or ctx.parallel is not None:
        raise RuntimeError("fast_weight_sources: the TTT layer ran without its context, with a cache or under context "
                           "parallelism; call the model with use_cache=False")
    sources = [None] * x.shape[0] if sources is None else sources
    if len(sources) != x.shape[0]:
        raise RuntimeError(f"fast_weight_sources: {len(sources)} sources for a batch of {x.shape[0]} rows")
    changed = [r for r, s in enumerate(sources) if s != r]
    if not changed:
        return y
    swapped = [r for r in changed if sources[r] is not None]
    lengths = [x.shape[1]] * x.shape[0] if ctx.valid is None else ctx.valid.sum(1).tolist()
    if any(lengths[sources[r]] < lengths[r] for r in swapped):
        raise RuntimeError("fast_weight_sources: a row may only read the fast weights of a row at least as long")
    y = y.clone()
    h = mlp.inner(x[changed])
    y[changed] = mlp.down_proj(h)
    if swapped:
        donors = sorted({sources[r] for r in swapped})
        if any(sources[j] != j for j in donors):
            raise RuntimeError("fast_weight_sources: a row may only read the fast weights of a row that reads its own")
        states, donor_seg = _states_after_each_chunk(mlp, x, ctx, donors)
        first_unit = {j: donor_seg.rows.index(k) for k, j in enumerate(donors)}
        pick = [changed.index(r) for r in swapped]
        read = _read_states(mlp, h[pick], _rows(ctx.valid, swapped), states,
                            [first_unit[sources[r]] for r in swapped])
        y[swapped] = y[swapped] + read.to(y.dtype)
    return y


def _states_after_each_chunk(mlp, x, ctx, rows):
    """(U, d, H): the fast-weight state after each chunk of `rows` (each row one document, from position 0), by the
    layer's own target and scan functions; and the rows' Segments (unit u of row k: `rows[k]`'s chunk)."""
    t = x if mlp.target == "hidden_states" else ctx.inputs_embeds
    layout = FlatLayout(len(rows), x.shape[1], mlp.chunk_size, _rows(ctx.valid, rows), None, None, x.device)
    seg = layout.seg
    xf, tf = layout.flatten(x[rows]), layout.flatten(t[rows])
    hf = layout.flatten(mlp.inner(x[rows]))
    a = mlp.ttt.targets(tf, xf, hf, seg, mlp.clip_update_norm)
    U = seg.num_units
    every = dataclasses.replace(seg, num_rows=U, rows=list(range(U)), read=[False] * U, write=[True] * U,
                                final=[True] * U, init_index=None)
    _, after = fast_weight_scan(hf, a, every)
    return after, seg


def _read_states(mlp, h, valid, states, first_unit):
    """Fast-weight read of rows whose chunk c reads `states[first_unit[row] + c - 1]` (chunk 0 reads nothing)."""
    layout = FlatLayout(h.shape[0], h.shape[1], mlp.chunk_size, valid, None, None, h.device)
    seg = layout.seg
    chunk = [u - seg.rows.index(r) for u, r in enumerate(seg.rows)]  # chunk index of each unit in its row
    index = [first_unit[r] + c - 1 for r, c in zip(seg.rows, chunk)]
    U = seg.num_units
    reads = dataclasses.replace(seg, start_state=[ZERO if c == 0 else INIT for c in chunk], read=[c > 0 for c in chunk],
                                write=[False] * U, final=[False] * U, init_index=[max(i, 0) for i in index])
    hf = layout.flatten(h)
    out, _ = fast_weight_scan(hf, hf.new_zeros(hf.shape[0], states.shape[1]), reads, states)
    return layout.unflatten(out)


def _rows(valid, rows):
    return None if valid is None else valid[rows]


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
    weights = {"all": targets(rows), "recall": targets(rows) & rows["recall"]}

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
        result = by_position(losses, weights, edges)
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
        adapted_losses = measure("adapted", adapted_model)
        report.update(state_controls(adapted_model, rows, adapted_losses, weights, settings, log))
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


def by_position(losses: torch.Tensor, weights: dict, edges: list[int]) -> dict:
    """`loss_by_position` (all predicted tokens) and, when the corpus has query answers, `recall_loss_by_position`."""
    result = {"loss_by_position": bin_means(losses, weights["all"], edges)}
    if weights["recall"].any():
        result["recall_loss_by_position"] = bin_means(losses, weights["recall"], edges)
    return result


def state_controls(model, rows: dict, own: torch.Tensor, weights: dict, settings: EvalSettings, log=print) -> dict:
    """The fast-weight controls of the adapted model: `adapted_swapped_state` (each document read with the fast
    weights of another, `swap_partners`), `adapted_no_state` (fast weights never written) and `own_minus_swapped`
    (per bin, own - swapped loss with its bootstrap interval over the documents that have a partner)."""
    edges = settings.bins
    partners = swap_partners(rows["attention_mask"].sum(1).tolist())
    paired = [i for i, p in enumerate(partners) if p is not None]
    log(f"evaluate: adapted: swapped-state and no-state controls on {len(paired)} documents")
    swapped = swapped_token_losses(model, rows, partners, settings.batch_size)[paired]
    kept = {k: w[paired] for k, w in weights.items()}
    difference = {"documents": len(paired), "resamples": RESAMPLES, "confidence": CONFIDENCE}
    for key, w in (("loss_by_position", kept["all"]), ("recall_loss_by_position", kept["recall"])):
        if key == "loss_by_position" or w.any():
            difference[key] = bootstrap_difference(own[paired], swapped, w, edges, seed=settings.seed)
    return {
        "adapted_swapped_state": {"documents": len(paired), **by_position(swapped, kept, edges)},
        "adapted_no_state": by_position(stateless_token_losses(model, rows, settings.batch_size), weights, edges),
        "own_minus_swapped": difference,
    }


def settings_from_recipe(recipe, model_config=None) -> EvalSettings:
    """The recipe's `eval` section as `EvalSettings` (corpus default `data.eval_path`, seq_len default
    `data.seq_len`), its corpus checked to exist, and its lengths checked against `model_config` if given."""
    raw = dict(recipe.eval or {})
    raw.setdefault("corpus", recipe.data.eval_path)
    raw.setdefault("seq_len", recipe.data.seq_len)
    settings = EvalSettings.from_dict(raw)
    if settings.corpus is None:
        raise EvalError("eval.corpus: not set, and the recipe has no data.eval_path to default to")
    if not Path(settings.corpus).is_file():
        raise EvalError(f"eval.corpus: no such file: {settings.corpus}")
    if model_config is not None:
        check_lengths(settings, model_config, recipe.model.name_or_path)
    return settings


def evaluate_recipe(recipe, adapted, out_dir=None) -> dict:
    """`run_evaluation` for a training run: its base (`model.name_or_path`), `adapted` (the trained model in memory,
    or a folder), the recipe's `eval` settings; writes `<train.output_dir>/eval/` unless `out_dir` is given."""
    out_dir = out_dir if out_dir is not None else Path(recipe.train.output_dir) / "eval"
    return run_evaluation(settings_from_recipe(recipe), recipe.model.name_or_path, adapted, out_dir,
                          dtype=recipe.model.dtype)


# ------------------------------------------------------------------------------------------------ outputs


MODELS = {  # report entry -> column / legend label, in table order
    "base": "base",
    "adapted": "adapted",
    "adapted_swapped_state": "adapted, swapped state",
    "adapted_no_state": "adapted, no state",
}


def markdown_table(report: dict) -> str:
    """The evaluation table (report.md and the model card): one row per position bin (all tokens, then recall
    answers) and per task and length; a column per model of `MODELS` in the report, adapted - base, and own -
    swapped with its bootstrap interval when the report has the swapped-state control."""
    edges = report["bins"]
    models = [m for m in MODELS if isinstance(report.get(m), dict)]
    control = report.get("own_minus_swapped")
    header = ["metric", *(MODELS[m] for m in models), "adapted - base"]
    if control:
        header.append(f"own - swapped ({control['confidence']:.0%} CI)")
    rows = []
    for key, label in (("loss_by_position", "loss"), ("recall_loss_by_position", "recall-answer loss")):
        if key not in report["base"]:
            continue
        for k, (a, b) in enumerate(zip(edges, edges[1:])):
            values = [(report[m].get(key) or [None] * len(edges))[k] for m in models]
            if all(v is None for v in values):
                continue  # no such tokens in this bin (e.g. no recall answer that early)
            interval = (control.get(key) or [None] * len(edges))[k] if control else None
            rows.append([f"{label}, positions {a}-{b}", values, interval])
    for task, by_length in report["base"].get("tasks", {}).items():
        for length in by_length:
            values = [report[m].get("tasks", {}).get(task, {}).get(length) for m in models]
            rows.append([f"{task} @ {length} tokens (accuracy)", values, None])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for metric, values, interval in rows:
        by = dict(zip(models, values))
        delta = _diff(by.get("adapted"), by.get("base"))
        cells = [metric, *map(_fmt, values), delta] + ([_interval(interval)] if control else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + _notes(report)


def _notes(report: dict) -> str:
    notes = []
    converted = report.get("converted", {})
    if "equals_base" in converted:
        notes.append(f"Freshly converted model vs base: max |per-token loss difference| = "
                     f"{converted['max_abs_loss_diff']:.2g} ({'equal' if converted['equals_base'] else 'NOT equal'}).")
    control = report.get("own_minus_swapped")
    if control:
        notes.append(f"Swapped state: each of {control['documents']} documents read with the fast weights another "
                     "held-out document of its length writes, chunk for chunk (attention still sees the document "
                     "itself); no state: fast weights never written. own - swapped below 0, its interval too: the fast "
                     "weights carry what the document itself said; the gain that survives the swap is adaptation.")
    return "".join(f"\n{n}\n" for n in notes)


def _diff(a, b) -> str:
    return _fmt(a - b, "+") if a is not None and b is not None else ""


def _interval(d) -> str:
    return "" if d is None else f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"


def plot_loss_by_position(report: dict, path) -> None:
    """PNG: loss per position bin (and recall-answer loss, when measured) for base, converted, adapted and the
    adapted model's state controls; then own - swapped with its interval, when measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = report["bins"]
    x = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
    keys = [k for k in ("loss_by_position", "recall_loss_by_position") if k in report["base"]]
    control = report.get("own_minus_swapped")
    fig, axes = plt.subplots(1, len(keys) + bool(control), figsize=(6 * (len(keys) + bool(control)), 4), squeeze=False)
    styles = {"base": "o-", "converted": "x:", "adapted": "s-", "adapted_swapped_state": "d--", "adapted_no_state": "^:"}
    for ax, key in zip(axes[0], keys):
        for name, style in styles.items():
            values = report.get(name, {}).get(key)
            if values:
                ax.plot(*_points(x, values), style, label=MODELS.get(name, name))
        _axes(ax, x, edges, "loss (nats/token)",
              "all tokens" if key == "loss_by_position" else "answers of long-range queries")
    if control:
        ax = axes[0][-1]
        for key, style in (("loss_by_position", "s-"), ("recall_loss_by_position", "d--")):
            intervals = [(xi, d) for xi, d in zip(x, control.get(key) or []) if d is not None]
            if intervals:
                mean = [d["mean"] for _, d in intervals]
                err = [[m - d["low"] for m, (_, d) in zip(mean, intervals)],
                       [d["high"] - m for m, (_, d) in zip(mean, intervals)]]
                ax.errorbar([xi for xi, _ in intervals], mean, yerr=err, fmt=style, capsize=3,
                            label="all tokens" if key == "loss_by_position" else "recall answers")
        ax.axhline(0, color="grey", lw=0.8)
        _axes(ax, x, edges, "own - swapped loss (nats/token)", f"own - swapped state ({control['confidence']:.0%} CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _points(x, values):
    return [xi for xi, v in zip(x, values) if v is not None], [v for v in values if v is not None]


def _axes(ax, x, edges, ylabel, title):
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [f"{a}-{b}" for a, b in zip(edges, edges[1:])], rotation=30, fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("position in document (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()


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


# ------------------------------------------------------------------------------------------------ helpers


def _unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _describe(model) -> str:
    return str(model) if isinstance(model, (str, Path)) else f"{type(_unwrap(model)).__name__} (in memory)"


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fmt(v, sign: str = "") -> str:
    return "" if v is None else f"{v:{sign}.4f}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


__all__ = [
    "HAYSTACK_CORPUS",
    "load_model",
    "load_tokenizer",
    "check_lengths",
    "MODELS",
    "EvalError",
    "EvalSettings",
    "TASKS",
    "position_bins",
    "read_corpus",
    "tokenize_documents",
    "token_losses",
    "bin_means",
    "bootstrap_difference",
    "swap_partners",
    "fast_weight_sources",
    "swapped_token_losses",
    "stateless_token_losses",
    "state_controls",
    "filler_sentences",
    "make_samples",
    "task_samples",
    "score",
    "generate",
    "run_evaluation",
    "settings_from_recipe",
    "evaluate_recipe",
    "markdown_table",
    "plot_loss_by_position",
    "write_lm_eval_task",
]
