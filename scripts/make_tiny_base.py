"""Build the tiny offline base model: a byte-level BPE tokenizer and a sliding-window Qwen3 pretrained on
the synthetic corpus of `ttt_adapt/data/corpus.py`.

Every attention layer sees only the last 64 tokens (four stacked layers reach 252 tokens back), so the
model learns the corpus's local structure but cannot recall the bindings a document states thousands of
characters earlier: the gap TTT is meant to close. Saved with `save_pretrained` (float32 safetensors), loadable offline with `AutoModelForCausalLM`
and `AutoTokenizer`.

Rebuild the shipped assets (corpus and model; ~16 minutes on one CPU thread) from the repository root:

    python scripts/make_tiny_base.py --write-corpus
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from ttt_adapt.data.corpus import write_corpus  # noqa: E402

ASSETS = ROOT / "ttt_adapt" / "assets"
EOS, PAD = "<|endoftext|>", "<|pad|>"
N_TRAIN_DOCS, N_EVAL_DOCS, CORPUS_SEED = 1000, 100, 0  # the shipped corpus


def fail(msg: str) -> None:
    print(f"make_tiny_base: error: {msg}", file=sys.stderr)
    sys.exit(2)


def read_texts(path: Path) -> list[str]:
    if not path.is_file():
        fail(f"{path} not found (pass --write-corpus to generate the corpus)")
    texts = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                text = None
            if not isinstance(text, str):
                fail(f"{path}:{i} is not a JSON object with a string 'text' field")
            texts.append(text)
    if not texts:
        fail(f"{path} holds no documents")
    return texts


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with single digits (as Qwen splits numbers), an end-of-text and a separate pad token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, model_max_length=1 << 20)


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents, each followed by the end-of-text token, as one 1-D tensor."""
    ids = []
    for enc in tokenizer(texts)["input_ids"]:
        ids += enc + [tokenizer.eos_token_id]
    return torch.tensor(ids)


def build_parser() -> argparse.ArgumentParser:
    """The command line; a mistake prints one line and exits 2."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=ASSETS / "tiny_qwen3_base", help="output folder (model + tokenizer)")
    p.add_argument("--corpus-dir", type=Path, default=ASSETS / "corpus", help="folder with train.jsonl and eval.jsonl")
    p.add_argument("--write-corpus", action="store_true", help=f"first (re)generate the shipped corpus ({N_TRAIN_DOCS}/{N_EVAL_DOCS} docs, seed {CORPUS_SEED}) in --corpus-dir")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per training sequence")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (warmup, cosine to 10%%)")
    p.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary, special tokens included")
    p.add_argument("--hidden-size", type=int, default=192, help="model width (MLP: 3x)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--window", type=int, default=64, help="sliding attention window of every layer, in tokens")
    p.add_argument("--eval-every", type=int, default=250, help="steps between evaluations on 32 held-out blocks")
    p.add_argument("--seed", type=int, default=0, help="torch seed (init and batches)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.error = fail  # a one-line error (no usage dump), exit 2
    return p


def main() -> None:
    args = build_parser().parse_args()
    for name in ("steps", "batch_size", "threads", "eval_every", "layers", "window"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.seq_len < 8:
        fail(f"--seq-len must be >= 8, got {args.seq_len}")
    if not args.lr > 0:
        fail(f"--lr must be > 0, got {args.lr}")
    if not 258 <= args.vocab_size <= 65536:
        fail(f"--vocab-size must be in 258..65536 (256 bytes + 2 special tokens), got {args.vocab_size}")
    if args.hidden_size < 8 or args.hidden_size % 8:
        fail(f"--hidden-size must be a positive multiple of 8 (4 heads of even size, for RoPE), got {args.hidden_size}")
    for flag, path in (("--out", args.out), ("--corpus-dir", args.corpus_dir)):
        if path.exists() and not path.is_dir():
            fail(f"{flag} {path} exists and is not a folder")

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    if args.write_corpus:
        write_corpus(args.corpus_dir, N_TRAIN_DOCS, N_EVAL_DOCS, seed=CORPUS_SEED)
    train_texts = read_texts(args.corpus_dir / "train.jsonl")
    eval_texts = read_texts(args.corpus_dir / "eval.jsonl")

    # --- tokenizer and data: one token stream per split; eval is cut into fixed blocks
    tokenizer = train_tokenizer(train_texts, args.vocab_size)
    train_ids, eval_ids = token_stream(tokenizer, train_texts), token_stream(tokenizer, eval_texts)
    if len(train_ids) <= args.seq_len + 1 or len(eval_ids) <= args.seq_len + 1:
        fail(f"the corpus is shorter than one --seq-len block ({args.seq_len + 1} tokens)")
    n_eval = (len(eval_ids) - 1) // args.seq_len
    eval_x = eval_ids[: n_eval * args.seq_len].view(n_eval, args.seq_len)
    eval_y = eval_ids[1 : n_eval * args.seq_len + 1].view(n_eval, args.seq_len)
    counts = torch.bincount(train_ids, minlength=len(tokenizer)).double() + 1  # add-one smoothing
    unigram_loss = -(counts / counts.sum()).log()[eval_ids].mean().item()

    # --- model: Qwen3, sliding-window attention on every layer (layers >= max_window_layers slide)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=3 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=args.hidden_size // 4,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        use_sliding_window=True,
        sliding_window=args.window,
        max_window_layers=0,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen3ForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup))))

    @torch.no_grad()
    def evaluate(n_blocks: int) -> float:
        model.eval()
        losses = [
            F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())
            for x, y in zip(eval_x[:n_blocks].split(8), eval_y[:n_blocks].split(8))
        ]
        model.train()
        return torch.stack(losses).mean().item()

    # --- train
    args.out.mkdir(parents=True, exist_ok=True)
    log = open(args.out / "train_log.jsonl", "w")
    print(f"{n_params / 1e6:.2f}M params, {len(train_ids):,} train / {len(eval_ids):,} eval tokens, unigram loss {unigram_loss:.3f}")
    t0, bar, recent = time.time(), tqdm(range(args.steps), desc="pretrain"), []
    for step in bar:
        starts = torch.randint(len(train_ids) - args.seq_len - 1, (args.batch_size,))
        x = torch.stack([train_ids[s : s + args.seq_len] for s in starts])
        y = torch.stack([train_ids[s + 1 : s + args.seq_len + 1] for s in starts])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-50:]
        record = {"step": step + 1, "loss": round(loss.item(), 4), "lr": lr_at(step), "grad_norm": round(grad_norm.item(), 3), "elapsed_s": round(time.time() - t0, 1)}
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            record["eval_loss"] = round(evaluate(n_eval if step + 1 == args.steps else 32), 4)
        log.write(json.dumps(record) + "\n")
        log.flush()
        bar.set_postfix({k: record[k] for k in ("loss", "eval_loss") if k in record})

    summary = {
        "params": n_params,
        "train_loss_last50": round(sum(recent) / len(recent), 4),
        "eval_loss": record["eval_loss"],  # all eval blocks (earlier evals use the first 32)
        "unigram_eval_loss": round(unigram_loss, 4),
        "minutes": round((time.time() - t0) / 60, 1),
    }
    log.write(json.dumps({"summary": summary}) + "\n")
    log.close()
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
