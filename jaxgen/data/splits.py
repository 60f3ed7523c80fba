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
    """Every n-th block of `block` consecutive documents is held out for evaluation.

    Documents are counted in blocks of `block`; blocks n-1, 2n-1, ... are held out, so one
    document in n is, in runs of `block` documents (block=1: ordinals n-1, 2n-1, ...). A run
    keeps held-out documents away from their neighbours in training (the rest of a passage, a
    site's other pages) except at its two ends. `blocks_before` shifts the count, for a part of
    a source numbered on its own (a piece of a streamed file, see streaming.py).
    """

    every_nth: int
    part: Part
    block: int = 1

    def keeps(self, ordinal: int, blocks_before: int = 0) -> bool:
        held_out = (blocks_before + ordinal // self.block) % self.every_nth == self.every_nth - 1
        return held_out == (self.part == "eval")

    def size(self, n_documents: int) -> int:
        period, held = self.every_nth * self.block, (self.every_nth - 1) * self.block
        periods, rest = divmod(n_documents, period)
        held_out = periods * self.block + max(0, rest - held)
        return held_out if self.part == "eval" else n_documents - held_out

    def ordinal(self, i: int) -> int:
        """The ordinal, among all documents, of the i-th document of this part."""
        period = self.every_nth * self.block
        if self.part == "eval":
            blocks, within = divmod(i, self.block)
            return blocks * period + (self.every_nth - 1) * self.block + within
        periods, within = divmod(i, (self.every_nth - 1) * self.block)
        return periods * period + within


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

    def ordinal(self, i: int) -> int:
        """The position in the whole source of this part's i-th record."""
        return self.holdout.ordinal(i)
