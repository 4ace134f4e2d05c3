"""The category tree: nodes, ancestors, and the fixed label order the models use."""

from __future__ import annotations

import dataclasses
import json
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

PATH_SEPARATOR = " > "


@dataclasses.dataclass(frozen=True)
class Category:
    id: str
    name: str
    parent: Optional[str]
    level: int


class CategoryTree:
    """An immutable category tree; ``ids`` is the label order of every model output."""

    def __init__(self, categories: Iterable[Category]):
        nodes = sorted(categories, key=lambda c: (c.level, c.id))
        self.nodes: Dict[str, Category] = {c.id: c for c in nodes}
        if len(self.nodes) != len(nodes):
            raise ValueError("category ids must be unique")
        for c in nodes:
            if c.parent is not None and c.parent not in self.nodes:
                raise ValueError(f"category {c.id!r} has unknown parent {c.parent!r}")
        self.ids: Tuple[str, ...] = tuple(c.id for c in nodes)
        self.index: Dict[str, int] = {cid: i for i, cid in enumerate(self.ids)}
        self.levels: int = max((c.level for c in nodes), default=0)
        self._children: Dict[str, List[str]] = {cid: [] for cid in self.ids}
        for c in nodes:
            if c.parent is not None:
                self._children[c.parent].append(c.id)

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, category_id: object) -> bool:
        return category_id in self.nodes

    def ancestors(self, category_id: str) -> List[str]:
        """The ids above ``category_id``, nearest first."""
        out = []
        parent = self.nodes[category_id].parent
        while parent is not None:
            out.append(parent)
            parent = self.nodes[parent].parent
        return out

    def closure(self, category_ids: Iterable[str]) -> List[str]:
        """The given ids plus all their ancestors, in label order. Unknown ids raise KeyError."""
        found = set()
        for cid in category_ids:
            if cid not in self.nodes:
                raise KeyError(cid)
            found.add(cid)
            found.update(self.ancestors(cid))
        return sorted(found, key=self.index.__getitem__)

    def children(self, category_id: str) -> List[str]:
        return list(self._children[category_id])

    def descendants(self, category_id: str) -> List[str]:
        out, stack = [], list(self._children[category_id])
        while stack:
            cid = stack.pop()
            out.append(cid)
            stack.extend(self._children[cid])
        return out

    def at_level(self, category_ids: Iterable[str], level: int) -> List[str]:
        return [c for c in category_ids if self.nodes[c].level == level]

    def level_of(self, category_id: str) -> int:
        return self.nodes[category_id].level

    def level_columns(self, level: int) -> List[int]:
        """The label indices of the categories at ``level``, in label order."""
        return [i for i, cid in enumerate(self.ids) if self.nodes[cid].level == level]

    def ancestor_matrix(self) -> List[List[int]]:
        """For each label index, the label indices of itself and its ancestors."""
        return [[self.index[a] for a in [cid, *self.ancestors(cid)]] for cid in self.ids]

    def to_records(self) -> List[dict]:
        return [dataclasses.asdict(self.nodes[cid]) for cid in self.ids]

    @classmethod
    def from_records(cls, records: Iterable[Mapping]) -> CategoryTree:
        return cls(Category(id=r["id"], name=r["name"], parent=r.get("parent"), level=int(r["level"])) for r in records)

    @classmethod
    def from_paths(cls, paths: Iterable[Sequence[str]]) -> CategoryTree:
        """Builds the tree from category paths such as ("Apparel", "Topwear", "Tshirts")."""
        nodes: Dict[str, Category] = {}
        for path in paths:
            parent = None
            for depth in range(1, len(path) + 1):
                cid = path_id(path[:depth])
                nodes.setdefault(cid, Category(id=cid, name=path[depth - 1], parent=parent, level=depth))
                parent = cid
        return cls(nodes.values())

    def save_json(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_records(), f)

    @classmethod
    def load_json(cls, path: str) -> CategoryTree:
        with open(path, encoding="utf-8") as f:
            return cls.from_records(json.load(f))


def path_id(path: Sequence[str]) -> str:
    """The category id of a path: its names joined by `` > ``."""
    return PATH_SEPARATOR.join(path)
