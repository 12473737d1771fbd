"""What the evaluation tests share: a byte tokenizer, small documents with a long-range query, and `files` (a tiny
random Qwen3 folder, its TTT version with non-trivial TTT weights, a held-out corpus). Test modules import the
fixture (`from eval_fixtures import files`)."""

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import randomize_ttt
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from ttt_adapt import TTTConfig, convert

REPO = Path(__file__).resolve().parents[1]
CHUNK = 16
PROSE = [
    "The weather in Tolmar was grey, so Brissa stayed home.",
    "At dawn, Kelvo carried the old lantern near the river.",
    "Brissa asked Kelvo about the bell, and Kelvo said it was quiet.",
    "Everyone in Tolmar said the bridge was narrow.",
    "Kelvo and Brissa walked from Tolmar to Vessa.",
    "In the afternoon, Brissa polished the silver kettle by the mill.",
]


def byte_tokenizer():
    """Byte-level, no merges: every byte is one token, so decode -> encode gives the same ids back."""
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<eos>": 0, "<pad>": 1, **{c: i + 2 for i, c in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def document(i: int) -> str:
    rng = random.Random(i)
    prose = " ".join(rng.choice(PROSE) for _ in range(3))
    return f"Vault Kor{i} holds code {4000 + i}.\n{prose}\nQ: What code opens vault Kor{i}? A: {4000 + i}.\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny random Qwen3 with a byte tokenizer, its TTT version with non-trivial TTT weights, and a corpus."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    root = tmp_path_factory.mktemp("evaluate")
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=1, eos_token_id=0,
    )
    base = Qwen3ForCausalLM(config).eval()
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    adapted = randomize_ttt(convert(base, TTTConfig(layers=[1], chunk_size=CHUNK)), scale=0.1)
    adapted.save_pretrained(root / "adapted")
    tokenizer.save_pretrained(root / "adapted")
    with open(root / "eval.jsonl", "w") as f:
        for i in range(5):
            f.write(json.dumps({"text": document(i)}) + "\n")
    (root / "empty.jsonl").write_text("")
    return {"root": root, "base": root / "base", "adapted": root / "adapted", "corpus": root / "eval.jsonl",
            "empty": root / "empty.jsonl", "tokenizer": tokenizer}
