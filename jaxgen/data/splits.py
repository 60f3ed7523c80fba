"""Train/held-out split for sources that have no splits of their own, and reader shards.

Both are pure index arithmetic, so every process and every run agrees on them
without communicating.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Part = Literal["train", "eval"]


@dataclasses.dataclass(frozen=True)
class HoldOut:
    """Every n-th document (ordinals n-1, 2n-1, ...) is held out for evaluation."""

    every_nth: int
    part: Part

    def keeps(self, ordinal: int) -> bool:
        held_out = ordinal % self.every_nth == self.every_nth - 1
        return held_out == (self.part == "eval")

    def size(self, n_documents: int) -> int:
        held_out = n_documents // self.every_nth
        return held_out if self.part == "eval" else n_documents - held_out

    def ordinal(self, i: int) -> int:
        """The ordinal, among all documents, of the i-th document of this part."""
        if self.part == "eval":
            return i * self.every_nth + self.every_nth - 1
        return i + i // (self.every_nth - 1)


@dataclasses.dataclass(frozen=True)
class Shard:
    """Reader `index` of `count` takes documents index, index+count, index+2*count, ..."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard index {self.index} is not in [0, {self.count})")

    def within(self, index: int, count: int) -> Shard:
        """Reader `index` of `count` splitting this shard's documents again (e.g. grain workers)."""
        return Shard(self.index + index * self.count, self.count * count)


class HeldOutView:
    """One part of a random-access source under a `HoldOut` rule, itself random access."""

    def __init__(self, source, holdout: HoldOut):
        self.source, self.holdout = source, holdout

    def __len__(self) -> int:
        return self.holdout.size(len(self.source))

    def __getitem__(self, i: int):
        return self.source[self.holdout.ordinal(i)]
