#!/usr/bin/env python
"""Measure an In-Place TTT model against its base: loss by position and synthetic long-context tasks.

    python scripts/evaluate.py --base DIR --adapted DIR --corpus FILE.jsonl --out DIR [options]
    python scripts/evaluate.py --recipe RECIPE.yaml [options]
    python scripts/evaluate.py --lm-eval-task DIR --adapted DIR [--corpus FILE.jsonl] [--lengths ...] [--tasks ...]
    python scripts/evaluate.py --state STATE --adapted DIR --corpus FILE.jsonl [--max-docs N] [--seq-len N]
    python scripts/evaluate.py --memory-split FIRST,CONT --adapted DIR --corpus FILE.jsonl [--max-docs N]
    python scripts/evaluate.py --recall-ceiling LAYERS (--base DIR | --adapted DIR) --corpus FILE.jsonl [--chunk-size N]

With --recipe, the defaults come from the recipe: --base its model.name_or_path, --adapted its export.dir,
--corpus and the other settings its `eval` section (corpus default data.eval_path), --out <train.output_dir>/eval;
options given on the command line win. --lm-eval-task writes the synthetic tasks as a local lm-evaluation-harness
task folder (tokenised with the --adapted, else --base, tokenizer; haystacks from the prose of --corpus, default the
shipped held-out corpus) and evaluates nothing; see ttt_adapt/eval/. --state (a state file of scripts/memorize.py)
prints the loss of the corpus documents (first --seq-len tokens) read starting from that state against read from
nothing; --memory-split cuts each document into FIRST and CONT tokens and prints the loss on the continuation with the
whole document in context, with the first part's state only, with nothing and with another document's state
(docs/memory.md); with --memory-filler also after N more tokens of other text, and the memory horizon (the longest
N at which the state still beats no state; "horizon" in the JSON, null if not even at N = 0). --recall-ceiling
measures how far a fast weight keyed by the model's own MLP activations at those layers could lower the loss of the
corpus's answer tokens whose fact lies beyond attention's reach, given ideal values (ttt_adapt/eval/recall_ceiling.py;
--chunk-size defaults to the TTT model's, else 128; with --learn-key DIM also the ceiling of a key projection of
those layers' activations trained on --train-corpus). All three print one JSON object.
Bad input prints one line and exits 2.
"""

import argparse
import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ttt_adapt._util import DTYPES, ArgumentParser, RecipeError, UsageError  # noqa: E402


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_args(argv):
    p = ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help="read defaults from this recipe (and its eval section)")
    p.add_argument("--base", help="the base model folder (or hub id)")
    p.add_argument("--adapted", help="the TTT model folder (an export)")
    p.add_argument("--corpus", help="held-out documents: .jsonl with a text field, or .txt")
    p.add_argument("--out", help="output folder for report.json, report.md, loss_by_position.png, samples.jsonl")
    p.add_argument("--lm-eval-task", metavar="DIR", help="only write the tasks as an lm-evaluation-harness task folder")
    p.add_argument("--seq-len", type=int, help="the training length: tokens per document for the loss by position "
                   "(default 1024)")
    p.add_argument("--lengths", type=int_list, help="task prompt lengths in tokens, e.g. 512,1024")
    p.add_argument("--tasks", help="comma-separated synthetic tasks (default all; 'none' for none)")
    p.add_argument("--num-samples", type=int, help="prompts per task and length")
    p.add_argument("--max-docs", type=int, help="held-out documents for the loss")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-length", type=int, help="tokens of the long documents read past the training length "
                   "(--seq-len); default 8 x seq-len, 0 for none")
    p.add_argument("--long-corpus", help="the long documents: a .jsonl/.txt file or 'synthetic' (default --corpus)")
    p.add_argument("--long-docs", type=int, help="how many long documents (the longest)")
    p.add_argument("--recall-file", help="a .jsonl of {document, question, answer} rows: answer-token loss by distance "
                   "back to the answer's mention in the document, base vs adapted")
    p.add_argument("--dtype", default=None, choices=DTYPES)
    p.add_argument("--state", help="a fast-weight state file (scripts/memorize.py): loss of the corpus read from it")
    p.add_argument("--memory-split", type=int_list, metavar="FIRST,CONT",
                   help="measure the fast-weight memory on documents cut into FIRST and CONT tokens")
    p.add_argument("--memory-filler", type=int_list, metavar="N,N,...",
                   help="with --memory-split: also the continuation's loss after N more tokens of other text are "
                        "read into the first part's state (N = 0 always), and the memory horizon: the longest N at "
                        "which that state still beats no state")
    p.add_argument("--recall-ceiling", type=int_list, metavar="LAYERS",
                   help="the recall ceiling of the MLP activations of these decoder layers (e.g. 1,2,3)")
    p.add_argument("--chunk-size", type=int, help="with --recall-ceiling: tokens per fast-weight chunk")
    p.add_argument("--learn-key", type=int, metavar="DIM", help="with --recall-ceiling: also the ceiling of a learned "
                   "DIM-dimensional key projection of the layers' activations, trained on --train-corpus")
    p.add_argument("--train-corpus", help="with --learn-key: the documents the key projection is trained on")
    p.add_argument("--train-docs", type=int, help="with --learn-key: how many of them (default all)")
    p.add_argument("--epochs", type=int, default=10, help="with --learn-key: passes over them (default 10)")
    args = p.parse_args(argv)
    if args.recall_ceiling is not None and not args.recall_ceiling:
        p.error("--recall-ceiling takes layer indices, e.g. 1,2,3")
    if args.recall_ceiling is None and (args.chunk_size is not None or args.learn_key is not None):
        p.error("--chunk-size and --learn-key go with --recall-ceiling")
    if args.learn_key is None and (args.train_corpus or args.train_docs is not None):
        p.error("--train-corpus and --train-docs go with --learn-key")
    if args.memory_filler is not None and args.memory_split is None:
        p.error("--memory-filler goes with --memory-split")
    if args.memory_split is not None and (len(args.memory_split) != 2 or min(args.memory_split) < 2):
        p.error(f"--memory-split takes two token counts >= 2, e.g. 512,512, got {args.memory_split}")
    return args


