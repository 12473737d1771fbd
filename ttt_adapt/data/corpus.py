"""Synthetic long documents with long-range structure: the offline corpus of the tiny demo.

Every document invents its own cast (made-up names), a motto and a registry of bindings
(vault -> code, variable -> value, person -> street, person -> pet), states them near the top,
then alternates locally predictable prose with query lines

    Q: What code opens vault Drelvok? A: 4821.

A query restates a binding only if its answer was last written at least `RECALL_GAP` characters
earlier, and answers are unique within a document, so the answer never sits in the text just
before it. A model that attends to a short window learns the prose and the query templates but
has to guess the answers; a model with a memory of the document can recall them. `recall_spans`
finds the answers, to measure exactly that.

Pure Python and seeded: the same (n, seed) gives the same documents on every machine.
"""

import json
import random
import re
from pathlib import Path

# Well past the receptive field of the tiny base: 4 layers x 63 tokens back ~ 250 tokens ~ 770 characters.
RECALL_GAP = 1200
_MAX_TAIL = 1000  # a document overshoots its target length by at most a paragraph and a query block
_QUERY = re.compile(r"^Q: [^\n]*\? A: ([^\n]+)\.$", re.MULTILINE)

_ONSETS = "b d f g k l m n p r s t v z br dr gr kr pl st tr sh th".split()
_VOWELS = "a e i o u ai ei ou".split()
_CODAS = ["", "", "", "n", "r", "s", "k", "l", "m"]

_TIMES = ["At dawn", "In the morning", "By noon", "In the afternoon", "At dusk", "That night",
          "Before sunrise", "After the rain", "On the first day", "Late in the evening"]
_VERBS = ["carried", "mended", "painted", "found", "sold", "opened", "lost", "cleaned", "counted",
          "watched", "borrowed", "hid", "carved", "measured", "polished"]
_ADJS = ["old", "small", "heavy", "bright", "broken", "wooden", "silver", "quiet", "narrow", "green",
         "crooked", "dusty"]
_NOUNS = ["lantern", "boat", "basket", "door", "clock", "bridge", "cart", "window", "map", "ladder",
          "bell", "fence", "kettle", "rope"]
_SPOTS = ["near the river", "by the mill", "at the market", "behind the school", "on the hill",
          "inside the tower", "along the road", "under the old oak", "at the harbour"]
_WEATHER = ["cold", "windy", "grey", "warm", "wet", "foggy", "still"]
_NUMBERS = "one two three four five six seven eight nine ten eleven twelve".split()
_DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
_COLORS = ["red", "blue", "teal", "amber", "black", "white", "violet", "golden", "grey", "orange"]
_ANIMALS = ["heron", "goat", "fox", "owl", "cat", "hound", "crow", "mule", "otter", "hare"]


