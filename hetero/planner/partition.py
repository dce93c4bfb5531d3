"""Cut a placed graph into partitions: as few as possible, never with a cycle between them.

Nodes placed on the same executor are merged greedily in topological order, then whole
partitions of one executor are merged wherever no path between them runs through another
partition (which would make the partition graph cyclic). Ancestor and descendant sets are
kept as integer bitsets so a merge test is a few bit operations.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable, Sequence

from hetero.graph import Model, Node


class _Groups:
    def __init__(self) -> None:
        self.members: dict[int, list[int]] = {}
        self.key: dict[int, Hashable] = {}
        self.anc: dict[int, int] = {}
        self.desc: dict[int, int] = {}
        self._next = 0

    def new(self, key: Hashable, node: int, parents: set[int]) -> int:
        gid = self._next
        self._next += 1
        self.members[gid] = [node]
        self.key[gid] = key
        anc = 0
        for p in parents:
            anc |= (1 << p) | self.anc[p]
        self.anc[gid] = anc
        self.desc[gid] = 0
        for p in _bits(anc):
            self.desc[p] |= 1 << gid
        return gid

    def can_join(self, gid: int, parents: set[int]) -> bool:
        """Adding a node whose inputs come from `parents` to `gid` keeps the group graph acyclic."""
        return all(p == gid or not (self.anc[p] >> gid) & 1 for p in parents)

    def join(self, gid: int, node: int, parents: set[int]) -> None:
        self.members[gid].append(node)
        added = 0
        for p in parents:
            if p != gid:
                added |= (1 << p) | self.anc[p]
        self._add_ancestors(gid, added)

    def _add_ancestors(self, gid: int, added: int) -> None:
        for target in (gid, *_bits(self.desc[gid])):
            new = added & ~self.anc[target]
            self.anc[target] |= new
            for a in _bits(new):
                self.desc[a] |= 1 << target

    def can_merge(self, a: int, b: int) -> bool:
        """No path between a and b passes through a third group."""
        if (self.anc[b] >> a) & 1:
            return not (self.desc[a] & self.anc[b])
        if (self.anc[a] >> b) & 1:
            return not (self.desc[b] & self.anc[a])
        return True

    def merge(self, keep: int, gone: int) -> None:
        self.members[keep].extend(self.members.pop(gone))
        del self.key[gone]
        both = ~((1 << keep) | (1 << gone))
        anc = (self.anc.pop(gone) | self.anc[keep]) & both
        desc = (self.desc.pop(gone) | self.desc[keep]) & both
        for g in self.anc:
            self.anc[g] &= ~(1 << gone)
            self.desc[g] &= ~(1 << gone)
        self.anc[keep], self.desc[keep] = anc, desc
        for d in _bits(desc):
            self.anc[d] |= anc | (1 << keep)
        for a in _bits(anc):
            self.desc[a] |= desc | (1 << keep)


def _bits(mask: int) -> list[int]:
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


def partition(model: Model, keys: Sequence[Hashable]) -> list[list[int]]:
    """Group node indices by `keys[i]` (the executor of node i) into acyclic partitions.

    The greedy growth runs from the inputs and from the outputs and keeps whichever gives fewer
    partitions. Returns node-index lists, each in topological order, the lists themselves in an
    order in which they can run one after another.
    """
    forward = _grow(model.nodes, model.predecessors, keys)
    backward = _grow(model.nodes[::-1], model.successors, keys)
    backward.anc, backward.desc = backward.desc, backward.anc
    return _ordered(min(forward, backward, key=lambda groups: len(groups.members)))


def _grow(nodes: Sequence[Node], parents_of: Callable[[Node], Sequence[Node]],
          keys: Sequence[Hashable]) -> _Groups:
    """Add nodes one by one (parents first) to a group of their key: a parent's if possible, else
    any other that keeps the group graph acyclic, else a new one; then merge whole groups."""
    groups = _Groups()
    group_of: dict[int, int] = {}
    for node in nodes:
        parents = {group_of[p.index] for p in parents_of(node)}
        key = keys[node.index]
        same = sorted((g for g in groups.members if groups.key[g] == key), reverse=True)
        ranked = [g for g in same if g in parents] + [g for g in same if g not in parents]
        target = next((g for g in ranked if groups.can_join(g, parents)), None)
        if target is None:
            group_of[node.index] = groups.new(key, node.index, parents)
        else:
            groups.join(target, node.index, parents)
            group_of[node.index] = target
    _merge_groups(groups)
    return groups


def _merge_groups(groups: _Groups) -> None:
    changed = True
    while changed:
        changed = False
        ids = sorted(groups.members, key=lambda g: groups.members[g][0])
        for i, a in enumerate(ids):
            if a not in groups.members:
                continue
            for b in ids[i + 1:]:
                if b in groups.members and groups.key[a] == groups.key[b] and groups.can_merge(a, b):
                    groups.merge(a, b)
                    changed = True


def _ordered(groups: _Groups) -> list[list[int]]:
    waiting = {g: set(_bits(groups.anc[g])) for g in groups.members}
    ready = [(min(groups.members[g]), g) for g, deps in waiting.items() if not deps]
    heapq.heapify(ready)
    done: set[int] = set()
    order: list[list[int]] = []
    while ready:
        _, g = heapq.heappop(ready)
        done.add(g)
        order.append(sorted(groups.members[g]))
        for d in _bits(groups.desc[g]):
            if d not in done and waiting[d] <= done and all(d != r for _, r in ready):
                heapq.heappush(ready, (min(groups.members[d]), d))
    return order
