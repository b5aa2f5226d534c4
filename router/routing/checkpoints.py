"""Where a prompt's index keys sit: every block for the first `2 * dense_blocks` blocks, then
geometrically thinner (spacing = position // dense_blocks, rounded down to a power of two), so
a 16k-token prompt (~1000 blocks) has ~112 keys and matched lengths are exact up to 32 blocks
and within 1/dense_blocks beyond. The positions are the same for every prompt, so equal
prefixes have equal keys (see prefix_index)."""

from __future__ import annotations

from bisect import bisect_right


class Checkpoints:
    """The fixed block positions that carry a key; the same for every prompt."""

    def __init__(self, dense_blocks: int, block_chars: int) -> None:
        self._dense = dense_blocks
        self._block_chars = block_chars
        self.positions: list[int] = []
        self.weights: list[int] = []
        """Blocks each checkpoint stands for (its distance from the previous one)."""
        self.byte_offsets: list[int] = []
        self._extend(1024)

    def _extend(self, upto_blocks: int) -> None:
        pos = self.positions[-1] if self.positions else 0
        while pos < upto_blocks:
            step = 1 if pos < self._dense else 1 << ((pos // self._dense).bit_length() - 1)
            pos += step
            self.positions.append(pos)
            self.weights.append(step)
            self.byte_offsets.append(pos * self._block_chars)

    def count(self, full_blocks: int) -> int:
        """How many checkpoints a prompt of `full_blocks` blocks has."""
        if full_blocks > self.positions[-1]:
            self._extend(full_blocks)
        return bisect_right(self.positions, full_blocks)
