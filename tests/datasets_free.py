"""A tiny map-style dataset of random token ids for Trainer tests (no `datasets` download)."""

from __future__ import annotations

import torch


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, size: int, length: int, vocab: int = 256, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (size, length), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}