def main(argv=None) -> int:
    try:
        return evaluate(parse_args(argv))
    except RecipeError as e:  # EvalError and UsageError are RecipeErrors
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2


def evaluate(args) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no weight-loading bars: the output is the table (or one error line)
    from ttt_adapt.eval import HAYSTACK_CORPUS, EvalSettings, load_tokenizer, read_corpus, run_evaluation, \
        task_samples, write_lm_eval_task
    from ttt_adapt.recipe import load_recipe
    from ttt_adapt.eval.inputs import model_config
    from ttt_adapt.eval.tasks import attention_reach

    if args.recall_ceiling:
        return evaluate_ceiling(args)
    if args.state or args.memory_split:
        return evaluate_memory(args)
    raw, dtype = {}, args.dtype
    if args.recipe:
        recipe = load_recipe(args.recipe)
        raw = dataclasses.asdict(recipe.eval_settings())
        args.base = args.base or recipe.model.name_or_path
        if not args.adapted:
            if recipe.export.dir is None or not Path(recipe.export.dir).is_dir():
                raise UsageError(f"no exported model at the recipe's export.dir ({recipe.export.dir}): train and "
                                 "export first, or pass --adapted")
            args.adapted = recipe.export.dir
        args.out = args.out or str(Path(recipe.train.output_dir) / "eval")
        dtype = dtype or recipe.model.dtype
    for key in ("corpus", "seq_len", "lengths", "num_samples", "max_docs", "batch_size", "max_new_tokens", "seed",
                "max_length", "long_corpus", "long_docs", "recall_file"):
        if getattr(args, key) is not None:
            raw[key] = getattr(args, key)
    if args.tasks is not None:
        raw["tasks"] = [] if args.tasks == "none" else [t.strip() for t in args.tasks.split(",") if t.strip()]
    settings = EvalSettings.from_dict(raw, prefix="settings")

    if args.lm_eval_task:
        if not (args.adapted or args.base):
            raise UsageError("--lm-eval-task needs --adapted or --base (the tokenizer that counts the lengths)")
        tokenizer = load_tokenizer(args.adapted or args.base)
        corpus = settings.corpus or str(HAYSTACK_CORPUS)  # only the haystack's prose comes from it
        reach = attention_reach(model_config(args.adapted or args.base))  # needles beyond the sliding window
        samples = task_samples(settings, tokenizer, read_corpus(corpus, settings.text_field), window=reach)
        names = write_lm_eval_task(args.lm_eval_task, samples, settings.max_new_tokens)
        model = args.adapted or "DIR"
        print(f"wrote {len(names)} tasks ({', '.join(names)}) to {args.lm_eval_task}; run them with\n"
              f"  lm_eval --model hf --model_args pretrained={model},trust_remote_code=True "
              f"--include_path {args.lm_eval_task} --tasks ttt_synthetic --device cpu "
              f"--batch_size {settings.batch_size}")
        return 0

    if settings.corpus is None:
        raise UsageError("--corpus is required (or --recipe with data.eval_path)")
    for flag in ("base", "adapted", "out"):
        if not getattr(args, flag):
            raise UsageError(f"--{flag} is required (or --recipe)")
    report = run_evaluation(settings, args.base, args.adapted, args.out, dtype=dtype or "float32",
                            log=lambda m: print(m, file=sys.stderr))
    print((Path(args.out) / "report.md").read_text(), end="")
    for line in report.get("warnings", []):  # long context, no recall (in length, long, recall file)
        print(f"evaluate.py: WARNING: {line}", file=sys.stderr)
    return 0


