"""The item vocabulary: external item ids (strings) <-> the model's internal ids 1..n_items (0 is padding).

It is saved next to every checkpoint as ``item_vocabulary.json`` so that recommendations come back as the user's
own item ids. The file is ``{"padding_id": 0, "items": [external id of internal id 1, of id 2, ...]}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import numpy as np

VOCABULARY_FILE = "item_vocabulary.json"
PADDING_ID = 0


class ItemVocabulary:
    def __init__(self, items: Iterable):
        self.items: list[str] = [str(item) for item in items]
        self._ids = {item: i for i, item in enumerate(self.items, start=1)}
        if len(self._ids) != len(self.items):
            raise ValueError("the item vocabulary lists an item more than once")

    @property
    def n_items(self) -> int:
        return len(self.items)

    def __len__(self) -> int:
        return self.n_items

    def __contains__(self, item) -> bool:
        return str(item) in self._ids

    def __eq__(self, other) -> bool:
        return isinstance(other, ItemVocabulary) and self.items == other.items

    def __repr__(self) -> str:
        return f"ItemVocabulary(n_items={self.n_items})"

    def encode(self, items: Iterable, *, unknown: str = "error") -> list[int]:
        """Internal ids of external ids. ``unknown="error"`` raises on an item outside the vocabulary;
        ``unknown="padding"`` maps it to 0, which the model ignores (a history of new and known items)."""
        if unknown not in ("error", "padding"):
            raise ValueError(f"unknown must be 'error' or 'padding', got {unknown!r}")
        items = list(items)
        ids = [self._ids.get(str(item), PADDING_ID) for item in items]
        if unknown == "error" and PADDING_ID in ids:
            missing = [item for item, i in zip(items, ids) if i == PADDING_ID]
            raise KeyError(f"{len(missing)} item(s) not in the vocabulary of {self.n_items} items, e.g. {missing[:3]}")
        return ids

    def decode(self, ids: Iterable) -> list[str]:
        """External ids of internal ids 1..n_items (a tensor or array of ids works too)."""
        ids = np.asarray(ids.tolist() if hasattr(ids, "tolist") else list(ids))
        if ids.size and ids.dtype.kind not in "iu":
            raise TypeError(f"internal item ids must be integers, got {ids.dtype} values such as {ids.flat[0]!r}")
        bad = (ids < 1) | (ids > self.n_items)
        if bad.any():
            raise ValueError(f"item id {int(ids[bad][0])} is outside 1..n_items={self.n_items}")
        return [self.items[i - 1] for i in ids.reshape(-1).tolist()]

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, VOCABULARY_FILE)
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"padding_id": PADDING_ID, "items": self.items}, f, ensure_ascii=False)
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, revision: str | None = None) -> "ItemVocabulary":
        """Load from a directory, or from a Hub model repo id at `revision` (downloads ``item_vocabulary.json``)."""
        path = os.path.join(directory, VOCABULARY_FILE)
        if not os.path.isfile(path):
            if os.path.isdir(directory):
                raise FileNotFoundError(f"{directory} has no {VOCABULARY_FILE}")
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(str(directory), VOCABULARY_FILE, revision=revision)
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or not isinstance(data.get("items"), list):
            raise ValueError(f"{path} is not an item vocabulary: expected {{\"items\": [...]}}")
        return cls(data["items"])
