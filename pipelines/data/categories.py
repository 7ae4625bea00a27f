"""COCO category ids <-> the model's contiguous class ids (`CategoryMap`), shared by every stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipelines.data.errors import DatasetError


@dataclass(frozen=True)
class CategoryMap:
    """COCO category ids (any order, with gaps) <-> contiguous class ids 1..K; 0 is background.

    coco_ids are sorted ascending, so contiguous id k is coco_ids[k - 1].
    """

    coco_ids: tuple[int, ...]
    names: tuple[str, ...]
    supercategories: tuple[str, ...] = ()
    _index: dict[int, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self):
        ids = tuple(int(i) for i in self.coco_ids)
        if list(ids) != sorted(set(ids)):
            raise DatasetError(f"category ids must be unique and sorted, got {list(self.coco_ids)}")
        if len(self.names) != len(ids) or (self.supercategories and len(self.supercategories) != len(ids)):
            raise DatasetError("category names / supercategories do not match the ids")
        object.__setattr__(self, "coco_ids", ids)
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        object.__setattr__(self, "supercategories", tuple(str(s) for s in self.supercategories) or ("",) * len(ids))
        object.__setattr__(self, "_index", {c: k + 1 for k, c in enumerate(ids)})

    @classmethod
    def from_coco(cls, categories: list[dict[str, Any]]) -> CategoryMap:
        """From the JSON's "categories" list; ids sorted ascending. DatasetError for an entry that is not an
        object with an integer id (booleans are not), or a repeated id."""
        for c in categories:
            if not (isinstance(c, dict) and type(c.get("id")) is int):
                text = repr(c)
                raise DatasetError(f"malformed category {text if len(text) <= 60 else text[:57] + '...'}: "
                                   "needs an object with an int id")
        ordered = sorted(categories, key=lambda c: c["id"])
        ids = [int(c["id"]) for c in ordered]
        if len(set(ids)) != len(ids):
            raise DatasetError(f"duplicate category ids in {ids}")
        return cls(tuple(ids), tuple(str(c.get("name", c["id"])) for c in ordered),
                   tuple(str(c.get("supercategory", "")) for c in ordered))

    @property
    def num_classes(self) -> int:
        """K + 1: the K categories plus background."""
        return len(self.coco_ids) + 1

    def __contains__(self, coco_id: object) -> bool:
        return coco_id in self._index

    def to_contiguous(self, coco_id: int) -> int:
        try:
            return self._index[int(coco_id)]
        except KeyError:
            raise KeyError(f"unknown COCO category id {coco_id}") from None

    def to_coco(self, idx: int) -> int:
        if not 1 <= int(idx) <= len(self.coco_ids):
            raise KeyError(f"contiguous class id {idx} outside 1..{len(self.coco_ids)}")
        return self.coco_ids[int(idx) - 1]

    def name(self, idx: int) -> str:
        """Name of contiguous class `idx` (0 -> "background")."""
        return "background" if int(idx) == 0 else self.names[self.coco_ids.index(self.to_coco(idx))]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: {"categories": [{"contiguous_id", "coco_id", "name", "supercategory"}, ...]}."""
        return {"categories": [
            {"contiguous_id": k + 1, "coco_id": c, "name": n, "supercategory": s}
            for k, (c, n, s) in enumerate(zip(self.coco_ids, self.names, self.supercategories, strict=True))
        ]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CategoryMap:
        cats = data["categories"]
        if [int(c["contiguous_id"]) for c in cats] != list(range(1, len(cats) + 1)):
            raise DatasetError("category map: contiguous ids must be 1..K in order")
        return cls(tuple(int(c["coco_id"]) for c in cats), tuple(c["name"] for c in cats),
                   tuple(c.get("supercategory", "") for c in cats))
