"""The recall ceiling: how far a fast weight keyed by a model's own MLP activations could lower its answer loss.

In-Place TTT reads chunk c's fast weight with the MLP activation h of each token, and every earlier token wrote
with its own h as key: the read is sum_i v_i (k_i . k_j), a linear attention over the earlier chunks with k = h.
Whatever the targets learn, the keys are the base's. This measure gives that read the best values there are (v_i =
the one-hot of the token after i: the read votes for what followed each earlier token, weighted by how well its key
matches) and mixes its softmax into the model's prediction, p = (1 - a) p_model + a softmax(tau read), with the
mixture weight a and the temperature tau chosen on half of the documents and scored on the other half (and the
other way round). The answers of the synthetic corpus's query lines whose fact lies further back than `min_distance`
tokens are scored. The loss it reaches is a ceiling for a fast weight of that layer with those keys: a learned
target can only approximate one-hot values through the model's hidden size. A ceiling close to the model's own loss
says no write rule or target can make those keys recall; the keys (and so the base) must change.

    from ttt_adapt.eval.recall_ceiling import recall_ceiling
    result = recall_ceiling(model, rows, layers=[1, 2, 3], chunk_size=128, min_distance=256)

`rows` is `ttt_adapt.eval.loss_by_position.tokenize_documents`'s output. `scripts/evaluate.py --recall-ceiling`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ttt_adapt._util import unwrap
from ttt_adapt.eval.settings import EvalError

TEMPERATURES = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0)
WEIGHTS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7)
KEYS = ("h", "h/|h|")  # the published key and the normalised one (ttt.key_norm)
BLOCK = 64  # answers whose vocabulary-wide reads are held at once


def mlp_activations(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: list[int]):
    """(the decoder's last hidden states (B, L, hidden), {layer: h = act(gate(x)) * up(x) (B, L, H) float32}) of one
    forward; h is the down_proj input of the layer's MLP, a TTT layer's included. The LM head is left to the caller,
    to apply at the few positions it scores (a 150k vocabulary at every position would not fit)."""
    lm = unwrap(model)
    decoder = getattr(getattr(lm, "model", None), "layers", None)
    if not isinstance(decoder, torch.nn.ModuleList):
        raise EvalError(f"{type(unwrap(model)).__name__} has no model.layers: the recall ceiling needs a decoder LM")
    bad = [i for i in layers if not 0 <= i < len(decoder)]
    if bad:
        raise EvalError(f"layers {bad} out of range: the model has {len(decoder)} decoder layers")
    acts, hooks = {}, []

    def capture(i):
        def hook(mlp, args):
            x = args[0]
            if hasattr(mlp, "inner"):  # a TTT MLP
                acts[i] = mlp.inner(x)
            elif all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "act_fn")):
                acts[i] = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
            else:
                raise EvalError(f"layer {i}'s MLP ({type(mlp).__name__}) has no gate_proj/up_proj: not a gated MLP")
        return hook

    try:
        for i in layers:
            hooks.append(decoder[i].mlp.register_forward_pre_hook(capture(i)))
        with torch.no_grad():
            hidden = lm.model(input_ids=input_ids, attention_mask=attention_mask.long(), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return hidden.last_hidden_state, {i: a.float() for i, a in acts.items()}


def ideal_reads(keys: torch.Tensor, next_ids: torch.Tensor, valid: torch.Tensor, queries: torch.Tensor,
                chunk_size: int, vocab: int) -> torch.Tensor:
    """(P, vocab): for each query position j of one row, sum over the valid positions i of the chunks before j's of
    (k_i . k_j) one_hot(next_ids[i]): a chunk-causal linear fast-weight read with ideal one-hot values.
    keys (L, D), next_ids (L,), valid (L,) bool, queries (P,) positions."""
    L = keys.shape[0]
    chunk = torch.arange(L, device=keys.device) // chunk_size
    weights = keys[queries] @ keys.T  # (P, L)
    weights = weights * ((chunk[None, :] < chunk[queries][:, None]) & valid[None, :])
    out = torch.zeros(len(queries), vocab, dtype=weights.dtype, device=weights.device)
    return out.scatter_add_(1, next_ids[None, :].expand(len(queries), L), weights)


def _target_log_prob(reads: torch.Tensor, tau, targets: torch.Tensor) -> torch.Tensor:
    """(P,) log softmax(tau read)[target]."""
    return (reads * tau).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)


def _mixed_loss(model_logp: torch.Tensor, read_logp: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """-log((1 - a) p_model + a p_read), broadcast."""
    return -torch.logaddexp(model_logp + torch.log1p(-a), read_logp + torch.log(a))


def read_log_probs(reads: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, len(TEMPERATURES)): log softmax(tau read)[target] for each temperature, and the read's top-1 hit (P,)."""
    out = torch.stack([_target_log_prob(reads, t, targets) for t in TEMPERATURES], 1)
    return out, reads.argmax(-1) == targets


def mixture_losses(model_logp: torch.Tensor, read_logp: torch.Tensor) -> torch.Tensor:
    """(len(TEMPERATURES), len(WEIGHTS), P): -log((1 - a) p_model + a p_read) of each answer for each (tau, a)."""
    a = torch.tensor(WEIGHTS, dtype=model_logp.dtype)
    return _mixed_loss(model_logp[None, None, :], read_logp.T[:, None, :], a[None, :, None])


def cross_fitted(losses: torch.Tensor, fold: torch.Tensor) -> tuple[float, list[dict]]:
    """Mean answer loss when each fold's (tau, a) is the one best on the other fold; and the two choices."""
    total, chosen = 0.0, []
    for f in (0, 1):
        fit, score = fold != f, fold == f
        if not score.any():
            continue
        if not fit.any():  # one fold only (one document): choose on it, and say so
            fit = score
        best = int(losses[:, :, fit].mean(-1).argmin())
        t, w = divmod(best, len(WEIGHTS))
        total += losses[t, w, score].sum().item()
        chosen.append({"temperature": TEMPERATURES[t], "weight": WEIGHTS[w], "scored_answers": int(score.sum())})
    return total / losses.shape[-1], chosen


def answer_documents(model, rows: dict, layers: list[int], min_distance: int = 0, batch_size: int = 4, log=None):
    """Yield, for each document of `rows` (`tokenize_documents`) with answers more than `min_distance` tokens after
    their fact: {"doc": its index, "keys": {layer: h (L, H) float32}, "next_ids" (L,), "valid" (L,) (positions whose
    next token is in the row), "queries" (P,) (the positions that predict the answers), "answers" (P,) (their
    token ids), "own" (P,) (the model's log-probability of each)}. EvalError when no document has such answers."""
    ids, mask = rows["input_ids"], rows["attention_mask"]
    answer = rows["recall"] & (rows["recall_distance"] > min_distance)
    answer[:, 0] = False  # position 0 is predicted by nothing
    if not answer.any():
        raise EvalError(f"no answer token lies more than {min_distance} tokens after its fact in these documents: "
                        "the recall ceiling needs a corpus with query lines (ttt_adapt.data.corpus)")
    lm = unwrap(model)
    device = next(lm.parameters()).device
    for start in range(0, len(ids), batch_size):
        x, m = ids[start:start + batch_size].to(device), mask[start:start + batch_size].to(device)
        hidden, acts = mlp_activations(model, x, m, layers)
        for r in range(len(x)):
            targets = answer[start + r].nonzero().squeeze(1).to(device)
            if not len(targets):
                continue
            real = m[r].bool()
            with torch.no_grad():
                logp = lm.lm_head(hidden[r, targets - 1]).float().log_softmax(-1)
            yield {"doc": start + r, "keys": {i: acts[i][r] for i in layers},
                   "next_ids": torch.cat([x[r, 1:], x[r, :1]]),
                   "valid": real & torch.cat([real[1:], real.new_zeros(1)]),
                   "queries": targets - 1, "answers": x[r, targets],
                   "own": logp.gather(1, x[r, targets][:, None]).squeeze(1)}
        if log:
            log(f"recall ceiling: {min(start + batch_size, len(ids))}/{len(ids)} documents read")


def recall_ceiling(model, rows: dict, layers: list[int], chunk_size: int, min_distance: int = 0,
                   batch_size: int = 4, log=None) -> dict:
    """The recall ceiling of `model`'s MLP activations at `layers` on `rows` (`tokenize_documents`): per layer and
    key form ("h", "h/|h|"), the answer loss of the model mixed with the ideal chunk-causal read, cross-fitted over
    two halves of the documents, against the model's own loss on the same answers; and the read's top-1 accuracy.
    Answers: tokens with `recall_distance` > `min_distance` (their fact lies further back than that)."""
    if chunk_size < 1:
        raise EvalError(f"chunk size must be >= 1, got {chunk_size}")
    vocab = unwrap(model).get_output_embeddings().weight.shape[0]
    own, fold, reads = [], [], {(i, k): ([], []) for i in layers for k in KEYS}
    for d in answer_documents(model, rows, layers, min_distance, batch_size, log):
        own.append(d["own"].cpu())
        fold.append(torch.full((len(d["own"]),), d["doc"] % 2))
        for i in layers:
            for form in KEYS:
                k = F.normalize(d["keys"][i], dim=-1, eps=1e-6) if form == "h/|h|" else d["keys"][i]
                logs, hits = [], []
                for b in range(0, len(d["queries"]), BLOCK):
                    q = d["queries"][b:b + BLOCK]
                    lp, hit = read_log_probs(ideal_reads(k, d["next_ids"], d["valid"], q, chunk_size, vocab),
                                             d["answers"][b:b + BLOCK])
                    logs.append(lp.cpu())
                    hits.append(hit.cpu())
                reads[(i, form)][0].append(torch.cat(logs))
                reads[(i, form)][1].append(torch.cat(hits))
    own, fold = torch.cat(own).double(), torch.cat(fold)
    base = -own.mean().item()
    result = {"answers": len(own), "documents": len(rows["input_ids"]), "min_distance": min_distance,
              "chunk_size": chunk_size, "model_loss": base, "layers": {}}
    best = None
    for (i, form), (logs, hits) in reads.items():
        loss, chosen = cross_fitted(mixture_losses(own, torch.cat(logs).double()), fold)
        entry = {"loss": loss, "change_percent": 100 * (loss / base - 1) if base > 0 else math.nan,
                 "read_top1": torch.cat(hits).float().mean().item(), "chosen": chosen}
        result["layers"].setdefault(str(i), {})[form] = entry
        if best is None or loss < best["loss"]:
            best = {"layer": i, "key": form, **entry}
    result["best"] = best
    return result


def _learned_read_loss(doc, W, tau, alpha, chunk_size, vocab):
    """(P,) -log((1 - a) p_model + a softmax(tau read)) with keys normalize(features W); and the read's top-1 hits."""
    k = F.normalize(doc["features"] @ W, dim=-1, eps=1e-6)
    reads = ideal_reads(k, doc["next_ids"], doc["valid"], doc["queries"], chunk_size, vocab)
    mixed = _mixed_loss(doc["own"], _target_log_prob(reads, tau, doc["answers"]), torch.sigmoid(alpha))
    return mixed, reads.argmax(-1) == doc["answers"]


def learned_key_ceiling(model, train_rows: dict, rows: dict, layers: list[int], dim: int, chunk_size: int,
                        min_distance: int = 0, epochs: int = 10, lr: float = 3e-3, seed: int = 0, batch_size: int = 4,
                        log=None) -> dict:
    """The recall ceiling with a learned key: k = normalize([h_l for l in layers] W), W (sum of H, `dim`), with
    the mixture's temperature and weight, trained by Adam (one step a document, `epochs` passes over `train_rows`)
    for the loss of the model mixed with the ideal chunk-causal read, then scored on the held-out `rows`. The
    best a learned key projection of those activations could recall, with ideal values and the answers as its only
    training signal. Holds every document's activations in memory (documents x length x sum of H floats)."""
    if chunk_size < 1 or dim < 1 or epochs < 1:
        raise EvalError(f"chunk size, key dimension and epochs must be >= 1, got {chunk_size}, {dim}, {epochs}")
    vocab = unwrap(model).get_output_embeddings().weight.shape[0]

    def gather(r):
        out = []
        for d in answer_documents(model, r, layers, min_distance, batch_size, log):
            keys = d.pop("keys")
            d["features"] = torch.cat([keys[i] for i in layers], -1)
            out.append(d)
        return out

    train, held_out = gather(train_rows), gather(rows)
    generator = torch.Generator().manual_seed(seed)
    width = train[0]["features"].shape[-1]
    device = train[0]["features"].device
    W = torch.nn.Parameter((torch.randn(width, dim, generator=generator) / math.sqrt(width)).to(device))
    tau = torch.nn.Parameter(torch.tensor(10.0, device=device))
    alpha = torch.nn.Parameter(torch.tensor(-2.0, device=device))
    opt = torch.optim.Adam([W, tau, alpha], lr=lr)
    base = -torch.cat([d["own"] for d in held_out]).double().mean().item()

    def score():
        with torch.no_grad():
            out = [_learned_read_loss(d, W, tau, alpha, chunk_size, vocab) for d in held_out]
        loss = torch.cat([o[0] for o in out]).double().mean().item()
        return loss, torch.cat([o[1] for o in out]).float().mean().item()

    by_epoch = []
    for epoch in range(epochs):
        for j in torch.randperm(len(train), generator=generator).tolist():
            loss, _ = _learned_read_loss(train[j], W, tau, alpha, chunk_size, vocab)
            opt.zero_grad()
            loss.mean().backward()
            opt.step()
        loss, top1 = score()
        by_epoch.append(100 * (loss / base - 1))
        if log:
            log(f"learned key: epoch {epoch + 1}/{epochs}: held-out answers {by_epoch[-1]:+.1f} % vs the model")
    return {"layers": layers, "dim": dim, "epochs": epochs, "train_answers": sum(len(d["own"]) for d in train),
            "answers": sum(len(d["own"]) for d in held_out), "model_loss": base, "loss": loss,
            "change_percent": by_epoch[-1], "read_top1": top1, "change_percent_by_epoch": by_epoch,
            "temperature": tau.item(), "weight": torch.sigmoid(alpha).item()}


def ceiling_line(result: dict) -> str:
    """One line: the best ceiling found and where."""
    b = result["best"]
    return (f"recall ceiling: {result['answers']} answers more than {result['min_distance']} tokens after their fact; "
            f"model {result['model_loss']:.4f}, best ideal read (layer {b['layer']}, key {b['key']}) {b['loss']:.4f} "
            f"({b['change_percent']:+.1f} %), read top-1 {100 * b['read_top1']:.1f} %")


__all__ = ["recall_ceiling", "learned_key_ceiling", "answer_documents", "ideal_reads", "mlp_activations",
           "read_log_probs", "mixture_losses", "cross_fitted", "ceiling_line"]
