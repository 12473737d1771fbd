"""The synthetic corpus and the tiny base model shipped with the package."""

import json
import re
from pathlib import Path

import pytest
import torch

from ttt_adapt.data.corpus import RECALL_GAP, generate_documents, recall_spans, write_corpus

ASSETS = Path(__file__).resolve().parent.parent / "ttt_adapt" / "assets"
BASE = ASSETS / "tiny_qwen3_base"


def read_jsonl(path) -> list[str]:
    return [json.loads(line)["text"] for line in open(path)]


def previous_mention(text: str, answer: str, before: int) -> int | None:
    """Start of the last whole-word occurrence of `answer` in text[:before], or None."""
    starts = [m.start() for m in re.finditer(rf"(?<!\w){re.escape(answer)}(?!\w)", text[:before])]
    return starts[-1] if starts else None


def test_deterministic_for_a_seed():
    assert generate_documents(8, seed=3) == generate_documents(8, seed=3)
    assert generate_documents(8, seed=3)[:4] == generate_documents(4, seed=3)
    assert generate_documents(4, seed=3) != generate_documents(4, seed=4)
    assert generate_documents(4, seed=-3) != generate_documents(4, seed=3)


@pytest.mark.parametrize("min_chars, max_chars", [(2000, 8000), (2500, 6000)])
def test_lengths_in_range(min_chars, max_chars):
    lengths = [len(d) for d in generate_documents(200, seed=1, min_chars=min_chars, max_chars=max_chars)]
    assert min_chars <= min(lengths) and max(lengths) <= max_chars
    assert max(lengths) - min(lengths) > (max_chars - min_chars) / 2  # spread over the range


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        generate_documents(1, seed=0, min_chars=5000, max_chars=5100)
    with pytest.raises(ValueError):
        generate_documents(-1, seed=0)


def test_write_corpus_splits_are_disjoint(tmp_path):
    paths = write_corpus(tmp_path, n_train=40, n_eval=20, seed=0)
    train, eval_ = read_jsonl(paths["train"]), read_jsonl(paths["eval"])
    assert (len(train), len(eval_)) == (40, 20)
    assert train == generate_documents(40, seed=0) and eval_ == generate_documents(20, seed=1)
    cast_line = lambda d: d.split("\n")[2]  # noqa: E731  the doc-specific names
    assert not {cast_line(d) for d in train} & {cast_line(d) for d in eval_}


def test_answers_are_recalled_from_far_back():
    """Every query answer was stated before, but never in the RECALL_GAP characters just before it."""
    docs = generate_documents(100, seed=5)
    n_queries = 0
    for doc in docs:
        spans = recall_spans(doc)
        assert spans, "every document queries at least one binding"
        for start, end in spans:
            prev = previous_mention(doc, doc[start:end], start)
            assert prev is not None and start - prev >= RECALL_GAP > 300
        n_queries += len(spans)
    assert n_queries >= 5 * len(docs)


def test_answers_match_their_bindings():
    for doc in generate_documents(50, seed=6):
        codes = dict(re.findall(r"[Vv]ault,? (\w+),? (?:holds|was sealed with) code (\d+)\.", doc))
        values = dict(re.findall(r"let (\w+) = (\d+);", doc))
        for vault, code in re.findall(r"Q: What code opens vault (\w+)\? A: (\d+)\.", doc):
            assert codes[vault] == code
        for var, value in re.findall(r"Q: What is the value of (\w+)\? A: (\d+)\.", doc):
            assert values[var] == value


def test_shipped_corpus_is_reproducible(tmp_path):
    train, eval_ = read_jsonl(ASSETS / "corpus" / "train.jsonl"), read_jsonl(ASSETS / "corpus" / "eval.jsonl")
    paths = write_corpus(tmp_path, len(train), len(eval_), seed=0)
    assert Path(paths["train"]).read_bytes() == (ASSETS / "corpus" / "train.jsonl").read_bytes()
    assert Path(paths["eval"]).read_bytes() == (ASSETS / "corpus" / "eval.jsonl").read_bytes()
    assert sum(f.stat().st_size for f in (ASSETS / "corpus").iterdir()) <= 6e6


@pytest.fixture(scope="module")
def offline():
    """Offline for the whole module: loading the shipped base must not need the Hub."""
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def base(offline):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(BASE).eval(), AutoTokenizer.from_pretrained(BASE)


def test_shipped_base_is_small_and_tokenizer_lossless(base):
    model, tok = base
    assert sum(f.stat().st_size for f in BASE.iterdir()) <= 20e6
    assert model.config.model_type == "qwen3" and model.config.vocab_size == len(tok)
    assert tok.eos_token_id is not None and tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    doc = read_jsonl(ASSETS / "corpus" / "eval.jsonl")[0]
    assert tok.decode(tok(doc)["input_ids"]) == doc


def test_shipped_base_attention_is_windowed(base):
    model, _ = base
    cfg = model.config
    assert set(cfg.layer_types) == {"sliding_attention"} and cfg.sliding_window == 64
    reach = cfg.num_hidden_layers * (cfg.sliding_window - 1)  # each layer looks sliding_window - 1 tokens back
    x = torch.randint(2, cfg.vocab_size, (1, reach + 40))
    y = x.clone()
    y[0, 0] = (x[0, 0] + 1) % cfg.vocab_size
    with torch.no_grad():
        changed = (model(x).logits != model(y).logits).any(-1)[0]
    assert changed[0] and not changed[reach + 1 :].any()


def test_shipped_base_learned_local_but_not_long_range_structure(base):
    """Held-out loss is far below the unigram entropy, but higher on the answers only a memory could recall."""
    model, tok = base
    recall, other, all_ids = [], [], []
    for doc in read_jsonl(ASSETS / "corpus" / "eval.jsonl")[:3]:
        enc = tok(doc, return_offsets_mapping=True)
        ids = torch.tensor([enc["input_ids"]])
        all_ids.append(ids[0])
        with torch.no_grad():
            losses = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="none")
        spans = recall_spans(doc)
        for loss, (s, e) in zip(losses, enc["offset_mapping"][1:]):
            (recall if any(s < se and e > ss for ss, se in spans) else other).append(loss.item())
    freqs = torch.bincount(torch.cat(all_ids)).double()
    freqs = freqs[freqs > 0] / freqs.sum()
    unigram_entropy = -(freqs * freqs.log()).sum().item()
    other_loss, recall_loss = sum(other) / len(other), sum(recall) / len(recall)
    assert other_loss < 0.5 * unigram_entropy
    assert recall_loss > other_loss + 0.2  # answers are close to guesses (a uniform digit costs ln 10 = 2.3)
