"""Cross-sell: find the ordered products in a message, pick complementary ones from the catalog."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .catalog import Catalog, Product
from .facts import MessageFacts, Selector, compile_selector


@dataclass(frozen=True)
class Finder:
    """Where ordered products are written in a message.

    ``selector``: CSS selector in the HTML (compiled once, here: lxml + cssselect, soupsieve for what
    cssselect cannot do exactly alike); the value read is ``attribute`` of each element (e.g.
    ``data-product-id`` or ``href``), else its text. ``pattern``: regex applied to each value (to the
    body text when there is no selector); group 1 (or the whole match) is the product id, URL or name.
    """

    selector: str | None = None
    attribute: str | None = None
    pattern: re.Pattern[str] | None = None
    compiled: Selector | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.selector and self.compiled is None:
            object.__setattr__(self, "compiled", compile_selector(self.selector))

    def values(self, facts: MessageFacts) -> list[str]:
        raw: Iterable[str]
        if self.compiled is not None:
            raw = facts.select_values(self.compiled, self.attribute)
        else:
            raw = [facts.text]
        if self.pattern is None:
            return [v for v in raw if v]
        out = []
        for v in raw:
            for m in self.pattern.finditer(v):
                out.append(m.group(1) if m.groups() and m.group(1) is not None else m.group(0))
        return out


def find_ordered(facts: MessageFacts, finders: Iterable[Finder], catalog: Catalog) -> list[Product]:
    """Catalog products the message names, in order of appearance, without duplicates."""
    seen: dict[str, Product] = {}
    for finder in finders:
        for value in finder.values(facts):
            for p in catalog.recognise(value):
                seen.setdefault(p.id, p)
    return list(seen.values())


def pick(
    catalog: Catalog,
    ordered: list[Product],
    *,
    limit: int,
    same_type: bool = True,
    fallback_featured: bool = True,
    allowed: Callable[[Product], bool] | None = None,
) -> list[Product]:
    """Complementary products: relations first, then the same product_type; never an ordered product (nor
    another variant of it), only in stock, only ``allowed`` ones (caps). Nothing recognised, or nothing
    left: the featured products (minus the ordered ones)."""
    ordered_ids = {p.id for p in ordered}
    ordered_groups = {p.item_group_id for p in ordered if p.item_group_id}

    def ok(p: Product | None) -> bool:
        return (
            p is not None
            and p.id not in ordered_ids
            and not (p.item_group_id and p.item_group_id in ordered_groups)
            and p.in_stock
            and (allowed is None or allowed(p))
        )

    chosen: dict[str, Product] = {}

    def take(candidates: Iterable[Product | None]) -> bool:
        for c in candidates:
            if len(chosen) >= limit:
                return True
            if ok(c) and c.id not in chosen:  # type: ignore[union-attr]
                chosen[c.id] = c  # type: ignore[union-attr]
        return len(chosen) >= limit

    if ordered:
        # round-robin over the ordered products, so the first one does not take every slot
        rel_lists = [
            [catalog.get(r) or next(iter(catalog.recognise(r)), None) for r in p.related] for p in ordered
        ]
        depth = max((len(x) for x in rel_lists), default=0)
        if not take(x[i] for i in range(depth) for x in rel_lists if i < len(x)) and same_type:
            types = [p.product_type for p in ordered if p.product_type]
            take(q for t in dict.fromkeys(types) for q in catalog.products.values() if q.product_type == t)
    if not chosen and fallback_featured:
        take(catalog.featured())
    return list(chosen.values())
