"""The recall ceiling (ttt_adapt/eval/recall_ceiling.py): the ideal read equals a naive loop and is chunk-causal;
perfectly matching keys recall and identical keys do not; the mixture is chosen on the other half of the documents;
the model's answer loss is the evaluation's own; a TTT model's keys are its base's; the CLI's one-line errors."""

import json
import math
import pytest
import torch
from conftest import script_main
from eval_fixtures import files  # noqa: F401 (a fixture)

from ttt_adapt.eval.inputs import load_model
from ttt_adapt.eval.loss_by_position import token_losses, tokenize_documents
from ttt_adapt.eval.recall_ceiling import (
    TEMPERATURES,
    WEIGHTS,
    cross_fitted,
    ideal_reads,
    mixture_losses,
    mlp_activations,
    recall_ceiling,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ideal_read_equals_a_naive_loop_and_reads_only_earlier_chunks():
    torch.manual_seed(0)
    L, D, V, C = 13, 5, 7, 4
    keys, nxt = torch.randn(L, D), torch.randint(0, V, (L,))
    valid = torch.ones(L, dtype=torch.bool)
    valid[[2, 9]] = False
    queries = torch.tensor([0, 3, 4, 8, 12])
    got = ideal_reads(keys, nxt, valid, queries, C, V)
    want = torch.zeros(len(queries), V)
    for p, j in enumerate(queries.tolist()):
        for i in range(L):
            if i // C < j // C and valid[i]:
                want[p, nxt[i]] += keys[i] @ keys[j]
    torch.testing.assert_close(got, want)
    assert not got[:2].any()  # queries in the first chunk read nothing


def test_matching_keys_recall_and_identical_keys_do_not():
    """Facts 0..3 written in chunk 0 (key e_f, next token 10 + f), asked in chunk 1 with the same key: the read's
    top token is each fact's value. With every key the same, the read is the same for every question."""
    V, C = 16, 4
    keys = torch.cat([torch.eye(4), torch.eye(4)])
    nxt = torch.tensor([10, 11, 12, 13, 0, 0, 0, 0])
    valid = torch.ones(8, dtype=torch.bool)
    queries = torch.arange(4, 8)
    reads = ideal_reads(keys, nxt, valid, queries, C, V)
    assert reads.argmax(-1).tolist() == [10, 11, 12, 13]
    same = ideal_reads(torch.ones(8, 4), nxt, valid, queries, C, V)
    assert (same == same[:1]).all()


def test_mixture_is_chosen_on_the_other_half():
    # answers of fold 0 are best with (tau 0, a 0); those of fold 1 with (tau 1, a 1): each is scored with the other's
    P = 4
    losses = torch.full((len(TEMPERATURES), len(WEIGHTS), P), 5.0)
    fold = torch.tensor([0, 0, 1, 1])
    losses[0, 0, :2], losses[1, 1, 2:] = 1.0, 2.0
    losses[0, 0, 2:], losses[1, 1, :2] = 3.0, 4.0
    total, chosen = cross_fitted(losses, fold)
    assert total == pytest.approx((4.0 * 2 + 3.0 * 2) / 4)
    assert [c["temperature"] for c in chosen] == [TEMPERATURES[1], TEMPERATURES[0]]
    # the mixture itself: a -> 0 is the model, and a certain read of the right token lowers the loss
    own, read = torch.log(torch.tensor([0.5])), torch.zeros(1, len(TEMPERATURES))
    mixed = mixture_losses(own, read)
    a = torch.tensor(WEIGHTS)
    torch.testing.assert_close(mixed[0, :, 0], -torch.log((1 - a) * 0.5 + a))


def test_model_loss_is_the_evaluations_and_ttt_keys_are_the_bases(files):  # noqa: F811
    base, adapted = load_model(files["base"]), load_model(files["adapted"])
    docs = [json.loads(line)["text"] for line in open(files["corpus"])]
    rows = tokenize_documents(files["tokenizer"], docs, 256, pad_id=1)
    result = recall_ceiling(base, rows, layers=[0, 1], chunk_size=16, min_distance=20, batch_size=2)
    answers = rows["recall"] & (rows["recall_distance"] > 20)
    assert result["answers"] == int(answers.sum()) > 0
    assert result["model_loss"] == pytest.approx(token_losses(base, rows, 2)[answers].mean().item(), rel=1e-5)
    assert set(result["layers"]) == {"0", "1"} and set(result["layers"]["1"]) == {"h", "h/|h|"}
    for entry in (e for layer in result["layers"].values() for e in layer.values()):
        assert math.isfinite(entry["loss"]) and 0 <= entry["read_top1"] <= 1 and len(entry["chosen"]) == 2
    x, m = rows["input_ids"][:2], rows["attention_mask"][:2]
    _, mine = mlp_activations(base, x, m, [0, 1])
    _, theirs = mlp_activations(adapted, x, m, [0, 1])  # layer 1 is a TTT MLP: its keys come before its fast weight
    for i in (0, 1):
        torch.testing.assert_close(mine[i], theirs[i])


def _cli(argv, capsys):
    code = script_main("evaluate")(argv)
    return code, capsys.readouterr()


def test_cli_prints_the_ceiling_and_fails_in_one_line(files, tmp_path, capsys):  # noqa: F811
    code, out = _cli(["--recall-ceiling", "0,1", "--base", str(files["base"]), "--corpus", str(files["corpus"]),
                      "--chunk-size", "16", "--seq-len", "256"], capsys)
    assert code == 0, out.err
    result = json.loads(out.out)
    assert result["chunk_size"] == 16 and result["best"]["layer"] in (0, 1)
    assert "recall ceiling:" in out.err
    prose = tmp_path / "prose.txt"
    prose.write_text("No question is asked in this text at all. " * 20)
    for argv, says in [
        (["--recall-ceiling", "0,7", "--base", str(files["base"]), "--corpus", str(files["corpus"])],
         "out of range"),
        (["--recall-ceiling", "1", "--base", str(files["base"]), "--corpus", str(prose)], "no answer token"),
        (["--recall-ceiling", "1", "--base", str(files["base"])], "--corpus is required"),
        (["--recall-ceiling", "1", "--adapted", str(files["adapted"]), "--corpus", str(files["corpus"]),
          "--chunk-size", "0"], "--chunk-size must be >= 1"),
    ]:
        code, out = _cli(argv, capsys)
        assert code == 2 and says in out.err and len(out.err.strip().splitlines()) == 1, out.err


def test_learned_key_is_seeded_and_learns_the_documents_it_trains_on(files):  # noqa: F811
    from ttt_adapt.eval.recall_ceiling import learned_key_ceiling

    base = load_model(files["base"])
    docs = [json.loads(line)["text"] for line in open(files["corpus"])]
    rows = tokenize_documents(files["tokenizer"], docs, 256, pad_id=1)
    run = lambda seed: learned_key_ceiling(base, rows, rows, [0, 1], dim=8, chunk_size=16,  # noqa: E731
                                           min_distance=20, epochs=4, lr=3e-2, seed=seed)
    first, again, other = run(0), run(0), run(1)
    assert first == again and first != other
    assert first["train_answers"] == first["answers"] == int((rows["recall"] & (rows["recall_distance"] > 20)).sum())
    by_epoch = first["change_percent_by_epoch"]  # trained on the documents it is scored on: it must get better
    assert len(by_epoch) == 4 and by_epoch[-1] == first["change_percent"] < by_epoch[0] - 0.3
    assert first["model_loss"] == pytest.approx(token_losses(base, rows, 2)[rows["recall"]
                                                & (rows["recall_distance"] > 20)].mean().item(), rel=1e-5)


def test_cli_learned_key(files, capsys):  # noqa: F811
    argv = ["--recall-ceiling", "0,1", "--base", str(files["base"]), "--corpus", str(files["corpus"]),
            "--chunk-size", "16", "--seq-len", "256", "--learn-key", "4", "--epochs", "1"]
    code, out = _cli(argv + ["--train-corpus", str(files["corpus"])], capsys)
    assert code == 0, out.err
    assert json.loads(out.out)["learned_key"]["dim"] == 4 and "learned key (4 dimensions" in out.err
    for extra, says in [([], "--learn-key needs --train-corpus"),
                        (["--train-corpus", str(files["corpus"]), "--epochs", "0"], "must be >= 1")]:
        code, out = _cli(argv[:-2] + (["--epochs", "1"] if "--epochs" not in extra else []) + extra, capsys)
        assert code == 2 and says in out.err and len(out.err.strip().splitlines()) == 1, out.err
    code, out = _cli(["--recall-ceiling", "1", "--base", str(files["base"]), "--corpus", str(files["corpus"]),
                      "--train-corpus", str(files["corpus"])], capsys)
    assert code == 2 and "--train-corpus and --train-docs go with --learn-key" in out.err
