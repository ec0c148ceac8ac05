"""Prepared examples and the byte-bounded LRU that shares them across loss objects."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from lm_eval_c3po.score.decoder import KV
from lm_eval_c3po.score.tries import Trie

DEFAULT_CACHE_BYTES = 1 << 30


@dataclass
class PreparedNeighbour:
    """One example, ready for loss calls: prefix keys/values of the layers after ``d0``, and tries.

    ``prefix_kv[g][j]`` holds the keys/values (``[1, heads, p, dim]``) of prefix
    group ``g`` in decoder layer ``d0 + 1 + j``; ``choice_trie[c]`` is the trie that
    holds choice c (choices share one unless truncation shifted their prefixes).
    """

    prefix_kv: list[list[KV]]
    tries: list[Trie]
    choice_trie: list[int]

    @property
    def nbytes(self) -> int:
        tensors = [t for group in self.prefix_kv for kv in group for t in kv]
        tensors += [t for trie in self.tries for t in trie.tensors]
        return sum(t.numel() * t.element_size() for t in tensors)


class PrefixCache:
    """A byte-bounded LRU of :class:`PreparedNeighbour`, shared by the loss objects of one model.

    Keys are the example's token ids plus everything that shapes its rows
    (``max_length``, token spec, first critical decoder layer), so a
    reference row retrieved for several test contexts is prepared once.
    ``prepared`` counts neighbours prepared (each is one prefix pass).
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.max_bytes = max_bytes
        self.prepared = 0
        self._entries: OrderedDict[tuple, PreparedNeighbour] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: tuple) -> PreparedNeighbour | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: tuple, entry: PreparedNeighbour) -> None:
        if key in self._entries:
            return
        self._entries[key] = entry
        self._bytes += entry.nbytes
        while self._bytes > self.max_bytes and self._entries:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.nbytes
