"""The row feed of a training run: packed rows in training order, batched and split for the step.

Data order is a pure function of `train.seed`, the number of packed rows and a row cursor stored in each
checkpoint (`RowStream`), so a resumed run reads exactly the rows the uninterrupted run would have read. A step
takes `rows_per_step` rows, `collate`s each micro-batch onto the device and `split_batch` shifts its labels and,
with context parallelism, keeps this rank's shard.
"""

from __future__ import annotations

import itertools

import torch

from ttt_adapt.distributed.context_parallel import ContextParallel
from ttt_adapt.loss import IGNORE_INDEX, shift_labels
from ttt_adapt.recipe.sections import Recipe


class RowStream:
    """The packed training rows in training order, from any row cursor.

    Map-style datasets: each pass over the rows is a permutation seeded by (seed, pass), so the rows of a
    step depend only on the cursor. Streaming datasets are read in their own (seeded) order and a resumed run
    skips the rows already consumed.
    """

    def __init__(self, dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.map_style = hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
        self.num_rows = len(dataset) if self.map_style else None
        self._perm = (None, None)  # (pass, permutation)
        self._iter = None
        self._cursor = 0

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perm = (epoch, torch.randperm(self.num_rows, generator=g))
        return self._perm[1]

    def take(self, cursor: int, count: int) -> list[dict]:
        """Rows `cursor .. cursor+count-1` of the training order."""
        if self.map_style:
            out = []
            for k in range(cursor, cursor + count):
                epoch, i = divmod(k, self.num_rows)
                out.append(self.dataset[int(self._permutation(epoch)[i])])
            return out
        if self._iter is None or cursor != self._cursor:
            self._iter, self._cursor = self._stream(), 0
            for _ in itertools.islice(self._iter, cursor):
                self._cursor += 1
        rows = list(itertools.islice(self._iter, count))
        self._cursor += len(rows)
        return rows

    def _stream(self):
        for epoch in itertools.count():
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            empty = True
            for row in self.dataset:
                empty = False
                yield row
            if empty:
                raise ValueError("the training data stream is empty")


def collate(rows: list[dict], device) -> dict:
    """Stack packed rows into tensors on `device`."""
    batch = {k: torch.tensor([list(r[k]) for r in rows], dtype=torch.long) for k in rows[0]}
    mask = batch["attention_mask"]
    # Attention masks are dropped (below) so packed documents stay apart; that is exact only if padding never
    # precedes a real token, as `ttt_adapt.data` guarantees (padding ends the last row).
    if bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise ValueError("a packed row has padding before real tokens; only trailing padding is supported")
    return {k: v.to(device) for k, v in batch.items()}


def split_batch(batch: dict, cp: ContextParallel, chunk_size: int) -> tuple[dict, object]:
    """Labels shifted (`ttt_adapt.loss.shift_labels`), then this rank's shard of the rows with context
    parallelism; (batch, None) without it."""
    batch = shift_labels(batch)
    return cp.shard(batch, chunk_size) if cp.enabled else (batch, None)


def count_labels(batch) -> int:
    """Tokens with a label in a batch from `split_batch` (labels already shifted)."""
    return int((batch["labels"] != IGNORE_INDEX).sum())


def rows_per_step(recipe: Recipe, cp: ContextParallel) -> int:
    """Rows of the training order one optimizer step consumes, over all processes."""
    return recipe.train.batch_size * recipe.train.grad_accum * cp.dp_size  # the ranks of a CP group share rows


__all__ = ["RowStream", "collate", "split_batch", "count_labels", "rows_per_step"]
