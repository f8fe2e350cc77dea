"""Test helpers shared by several test files (models live in ``models.py``)."""

from __future__ import annotations

import torch


class TokenBatches:
    """Stands in for ``Batches`` of a tiny BERT (vocabulary 100): fixed random token ids, every text 6 tokens."""

    def __init__(self, count: int) -> None:
        self.ids = torch.randint(1, 100, (count, 6), generator=torch.Generator().manual_seed(0))
        self.lengths = [6] * count

    def __call__(self, indices) -> dict:
        ids = self.ids[list(indices)]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def in_length_order(self, batch_size: int) -> list[list[int]]:
        return [list(range(i, min(i + batch_size, len(self.lengths)))) for i in range(0, len(self.lengths), batch_size)]
