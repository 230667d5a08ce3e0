"""Seeded random subsets of a data set, chosen while its rows stream past (`DatasetSpec.sample_rows`).

Why not `limit`: a file's head is a biased subset (VQAv2's questions are grouped by image, OVEN's by entity
and split, VizWiz's by collection batch), so sizing a training mix or an evaluation subset by its head
measures the head. Why a hash and not a shuffle: rank each row by a hash of (seed, row id) and keep the
`k` lowest ranks ("bottom-k" sampling). The subset then depends only on the seed and the ids, never on the
file's order, the chunk size or the machine; memory is the `k` kept rows (a heap), not the file; and
growing `k` keeps every row the smaller subset had. Rows are handed on in their input order.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import Counter
from collections.abc import Iterator
from typing import Any

from inbol_ray.schema import DATASET, ID


def row_rank(seed: int, row_id: str) -> int:
    """The row's place in the seeded random order (64 bits of blake2b: collisions are negligible)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{row_id}".encode(), digest_size=8).digest(), "big")


class RowSample:
    """The `k` rows of lowest rank seen so far: a max-heap of (-rank, -position, row)."""

    def __init__(self, k: int, seed: int) -> None:
        if k <= 0:
            raise ValueError(f"sample_rows must be > 0, got {k}")
        self.k, self.seed, self.seen = k, seed, 0
        self._heap: list[tuple[int, int, dict[str, Any]]] = []
        self.dropped: Counter[str] = Counter()
        """Rows left out of the subset, per `dataset` (prepare counts them: no row is lost silently)."""

    def add(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            entry = (-row_rank(self.seed, str(row[ID])), -self.seen, row)
            self.seen += 1
            if len(self._heap) < self.k:
                heapq.heappush(self._heap, entry)
            elif entry[:2] > self._heap[0][:2]:  # a lower rank than the highest kept
                self.dropped[str(heapq.heapreplace(self._heap, entry)[2][DATASET])] += 1
            else:
                self.dropped[str(row[DATASET])] += 1

    def chunks(self, chunk_rows: int) -> Iterator[list[dict[str, Any]]]:
        """The kept rows in input order, `chunk_rows` at a time; the sample is then empty."""
        kept = [row for _, _, row in sorted(self._heap, key=lambda e: -e[1])]
        self._heap = []
        for start in range(0, len(kept), chunk_rows):
            yield kept[start : start + chunk_rows]
