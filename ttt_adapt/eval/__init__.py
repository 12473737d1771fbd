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
  On corpora with query lines (`ttt_adapt.data.corpus`), the same for the answer tokens of queries whose binding was
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
{mean, low, high} per bin, `documents`, `resamples`, `confidence`); `recall_by_distance` (answer tokens by their
distance back to the fact, `ttt_adapt.eval.recall`: on these documents, in `long_context` past the training length,
and in `recall_file` for a user's recall file) and `warnings` (every one-line flag of the report, each saying where
it was raised), `loss_by_position.png`, `recall_by_distance.png`, `report.md` (the markdown table of
`markdown_table`) and `samples.jsonl` (every prompt's answers, needles with their distance to the question, and
generations). With a sliding window in every attention layer, every needle lies beyond what attention can carry
(`ttt_adapt.eval.tasks.attention_reach`). A recipe's optional `eval` section holds `EvalSettings` fields; training then writes
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

from ttt_adapt.eval.inputs import load_model, load_tokenizer, read_corpus
from ttt_adapt.eval.loss_by_position import (
    bin_means,
    bootstrap_difference,
    stateless_token_losses,
    swapped_token_losses,
    token_losses,
    tokenize_documents,
)
from ttt_adapt.eval.report import MODELS, markdown_table, plot_loss_by_position, write_report
from ttt_adapt.eval.run import evaluate_recipe, run_evaluation, state_controls
from ttt_adapt.eval.settings import TASKS, EvalError, EvalSettings, check_lengths, position_bins
from ttt_adapt.eval.swapped_state import fast_weight_sources, swap_partners
from ttt_adapt.eval.tasks import (
    HAYSTACK_CORPUS,
    filler_sentences,
    generate,
    make_samples,
    score,
    task_samples,
    write_lm_eval_task,
)

__all__ = [
    "EvalError",
    "EvalSettings",
    "TASKS",
    "HAYSTACK_CORPUS",
    "MODELS",
    "position_bins",
    "check_lengths",
    "read_corpus",
    "load_model",
    "load_tokenizer",
    "tokenize_documents",
    "token_losses",
    "swapped_token_losses",
    "stateless_token_losses",
    "bin_means",
    "bootstrap_difference",
    "swap_partners",
    "fast_weight_sources",
    "filler_sentences",
    "make_samples",
    "task_samples",
    "score",
    "generate",
    "write_lm_eval_task",
    "run_evaluation",
    "state_controls",
    "evaluate_recipe",
    "markdown_table",
    "plot_loss_by_position",
    "write_report",
]
