"""The product catalog: a Google Merchant Center feed (RSS 2.0 or Atom, g: namespace) or a plain CSV.

Relations (what goes with what) come from ``g:custom_label_0`` (comma-separated product ids) or the CSV
column ``related``; ``g:custom_label_1 = featured`` (CSV column ``featured``) marks the featured products
shown when no ordered product is recognised. Rule files may add relations in ``[catalog.relations]``.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

from lxml import etree

from .errors import RuleError

G_NS = "http://base.google.com/ns/1.0"
ATOM_NS = "http://www.w3.org/2005/Atom"
IN_STOCK = frozenset({"in_stock", "in stock", "instock"})
_CURRENCY = {"EUR": "€", "USD": "$", "GBP": "£", "CHF": "CHF"}


@dataclass(frozen=True)
class Product:
    id: str
    title: str
    link: str = ""
    image_link: str = ""
    price: str = ""  # as in the feed, e.g. "19.00 EUR"
    availability: str = "in_stock"
    product_type: str = ""
    google_product_category: str = ""
    item_group_id: str = ""
    description: str = ""
    related: tuple[str, ...] = ()
    featured: bool = False

    @property
    def in_stock(self) -> bool:
        return self.availability.strip().lower() in IN_STOCK

    @property
    def price_display(self) -> str:
        """French-style price, e.g. "19,00 €" (the feed's value when it cannot be read)."""
        m = re.fullmatch(r"\s*([0-9]+(?:[.,][0-9]+)?)\s*([A-Za-z]{3})?\s*", self.price or "")
        if not m:
            return self.price
        try:
            amount = Decimal(m.group(1).replace(",", "."))
        except InvalidOperation:
            return self.price
        whole, _, cents = f"{amount:.2f}".partition(".")
        groups = re.sub(r"(?<=\d)(?=(\d{3})+$)", "\u202f", whole)
        cur = _CURRENCY.get((m.group(2) or "EUR").upper(), m.group(2) or "")
        return f"{groups},{cents}\u00a0{cur}".strip()

    @property
    def category(self) -> str:
        """The most specific product_type level ("Maison > Bougies" -> "Bougies")."""
        return self.product_type.split(">")[-1].strip()


def _norm_url(url: str) -> str:
    url = url.strip().lower()
    url = re.sub(r"^https?://(www\.)?", "", url)
    return url.split("?", 1)[0].split("#", 1)[0].rstrip("/")


@dataclass
class Catalog:
    """Products in feed order, with lookup by id, group id, link, image link and title."""

    products: dict[str, Product] = field(default_factory=dict)
    version: str = ""
    source: str = ""
    _index: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for p in self.products.values():
            for key in (p.id.lower(), p.item_group_id.lower(), p.title.strip().casefold()):
                if key:
                    self._index.setdefault(key, p.id)
            for url in (p.link, p.image_link):
                if url:
                    self._index.setdefault(_norm_url(url), p.id)

    def __len__(self) -> int:
        return len(self.products)

    def get(self, product_id: str) -> Product | None:
        return self.products.get(product_id)

    def recognise(self, value: str) -> list[Product]:
        """Products a found value designates: an id, an item group id (every variant), a URL or a title."""
        v = value.strip()
        if not v:
            return []
        if v in self.products:
            return [self.products[v]]
        low = v.lower()
        group = [p for p in self.products.values() if p.item_group_id and p.item_group_id.lower() == low]
        if group:
            return group
        pid = self._index.get(low) or self._index.get(v.casefold())
        if pid is None and ("/" in v or "." in v):
            pid = self._index.get(_norm_url(v))
        return [self.products[pid]] if pid else []

    def featured(self) -> list[Product]:
        marked = [p for p in self.products.values() if p.featured]
        return marked or list(self.products.values())

    @classmethod
    def load(cls, path: Path | str, extra_relations: dict[str, list[str]] | None = None) -> Catalog:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise RuleError(str(path), 0, f"cannot read catalog: {e.strerror or e}") from None
        products = _parse_csv(path, data) if path.suffix.lower() == ".csv" else _parse_feed(path, data)
        if extra_relations:
            for pid, rel in extra_relations.items():
                if pid in products:
                    p = products[pid]
                    merged = tuple(dict.fromkeys([*rel, *p.related]))
                    products[pid] = dataclasses.replace(p, related=merged)
        return cls(products, version=hashlib.sha256(data).hexdigest()[:12], source=str(path))


def _split_ids(value: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in re.split(r"[,;\s]+", value or "") if x.strip())


def _product(path: Path, line: int, f: dict[str, str]) -> Product:
    pid = (f.get("id") or "").strip()
    if not pid:
        raise RuleError(str(path), line, "product without an id")
    title = (f.get("title") or "").strip()
    if not title:
        raise RuleError(str(path), line, f"product {pid}: no title")
    return Product(
        id=pid,
        title=" ".join(title.split()),
        link=(f.get("link") or "").strip(),
        image_link=(f.get("image_link") or "").strip(),
        price=(f.get("price") or "").strip(),
        availability=(f.get("availability") or "in_stock").strip().lower(),
        product_type=(f.get("product_type") or "").strip(),
        google_product_category=(f.get("google_product_category") or "").strip(),
        item_group_id=(f.get("item_group_id") or "").strip(),
        description=" ".join((f.get("description") or "").split()),
        related=_split_ids(f.get("related") or f.get("custom_label_0") or ""),
        featured=(f.get("featured") or f.get("custom_label_1") or "").strip().lower()
        in ("featured", "1", "yes", "true"),
    )


def _parse_feed(path: Path, data: bytes) -> dict[str, Product]:
    parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as e:
        raise RuleError(str(path), e.lineno or 0, f"XML: {e.msg}") from None
    items = root.findall("./channel/item") or root.findall(f"{{{ATOM_NS}}}entry")
    if not items:
        raise RuleError(str(path), root.sourceline or 0, "no <item> (RSS 2.0) or <entry> (Atom) products")
    products: dict[str, Product] = {}
    for item in items:
        f: dict[str, str] = {}
        for child in item:
            if not isinstance(child.tag, str):
                continue
            qn = etree.QName(child)
            if qn.namespace not in (G_NS, ATOM_NS, None):
                continue
            name = qn.localname
            if qn.namespace == ATOM_NS and name == "link":
                f.setdefault("link", child.get("href") or (child.text or ""))
                continue
            if qn.namespace == ATOM_NS and name == "summary":
                name = "description"
            value = (child.text or "").strip()
            if qn.namespace == G_NS or name not in f:
                f[name] = value
        p = _product(path, item.sourceline or 0, f)
        if p.id in products:
            raise RuleError(str(path), item.sourceline or 0, f"duplicate product id {p.id}")
        products[p.id] = p
    return products


def _parse_csv(path: Path, data: bytes) -> dict[str, Product]:
    text = data.decode("utf-8-sig", "replace")
    try:
        dialect = csv.Sniffer().sniff(text.split("\n", 1)[0], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.DictReader(io.StringIO(text), dialect=dialect)
    if not reader.fieldnames or "id" not in [n.strip().lower() for n in reader.fieldnames]:
        raise RuleError(str(path), 1, "CSV catalog needs a header row with at least 'id' and 'title'")
    products: dict[str, Product] = {}
    for row in reader:
        f = {(k or "").strip().lower().removeprefix("g:"): (v or "") for k, v in row.items()}
        p = _product(path, reader.line_num, f)
        if p.id in products:
            raise RuleError(str(path), reader.line_num, f"duplicate product id {p.id}")
        products[p.id] = p
    return products
