"""Evaluation of a chat model on held-out conversations: what the assistant says, base vs adapted.

Each conversation (a .jsonl of `messages` or prompt/completion rows, as training reads them) is rendered by the
chat template the run trained with, its first `seq_len` tokens kept, and read once by each model:
- assistant-token loss by position: the loss of every token the template marks as the assistant's (its
  end-of-turn token included), averaged in position bins; the converted base must equal the base;
- answer accuracy: the share of assistant turns that greedy decoding reproduces exactly, end-of-turn token
  included (every token of the turn is the argmax given the conversation before it, which is what greedy
  `generate()` would write and where it would stop), and the share of assistant tokens that are the argmax; for
  the tiny chat default (`ttt_adapt.data.corpus.generate_conversations`) every assistant turn answers a question about
  a fact stated far back;
- the adapted model's fast-weight controls, as for documents (`ttt_adapt.eval.run.state_controls`): each
  conversation read with the fast weights another one writes (swapped state), or none (no state), with the
  bootstrap interval of own - swapped on the assistant tokens.
A few greedy generations of the last question (base and adapted) go to `samples.jsonl`.
"""

from __future__ import annotations

import contextlib
import json
import time

import torch
import torch.nn.functional as F

from ttt_adapt._util import unwrap
from ttt_adapt.data.chat import BadRow, messages_of, render
from ttt_adapt.convert import convert
from ttt_adapt.eval.loss_by_position import CONFIDENCE, LOGIT_SLICE, RESAMPLES, bin_means, bootstrap_difference
from ttt_adapt.eval.report import write_report
from ttt_adapt.eval.settings import EvalError
from ttt_adapt.eval.swapped_state import fast_weight_sources, swap_partners
from ttt_adapt.modeling.configuration_ttt import TTTConfig

EQUAL_ATOL = 1e-5
SAMPLES = 4  # conversations whose last question is answered by generate() in samples.jsonl


def read_conversations(path, max_docs: int | None = None) -> list[list[dict]]:
    """The conversations of a .jsonl file (`messages`, or `prompt` and `completion`, a row); EvalError if none or
    if a row is not one."""
    conversations = []
    try:
        lines = open(path).read().splitlines()
    except OSError as e:
        raise EvalError(f"cannot read the chat corpus {path}: {e.strerror}") from None
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                conversations.append(messages_of(json.loads(line)))
            except (json.JSONDecodeError, AttributeError, BadRow) as e:
                raise EvalError(f"{path}:{i}: not a conversation ({e})") from None
    if not conversations:
        raise EvalError(f"{path}: the chat corpus holds no conversations")
    return conversations[:max_docs]


def conversation_rows(tokenizer, conversations, seq_len: int, template_kwargs: dict) -> dict:
    """Right-padded token ids, attention mask, the assistant tokens (`assistant`, column 0 never) and the assistant
    turn of each token (`turn`: a running number per row, -1 elsewhere)."""
    rendered = [render(tokenizer, messages, template_kwargs) for messages in conversations]
    n = len(rendered)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((n, seq_len), pad, dtype=torch.long)
    mask = torch.zeros(n, seq_len, dtype=torch.bool)
    assistant = torch.zeros(n, seq_len, dtype=torch.bool)
    turn = torch.full((n, seq_len), -1, dtype=torch.long)
    for i, (row, marks) in enumerate(rendered):
        row, marks = row[:seq_len], marks[:seq_len]
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = True
        count = -1
        for j, m in enumerate(marks):
            if m and j > 0:
                count += not assistant[i, j - 1]
                assistant[i, j], turn[i, j] = True, count
    if not assistant.any():
        raise EvalError(f"no assistant token in the first {seq_len} tokens of any held-out conversation")
    return {"input_ids": ids, "attention_mask": mask, "assistant": assistant, "turn": turn}


