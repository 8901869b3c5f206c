"""The twin of csrc/block_manager.cc: reference counts, the free stack, the LRU prefix cache.

Every block is exactly one of: free (no hash, on a LIFO stack), cached-free (holds a prefix hash,
refcount 0, on an LRU list, oldest first) or referenced (refcount > 0, the number of block-table
occurrences).
"""

from __future__ import annotations

from collections import OrderedDict


class BlockManager:
    """Reference counts, the free stack, the LRU list of cached-free blocks, the hash table."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_parent_hash = [0] * num_blocks
        self.block_token_ids: list[list[int] | None] = [None] * num_blocks
        self.free_block_ids = list(range(num_blocks - 1, -1, -1))  # stack: pop() gives 0 first
        self.cached_block_ids: OrderedDict[int, None] = OrderedDict()  # LRU, oldest first
        self.hash_to_block: dict[int, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids) + len(self.cached_block_ids)

    def allocate(self) -> int:
        """A fresh block with refcount 1; evicts the least recently freed cached block if needed."""
        if self.free_block_ids:
            block_id = self.free_block_ids.pop()
        else:
            block_id, _ = self.cached_block_ids.popitem(last=False)
            del self.hash_to_block[self.block_hash[block_id]]
            self.block_hash[block_id] = None
            self.block_token_ids[block_id] = None
        self.ref_counts[block_id] = 1
        return block_id

    def take(self, block_id: int) -> None:
        """One more reference to a cached block (a prefix-cache hit)."""
        if self.ref_counts[block_id] == 0:
            del self.cached_block_ids[block_id]
        self.ref_counts[block_id] += 1

    def release(self, block_table: list[int]) -> None:
        """Drops one reference to each block of `block_table`, last block first."""
        for block_id in reversed(block_table):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                if self.block_hash[block_id] is None:
                    self.free_block_ids.append(block_id)
                else:
                    self.cached_block_ids[block_id] = None

    def lookup(self, block_hash: int, parent_hash: int, token_ids: list[int]) -> int | None:
        """The cached block holding `block_hash` whose parent hash and tokens match exactly."""
        block_id = self.hash_to_block.get(block_hash)
        if block_id is None:
            return None
        if self.block_parent_hash[block_id] != parent_hash:
            return None
        if self.block_token_ids[block_id] != token_ids:
            return None
        return block_id

    def register(
        self, block_id: int, block_hash: int, parent_hash: int, token_ids: list[int]
    ) -> None:
        """Offers a full, referenced block to the prefix cache; a no-op when the block already
        holds a hash or another block holds this one."""
        if self.block_hash[block_id] is not None or block_hash in self.hash_to_block:
            return
        self.block_hash[block_id] = block_hash
        self.block_parent_hash[block_id] = parent_hash
        self.block_token_ids[block_id] = token_ids
        self.hash_to_block[block_hash] = block_id

    def reset_prefix_cache(self) -> int:
        """Forgets every prefix: all hashes are dropped, and the cached-free blocks go back to
        the free stack, least recently freed first. Returns the hashes dropped."""
        dropped = len(self.hash_to_block)
        for block_id in self.cached_block_ids:
            self.free_block_ids.append(block_id)
        self.cached_block_ids.clear()
        self.block_hash = [None] * self.num_blocks
        self.block_token_ids = [None] * self.num_blocks
        self.hash_to_block.clear()
        return dropped
