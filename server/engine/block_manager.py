"""Which KV-pool blocks are free, used (by how many rows) or cached, with no tensor in sight (kv_pool.py holds the
data). Block 0 is scratch and never handed out.

    used     refcount > 0: in some rows' block tables (a prompt's blocks shared by a prefix hit, beams' blocks)
    cached   refcount 0 but its content is a full prompt block under a known hash (prefix_hash): a later prompt with
             the same adapter and the same leading tokens takes it instead of computing it again (T5: a whole
             encoder output, for the same adapter and input); evicted least recently used first when blocks are
             needed
    free     nothing
Allocation keeps a row's blocks consecutive where it can (the block after the row's last; a new row in the middle
of the largest free run, leaving its neighbours room to grow), so attention reads each row as one view.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Hashable, Sequence

from .kv_pool import SCRATCH_BLOCK

_FREE = 1


def prefix_hash(parent: Hashable | None, adapter_key: Hashable, tokens: Sequence[int]) -> int:
    """A full block's identity: the adapter (its task's version, a mix's member versions), the block before it and
    its tokens — never shared across tasks, versions or mixes."""
    return hash((parent, adapter_key, tuple(tokens)))


class BlockManager:
    def __init__(self, blocks: int, block_size: int, *, prefix_cache: bool = True):
        if blocks < 2:
            raise ValueError(f"a KV pool needs at least 2 blocks (one is scratch), not {blocks}")
        self.total = blocks
        self.block_size = block_size
        self.prefix_cache = prefix_cache
        self.refs = [0] * blocks
        self.refs[SCRATCH_BLOCK] = 1
        self._free = bytearray([_FREE]) * blocks
        self._free[SCRATCH_BLOCK] = 0
        self._free_count = blocks - 1
        self._cached: OrderedDict[int, int] = OrderedDict()  # block -> hash, least recently used first
        self._by_hash: dict[int, int] = {}
        self._hash_of: dict[int, int] = {}
        self.prefix_hits = 0  # blocks taken from the cache instead of computed

    # ---- counts ----------------------------------------------------------------------------------
    @property
    def free(self) -> int:
        return self._free_count

    @property
    def cached(self) -> int:
        return len(self._cached)

    @property
    def used(self) -> int:
        """Blocks some row holds (scratch excluded)."""
        return self.total - 1 - self._free_count - len(self._cached)

    def available(self) -> int:
        """Blocks an allocation may take: free ones, then cached ones (evicted)."""
        return self._free_count + len(self._cached)

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    # ---- allocation ----------------------------------------------------------------------------------
    def allocate(self, count: int, after: int | None = None) -> list[int] | None:
        """`count` blocks for one row (refcount 1), after its block `after` where possible; None if too few."""
        if count > self.available():
            return None
        while self._free_count < count:
            self._evict_oldest()
        chosen: list[int] = []
        nxt = None if after is None else after + 1
        while len(chosen) < count:
            if nxt is None or nxt >= self.total or not self._free[nxt]:
                nxt = self._run_start(count - len(chosen))
            chosen.append(nxt)
            self._take(nxt)
            nxt += 1
        return chosen

    def _run_start(self, wanted: int) -> int:
        """Where a new run of `wanted` blocks starts: the middle of the largest free run (its start if it is not
        longer than wanted)."""
        best_start, best_length = -1, 0
        for run in re.finditer(rb"\x01+", bytes(self._free)):
            if run.end() - run.start() > best_length:
                best_start, best_length = run.start(), run.end() - run.start()
        spare = best_length - wanted
        return best_start + spare // 2 if spare > 0 else best_start

    def _take(self, block: int) -> None:
        self._free[block] = 0
        self._free_count -= 1
        self.refs[block] = 1

    def _evict_oldest(self) -> None:
        block, digest = self._cached.popitem(last=False)
        del self._by_hash[digest], self._hash_of[block]
        self._free[block] = _FREE
        self._free_count += 1

    # ---- sharing and release --------------------------------------------------------------------------
    def share(self, blocks: Sequence[int]) -> None:
        """Another row holds these blocks too (a prefix hit, a beam following its parent)."""
        for block in blocks:
            if self.refs[block] == 0:
                self._cached.pop(block, None)  # a cached block in use again
            self.refs[block] += 1

    def release(self, blocks: Sequence[int]) -> None:
        """A row lets go of its blocks: unused ones become cached (full prompt blocks with a hash) or free."""
        for block in blocks:
            self.refs[block] -= 1
            if self.refs[block] > 0:
                continue
            if block in self._hash_of:
                self._cached[block] = self._hash_of[block]
            else:
                self._free[block] = _FREE
                self._free_count += 1

    # ---- the prefix cache ----------------------------------------------------------------------------
    def cached_prefix(self, hashes: Sequence[int]) -> list[int]:
        """The longest run of leading blocks already cached under these hashes, now held by the caller."""
        found = [self._by_hash[digest] for digest in hashes[: self.cached_count(hashes)]]
        self.share(found)
        self.prefix_hits += len(found)
        return found

    def cached_count(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of these hashes are cached (taking none)."""
        if not self.prefix_cache:
            return 0
        count = 0
        while count < len(hashes) and hashes[count] in self._by_hash:
            count += 1
        return count

    def cached_all(self, hashes: Sequence[int]) -> list[int]:
        """Every block of these hashes, now held by the caller — or none ([]) if one is missing (a T5 encoder
        output: all of it or nothing)."""
        if not self.prefix_cache or not hashes:
            return []
        found = [self._by_hash.get(digest) for digest in hashes]
        if None in found:
            return []
        self.share(found)
        return found

    def register(self, block: int, digest: int) -> None:
        """A full prompt block's hash, so later prompts may take it (the first block of a hash wins)."""
        if self.prefix_cache and digest not in self._by_hash and block not in self._hash_of:
            self._by_hash[digest] = block
            self._hash_of[block] = digest

    def forget_cached(self) -> int:
        """Evict every cached block (e.g. an adapter deleted: its blocks could never be hit again); how many."""
        count = len(self._cached)
        while self._cached:
            self._evict_oldest()
        return count