@torch.no_grad()
def read_conversations_with(model, rows: dict, batch_size: int, partners=None, stateless: bool = False):
    """(loss, argmax == token) per position, (N, L), of `model` reading each row with its own fast weights, with
    its partner's (`partners`, see `swap_partners`: rows without one get zeros) or with none (`stateless`)."""
    lm = unwrap(model)
    ids, mask = rows["input_ids"], rows["attention_mask"]
    loss, hit = torch.zeros(ids.shape), torch.zeros(ids.shape, dtype=torch.bool)
    todo = list(range(len(ids))) if partners is None else [i for i, p in enumerate(partners) if p is not None]
    step = batch_size if partners is None else max(1, batch_size // 2)
    for k in range(0, len(todo), step):
        batch = todo[k : k + step]
        if partners is None:
            with fast_weight_sources(lm, None) if stateless else contextlib.nullcontext():
                out = _forward(lm, ids[batch], mask[batch])
        else:
            n = len(batch)
            donors = [partners[i] for i in batch]
            with fast_weight_sources(lm, [n + i for i in range(n)] * 2):  # rows i read row n + i; those their own
                out = _forward(lm, torch.cat([ids[batch], ids[donors]]), torch.cat([mask[batch], mask[batch]]))
            out = (out[0][:n], out[1][:n])
        loss[batch], hit[batch] = out
    return loss, hit


def _forward(lm, x, m):
    device = next(lm.parameters()).device
    x, m = x.to(device), m.to(device)
    hidden = lm.model(input_ids=x, attention_mask=m.long(), use_cache=False).last_hidden_state
    loss = torch.zeros(x.shape, dtype=torch.float32, device=device)
    hit = torch.zeros(x.shape, dtype=torch.bool, device=device)
    for s in range(0, x.shape[1] - 1, LOGIT_SLICE):
        e = min(s + LOGIT_SLICE, x.shape[1] - 1)
        logits = lm.lm_head(hidden[:, s:e]).float()
        if getattr(lm.config, "final_logit_softcapping", None):
            cap = lm.config.final_logit_softcapping
            logits = cap * torch.tanh(logits / cap)
        target = x[:, s + 1 : e + 1]
        loss[:, s + 1 : e + 1] = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        hit[:, s + 1 : e + 1] = logits.argmax(-1) == target
    return (loss * m).cpu(), (hit & m).cpu()


def answer_accuracy(hit: torch.Tensor, rows: dict, keep=None) -> dict:
    """Share of assistant turns whose every token is the greedy choice (`answer_accuracy`), and of assistant tokens
    that are (`assistant_token_accuracy`: each given the reference before it); over the rows in `keep` (default
    all)."""
    correct = total = 0
    keep = list(keep) if keep is not None else list(range(len(hit)))
    tokens = rows["assistant"][keep]
    token_accuracy = float(hit[keep][tokens].float().mean()) if tokens.any() else None
    for i in keep:
        turns = rows["turn"][i]
        for t in range(int(turns.max()) + 1):
            span = turns == t
            total += 1
            correct += bool(hit[i][span].all())
    return {"answer_accuracy": correct / total if total else None, "answers": total,
            "assistant_token_accuracy": token_accuracy}


def measure(model, rows, edges, batch_size, keep=None, **kwargs) -> tuple[dict, torch.Tensor]:
    loss, hit = read_conversations_with(model, rows, batch_size, **kwargs)
    weights = rows["assistant"] if keep is None else rows["assistant"][keep]
    result = {"assistant_loss_by_position": bin_means(loss if keep is None else loss[keep], weights, edges),
              **answer_accuracy(hit, rows, keep)}
    return result, loss


def run_chat_evaluation(settings, base_model, adapted_model, tokenizer, out_dir, template_kwargs=None,
                        names=("base", "adapted"), log=print) -> dict:
    """Measure the base, the base converted with the adapted model's TTT settings, and the adapted model with its
    state controls on the held-out conversations of `settings.corpus`; write report.json, report.md, the plot and
    samples.jsonl to `out_dir`; return the report."""
    started = time.time()
    template_kwargs = dict(template_kwargs or {})
    if settings.tasks:
        log("evaluate: a chat corpus: the synthetic tasks (eval.tasks) read plain documents and are not run; the "
            "answers of the held-out conversations are scored instead")
    conversations = read_conversations(settings.corpus, settings.max_docs)
    rows = conversation_rows(tokenizer, conversations, settings.seq_len, template_kwargs)
    edges, bs = settings.bins, settings.batch_size
    weights = rows["assistant"]
    report = {"kind": "chat", "settings": {k: v for k, v in vars(settings).items()}, "models": dict(zip(
        ("base", "adapted"), names)), "bins": edges, "conversations": len(conversations),
        "tokens_per_bin": [int(weights[:, a:b].sum()) for a, b in zip(edges, edges[1:])]}
    was_training = adapted_model.training
    adapted_model.eval()
    try:
        log(f"evaluate: base: {len(conversations)} conversations of <= {settings.seq_len} tokens")
        report["base"], base_loss = measure(base_model, rows, edges, bs)
        if getattr(base_model.config, "ttt", None) is None:
            converted = convert(base_model, TTTConfig.from_dict(dict(unwrap(adapted_model).config.ttt))).eval()
            result, converted_loss = measure(converted, rows, edges, bs)
            diff = float((converted_loss - base_loss).abs().max())
            report["converted"] = {**result, "max_abs_loss_diff": diff, "equals_base": diff <= EQUAL_ATOL}
        log("evaluate: adapted, and its swapped-state and no-state controls")
        report["adapted"], own = measure(adapted_model, rows, edges, bs)
        partners = swap_partners(rows["attention_mask"].sum(1).tolist())
        paired = [i for i, p in enumerate(partners) if p is not None]
        swapped_result, swapped = measure(adapted_model, rows, edges, bs, keep=paired, partners=partners)
        report["adapted_swapped_state"] = {"documents": len(paired), **swapped_result}
        report["adapted_no_state"], _ = measure(adapted_model, rows, edges, bs, stateless=True)
        report["own_minus_swapped"] = {
            "documents": len(paired), "resamples": RESAMPLES, "confidence": CONFIDENCE,
            "assistant_loss_by_position": bootstrap_difference(own[paired], swapped[paired], weights[paired], edges,
                                                               seed=settings.seed)}
        samples = _generations(base_model, adapted_model, tokenizer, conversations[:SAMPLES], template_kwargs)
    finally:
        adapted_model.train(was_training)
    report["seconds"] = round(time.time() - started, 1)
    path = write_report(out_dir, report, [], {})
    with open(path.parent / "samples.jsonl", "w") as f:
        for sample in samples:
            f.write(json.dumps(sample) + "\n")
    log(f"evaluate: wrote {path} ({report['seconds']} s)")
    return report


@torch.no_grad()
def _generations(base_model, adapted_model, tokenizer, conversations, template_kwargs, max_new_tokens=16):
    """The last question of each conversation answered by greedy generate() (stopping at eos) by both models."""
    samples = []
    for messages in conversations:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = tokenizer.apply_chat_template(messages[:last], add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True, **template_kwargs)
        sample = {"question": messages[last - 1]["content"][-200:], "reference": messages[last]["content"]}
        for name, model in (("base", base_model), ("adapted", adapted_model)):
            lm = unwrap(model)
            device = next(lm.parameters()).device
            out = lm.generate(**{k: v.to(device) for k, v in prompt.items()}, max_new_tokens=max_new_tokens,
                              do_sample=False, pad_token_id=tokenizer.pad_token_id, use_cache=True)
            sample[f"{name}_generation"] = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])
        samples.append(sample)
    return samples


__all__ = ["read_conversations", "conversation_rows", "read_conversations_with", "answer_accuracy",
           "run_chat_evaluation"]