def _made_up(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


class _Document:
    """One document being written: the doc-specific vocabulary, bindings, and when each was last seen."""

    def __init__(self, rng: random.Random, target_chars: int):
        self.rng = rng
        self.used: set[str] = set()  # every made-up word and answer, so each is unique in the document
        self.cast = [self.fresh(lambda: _made_up(rng, rng.randint(2, 3)).capitalize()) for _ in range(rng.randint(4, 7))]
        self.towns = [self.fresh(lambda: _made_up(rng, 2).capitalize()) for _ in range(rng.randint(2, 4))]
        self.motto = " ".join(self.fresh(lambda: _made_up(rng, rng.randint(1, 2))) for _ in range(rng.randint(3, 5)))
        self.bindings: list[tuple[str, str]] = []  # (question, answer)
        self.last_seen: list[int] = []  # end offset of the latest mention of each binding's answer
        self.motto_seen = 0
        self.parts: list[str] = []
        self.length = 0
        self.n_bindings = 3 + target_chars // 500

    def fresh(self, make) -> str:
        while (word := make()) in self.used:
            pass
        self.used.add(word)
        return word

    def write(self, text: str) -> None:
        self.parts.append(text)
        self.length += len(text)

    def bind(self, style: str, at: int) -> str:
        """Create a binding, record it, and return the sentence stating it (to be written at offset `at`)."""
        rng = self.rng
        kind = rng.randrange(4)
        if kind == 0:
            vault, code = self.fresh(lambda: _made_up(rng, 2).capitalize()), self.fresh(lambda: str(rng.randint(1000, 9999)))
            question, answer = f"What code opens vault {vault}?", code
            text = {"registry": f"Vault {vault} holds code {code}.", "prose": f"A new vault, {vault}, was sealed with code {code}."}[style]
        elif kind == 1:
            var, value = self.fresh(lambda: _made_up(rng, 1)), self.fresh(lambda: str(rng.randint(10, 999)))
            question, answer = f"What is the value of {var}?", value
            text = {"registry": f"let {var} = {value};", "prose": f"Someone wrote on the wall: let {var} = {value};"}[style]
        elif kind == 2:
            name, street = rng.choice(self.cast), self.fresh(lambda: _made_up(rng, 2).capitalize())
            question, answer = f"On which lane does {name} live?", f"{street} Lane"
            text = {"registry": f"{name} lives on {street} Lane.", "prose": f"{name} moved to a house on {street} Lane."}[style]
        else:
            name = rng.choice(self.cast)
            pet = self.fresh(lambda: f"{rng.choice(_COLORS)} {rng.choice(_ANIMALS)}")
            question, answer = f"What does {name} keep?", f"a {pet}"
            text = {"registry": f"{name} keeps a {pet}.", "prose": f"At the fair, {name} bought a {pet}."}[style]
        self.bindings.append((question, answer))
        self.last_seen.append(at + len(text) - 1)  # the answer ends before the final '.' or ';'
        return text

    def sentence(self) -> str:
        rng, cast, towns = self.rng, self.cast, self.towns
        a, b = rng.sample(cast, 2)
        kind = rng.randrange(7)
        if kind == 0:
            return f"{rng.choice(_TIMES)}, {a} {rng.choice(_VERBS)} the {rng.choice(_ADJS)} {rng.choice(_NOUNS)} {rng.choice(_SPOTS)}."
        if kind == 1:
            t, u = rng.sample(towns, 2)
            return f"{a} and {b} walked from {t} to {u}."
        if kind == 2:
            return f"The weather in {rng.choice(towns)} was {rng.choice(_WEATHER)}, so {a} stayed {rng.choice(['inside', 'home', 'by the fire'])}."
        if kind == 3:
            start = rng.randrange(len(_NUMBERS) - 4)
            return f"{a} counted {', '.join(_NUMBERS[start:start + rng.randint(3, 5)])}."
        if kind == 4:
            start = rng.randrange(len(_DAYS) - 2)
            return f"From {_DAYS[start]} to {_DAYS[start + 2]}, {a} worked {rng.choice(_SPOTS)}, and {_DAYS[start + 1]} was the longest day."
        if kind == 5:
            return f"{a} asked {b} about the {rng.choice(_NOUNS)}, and {b} said it was {rng.choice(_ADJS)}."
        return f"Everyone in {rng.choice(towns)} said the {rng.choice(_NOUNS)} was {rng.choice(_ADJS)}."

    def paragraph(self) -> str:
        text = " ".join(self.sentence() for _ in range(self.rng.randint(2, 4)))
        if self.length - self.motto_seen >= RECALL_GAP and self.rng.random() < 0.3:
            text += f" {self.rng.choice(self.cast)} repeated the motto: {self.motto}."
            self.motto_seen = self.length + len(text)
        elif len(self.bindings) < self.n_bindings and self.rng.random() < 0.3:
            text += " " + self.bind("prose", at=self.length + len(text) + 1)
        return text + "\n\n"

    def queries(self) -> str:
        due = [i for i, seen in enumerate(self.last_seen) if self.length - seen >= RECALL_GAP]
        lines = []
        for i in self.rng.sample(due, min(len(due), self.rng.randint(1, 3))):
            question, answer = self.bindings[i]
            lines.append(f"Q: {question} A: {answer}.\n")
            self.last_seen[i] = self.length + sum(map(len, lines)) - 2
        return "".join(lines) + "\n" if lines else ""


def _document(rng: random.Random, min_chars: int, max_chars: int) -> str:
    return _written(rng, min_chars, max_chars).text


def _written(rng: random.Random, min_chars: int, max_chars: int) -> _Document:
    target = rng.randint(min_chars + 1, max_chars - _MAX_TAIL)
    doc = _Document(rng, target)
    doc.write(f"The chronicle of {doc.towns[0]}, book {doc.fresh(lambda: str(rng.randint(1, 99)))}.\n\n")
    doc.write(f"Cast: {', '.join(doc.cast)}.\nMotto: {doc.motto}.\n\nRegistry:\n")
    for _ in range(max(2, doc.n_bindings // 2)):
        doc.write(doc.bind("registry", at=doc.length) + "\n")
    doc.write("\n")
    while doc.length < target:
        doc.write(doc.queries() if rng.random() < 0.4 else doc.paragraph())
    if "\nQ: " not in "".join(doc.parts):  # short documents end with at least one query
        doc.write(doc.queries())
    doc.text = "".join(doc.parts)[:-1]  # every block ends in a blank line; keep one newline
    return doc


def generate_documents(n: int, seed: int, min_chars: int = 2000, max_chars: int = 8000) -> list[str]:
    """`n` synthetic documents of `min_chars`..`max_chars` characters; the same (n, seed) always gives the same list."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if min_chars < RECALL_GAP or max_chars < min_chars + _MAX_TAIL:
        raise ValueError(f"need min_chars >= {RECALL_GAP} and max_chars >= min_chars + {_MAX_TAIL}, got {min_chars}, {max_chars}")
    # One generator per document, seeded by a str (hashed with sha512: stable across runs and platforms).
    return [_document(random.Random(f"ttt_adapt.corpus/{seed}/{i}"), min_chars, max_chars) for i in range(n)]


def generate_conversations(n: int, seed: int, questions: int = 4, min_chars: int = 2000,
                           max_chars: int = 8000) -> list[list[dict]]:
    """`n` long conversations (`messages` lists): a synthetic document in the first user turn with the first
    question after it, then up to `questions` questions in all, one a turn, each answered by the assistant as the
    document's query lines are (`A: 4821.`). Every question asks for a binding last stated at least `RECALL_GAP`
    characters before the end of the document, so only a memory of the document answers it. Seeded like
    `generate_documents` (the same (n, seed) gives the same list)."""
    if n < 0 or questions < 1:
        raise ValueError(f"need n >= 0 and questions >= 1, got {n}, {questions}")
    if min_chars < RECALL_GAP or max_chars < min_chars + _MAX_TAIL:
        raise ValueError(f"need min_chars >= {RECALL_GAP} and max_chars >= min_chars + {_MAX_TAIL}, got {min_chars}, "
                         f"{max_chars}")
    conversations = []
    for i in range(n):
        rng = random.Random(f"ttt_adapt.corpus.chat/{seed}/{i}")
        doc = _written(rng, min_chars, max_chars)
        far = [k for k, seen in enumerate(doc.last_seen) if len(doc.text) - seen >= RECALL_GAP]
        asked = rng.sample(far, min(questions, len(far))) or [0]  # the registry is always far back
        messages = []
        for j, k in enumerate(asked):
            question, answer = doc.bindings[k]
            user = f"Read this chronicle, then answer my questions.\n\n{doc.text.rstrip()}\n\nQ: {question}" if j == 0 \
                else f"Q: {question}"
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": f"A: {answer}."}]
        conversations.append(messages)
    return conversations


def recall_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the query answers in `text`: the tokens only a long-range memory can predict."""
    return [m.span(1) for m in _QUERY.finditer(text)]


# The shipped chat corpus of the tiny chat default (ttt_adapt/assets/chat/): write_chat_corpus(folder, **TINY_CHAT)
TINY_CHAT = {"n_train": 400, "n_eval": 32, "seed": 0, "min_chars": 2000, "max_chars": 3200}


def write_chat_corpus(out_dir, n_train: int, n_eval: int, seed: int = 0, **kwargs) -> dict:
    """Write `train.jsonl` and `eval.jsonl` ({"messages": [...]} a line) of `generate_conversations(n, stream,
    **kwargs)` to `out_dir`, the train split from stream 2*seed and the eval split from 2*seed + 1; return the paths."""
    return _write_splits(out_dir, n_train, n_eval, seed,
                         lambda n, stream: ({"messages": m} for m in generate_conversations(n, stream, **kwargs)))


def write_corpus(out_dir, n_train: int, n_eval: int, seed: int = 0) -> dict:
    """Write `train.jsonl` and `eval.jsonl` ({"text": ...} per line) to `out_dir`; return their paths.

    Train documents come from seed stream 2*seed and eval documents from 2*seed + 1, so the splits never
    share a stream, for any seed.
    """
    return _write_splits(out_dir, n_train, n_eval, seed,
                         lambda n, stream: ({"text": text} for text in generate_documents(n, stream)))


def _write_splits(out_dir, n_train: int, n_eval: int, seed: int, rows) -> dict:
    """`train.jsonl` from `rows(n_train, 2 * seed)` and `eval.jsonl` from `rows(n_eval, 2 * seed + 1)` (one JSON
    object a line) in `out_dir`; their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n, stream in (("train", n_train, 2 * seed), ("eval", n_eval, 2 * seed + 1)):
        paths[split] = out / f"{split}.jsonl"
        with open(paths[split], "w") as f:
            for row in rows(n, stream):
                f.write(json.dumps(row) + "\n")
    return paths