def evaluate_memory(args) -> int:
    """--state / --memory-split: the fast-weight memory measures of ttt_adapt.eval.memory, as one JSON object."""
    import json

    import torch

    from ttt_adapt.eval import load_model, load_tokenizer, read_corpus
    from ttt_adapt.eval.memory import horizon_line, memory_after_reading, memory_value, state_losses

    if args.state and args.memory_split:
        raise UsageError("--state and --memory-split are separate measures: pass one")
    for flag in ("adapted", "corpus"):
        if not getattr(args, flag):
            raise UsageError(f"--{flag} is required with --state / --memory-split")
    model = load_model(args.adapted, args.dtype or "float32")
    tokenizer = load_tokenizer(args.adapted)
    texts = read_corpus(args.corpus, max_docs=args.max_docs)
    docs = [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"], dtype=torch.long) for t in texts]
    try:
        if args.state:
            state = model.load_state(args.state)
            result = state_losses(model, [d[: args.seq_len or 1024] for d in docs], state)
        else:
            log = lambda m: print(m, file=sys.stderr)  # noqa: E731
            result = memory_value(model, docs, *args.memory_split, log=log)
            if args.memory_filler:
                result["reading_more"] = memory_after_reading(model, docs, *args.memory_split, args.memory_filler,
                                                              log=log)
                result["horizon"] = result["reading_more"]["horizon"]  # the longest filler the state survives
    except ValueError as e:  # a state file that is truncated or belongs to another model
        raise UsageError(str(e)) from None
    print(json.dumps(result, indent=1))
    if "horizon" in result:
        print(f"evaluate.py: memory horizon: {horizon_line(result['reading_more'])}", file=sys.stderr)
    return 0


def evaluate_ceiling(args) -> int:
    """--recall-ceiling: `ttt_adapt.eval.recall_ceiling` on the first --seq-len tokens of each corpus document."""
    import json

    from ttt_adapt.eval import load_model, load_tokenizer, read_corpus
    from ttt_adapt.eval.inputs import model_config
    from ttt_adapt.eval.loss_by_position import tokenize_documents
    from ttt_adapt.eval.recall_ceiling import ceiling_line, learned_key_ceiling, recall_ceiling
    from ttt_adapt.eval.tasks import attention_reach

    if args.state or args.memory_split:
        raise UsageError("--recall-ceiling is a separate measure from --state / --memory-split: pass one")
    path = args.adapted or args.base
    if not path:
        raise UsageError("--recall-ceiling needs --base or --adapted (the model whose keys are measured)")
    if not args.corpus:
        raise UsageError("--corpus is required with --recall-ceiling")
    seq_len = args.seq_len or 1024
    if seq_len < 2:
        raise UsageError(f"--seq-len must be >= 2, got {seq_len}")
    config = model_config(path)
    chunk = args.chunk_size
    if chunk is None:
        chunk = (getattr(config, "ttt", None) or {}).get("chunk_size") or 128
    if chunk < 1:
        raise UsageError(f"--chunk-size must be >= 1, got {chunk}")
    reach = attention_reach(config) or 0  # answers beyond what attention alone can carry
    model = load_model(path, args.dtype or "float32")
    tokenizer = load_tokenizer(path)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = tokenize_documents(tokenizer, read_corpus(args.corpus, max_docs=args.max_docs), seq_len, pad)
    if args.learn_key is not None:
        if not args.train_corpus:
            raise UsageError("--learn-key needs --train-corpus (documents other than --corpus to train the key on)")
        if args.learn_key < 1 or args.epochs < 1:
            raise UsageError(f"--learn-key and --epochs must be >= 1, got {args.learn_key} and {args.epochs}")
        train_rows = tokenize_documents(tokenizer, read_corpus(args.train_corpus, max_docs=args.train_docs), seq_len,
                                        pad)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    result = recall_ceiling(model, rows, args.recall_ceiling, chunk, min_distance=reach,
                            batch_size=args.batch_size or 4, log=log)
    if args.learn_key is not None:
        learned = learned_key_ceiling(model, train_rows, rows, args.recall_ceiling, args.learn_key, chunk,
                                      min_distance=reach, epochs=args.epochs, seed=args.seed or 0,
                                      batch_size=args.batch_size or 4, log=log)
        result["learned_key"] = learned
    print(json.dumps(result, indent=1))
    print(f"evaluate.py: {ceiling_line(result)}", file=sys.stderr)
    if args.learn_key is not None:
        print(f"evaluate.py: learned key ({args.learn_key} dimensions, layers {args.recall_ceiling}, {args.epochs} "
              f"epochs over {learned['train_answers']} answers): {learned['loss']:.4f} "
              f"({learned['change_percent']:+.1f} %), read top-1 {100 * learned['read_top1']:.1f} %", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
