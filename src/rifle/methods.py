"""Method labels: the one name of a trick list in sweep spaces, studies, comparisons and reports.

A label is the tricks in the table's canonical order (rifle.tricks.TRICKS) joined by '+', "plain" for
none: `--tricks l2sp,rifle` is "rifle+l2sp" everywhere, so a comparison pairs it with "l2sp". Light (no
torch) because the sweep reads labels while it validates a space file.
"""
from __future__ import annotations

from collections.abc import Iterable

from .config import trick_names

PLAIN = "plain"


def _order() -> dict[str, int]:
    return {t: i for i, t in enumerate(trick_names())}


def method_label(tricks: str | Iterable[str] | None) -> str:
    """Trick list -> label. Takes a list of names or the `tricks` option as written ("l2sp,rifle", "",
    "none"; a label is accepted too, so label(label) is the label). ValueError for an unknown trick."""
    if tricks is None or isinstance(tricks, str):
        tricks = (tricks or "").replace("+", ",").split(",")
    names = [t.strip() for t in tricks if t.strip()]
    if names in ([], ["none"], [PLAIN]):
        return PLAIN
    order = _order()
    unknown = [t for t in names if t not in order]
    if unknown:
        raise ValueError(f"unknown trick {unknown[0]!r} (known: {', '.join(order)})")
    return "+".join(sorted(dict.fromkeys(names), key=order.__getitem__))


def method_tricks(label: str) -> list[str]:
    """Label -> trick list in canonical order ([] for plain); ",".join(...) is a `tricks` option value.
    ValueError when the label names no trick list (e.g. a study name a comparison used as its label)."""
    canonical = method_label(label)
    if canonical != label:
        raise ValueError(f"{label!r} is not a method label (the canonical form is {canonical!r})")
    return [] if label == PLAIN else label.split("+")


def method_sort_key(label: str) -> tuple:
    """plain first, then single tricks in the registry's order, then combinations; other labels last."""
    if label == PLAIN:
        return (0, ())
    parts = label.split("+")
    order = _order()
    return (len(parts), tuple(order.get(p, len(order)) for p in parts), label)
