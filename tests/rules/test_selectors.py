"""The fast selector path (one lxml tree, cssselect XPath compiled at load) gives exactly what the
BeautifulSoup + soupsieve path gave: on every fixture, on the shipped rules' decisions, on odd HTML."""

from __future__ import annotations

import dataclasses
import os

import lxml.html
import pytest
from bs4 import BeautifulSoup
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.rules import MessageFacts, RuleError
from relay.rules.crosssell import find_ordered
from relay.rules.facts import compile_selector, soup_values

from .conftest import FIXTURES, T0, facts, msg

EML = sorted(FIXTURES.glob("*.eml"))
SHIPPED = ["[data-product-id]", "tr.item .ref", "a[href*='/produits/']"]
LXML_SELECTORS = SHIPPED + [
    "a",
    "A[HREF]",
    "td",
    "table tr > td",
    "tr.item",
    ".ref",
    "#main",
    "p + p",
    "h1 ~ p",
    "img[src^='https://']",
    "a[href$='.pdf']",
    "[lang|=fr]",
    "div:not(.a)",
    "tr:first-child td:last-child",
    "li:nth-child(2n+1)",
    "td:nth-of-type(2)",
    "p:only-child",
    "table, td.price, a[href]",
    "[style]",
    "meta[name=viewport]",
    "body *",
]
SOUPSIEVE_SELECTORS = [
    "p:empty",
    "tr:has(.ref)",
    "td:-soup-contains('€')",
    "a[rel~=nofollow]",
    "[class='item ref']",
    "input[type=TEXT]",
    "a[href*='']",
    "p:is(.a, .b)",
    ":root",
    "a[href='X' i]",
]
ATTRIBUTES = [None, "data-product-id", "href", "class", "rel", "id", "src", "style"]


def _soup_path(f: MessageFacts):
    return BeautifulSoup(f.html, "lxml")


def test_shipped_selectors_compile_to_xpath_once():
    for css in LXML_SELECTORS:
        assert compile_selector(css).engine == "lxml", css
        assert compile_selector(css) is compile_selector(css)  # compiled once, cached
    for css in SOUPSIEVE_SELECTORS:
        sel = compile_selector(css)
        assert sel.engine == "soupsieve" and sel.why, css


@pytest.mark.parametrize("path", EML, ids=lambda p: p.name)
def test_every_fixture_same_values_as_beautifulsoup(path):
    f = facts(path.read_bytes())
    soup = _soup_path(f)
    if f.html.strip():
        assert f.tree is not None  # lxml parsed it: the fast path is what is compared
    for css in LXML_SELECTORS + SOUPSIEVE_SELECTORS:
        assert f.matches(css) == bool(soup.select(css)), css
        for attr in ATTRIBUTES:
            assert f.select_values(css, attr) == soup_values(soup, css, attr), (css, attr)


@pytest.mark.parametrize("path", EML, ids=lambda p: p.name)
def test_every_fixture_body_text_as_before(path):
    f = facts(path.read_bytes())
    text, html = f._bodies
    if text or not html:
        assert f.text == text
        return
    try:
        before = lxml.html.fromstring(html).text_content()
    except Exception:  # noqa: BLE001
        before = ""
    assert f.text == before


def _declared_order(raw: bytes) -> bytes:
    return b"X-Relay-Kind: order_confirmation\r\n" + raw


@pytest.mark.parametrize("path", EML, ids=lambda p: p.name)
def test_decisions_identical_to_the_beautifulsoup_path(book, path, monkeypatch):
    """Every fixture declared an order confirmation (so the cross-sell finders run on it)."""
    raw = _declared_order(path.read_bytes())
    fast = facts(raw)
    new = book.decide(fast, "camille.durand@example.org", None, T0)
    if fast._lxml_complete and not fast._odd_class_space:
        assert "soup" not in fast.__dict__
    monkeypatch.setattr(MessageFacts, "_lxml_for", lambda self, sel: False)
    slow = facts(raw)
    old = book.decide(slow, "camille.durand@example.org", None, T0)
    assert dataclasses.replace(new, versions={}) == dataclasses.replace(old, versions={})
    finders = book._state.blocks["complementary"].finders
    assert [p.id for p in find_ordered(fast, finders, book.catalog)] == [
        p.id for p in find_ordered(slow, finders, book.catalog)
    ]


def test_order_confirmation_never_builds_a_soup(book, order_raw):
    f = facts(order_raw)
    d = book.decide(f, "camille.durand@example.org", None, T0)
    assert [b.name for b in d.decisions.blocks] == ["complementary"]
    assert "soup" not in f.__dict__ and f.tree is not None
    # golden: the products the shipped finders recognise, in order of appearance
    ordered = find_ordered(f, book._state.blocks["complementary"].finders, book.catalog)
    assert [p.id for p in ordered] == ["BF180", "DR100", "SL075", "CD004", "BO075", "PL140", "MC010", "PV012"]


ODD_HTML = [
    # comments, processing instructions, script/style/template/ruby strings, entities, nbsp
    "<table><tr class='item'><td class='ref'>Réf. <!-- x -->BF180<?pi y?> &amp; "
    "<script>var a='DR100'</script><style>.x{}</style>\xa0fin</td></tr></table>",
    "<div class='ref'><template><span class='ref'>T1</span>tt</template>after"
    "<ruby>漢<rp>(</rp><rt class='ref'>kan</rt><rp>)</rp></ruby></div>",
    "<div class='ref'><rt>a<b class='ref'>in rt</b><rp>p</rp></rt>tail</div>",
    # class and rel with odd whitespace (BeautifulSoup splits on any whitespace)
    "<p class='ref\xa0item'>nbsp</p><p class='ref\x0citem'>ff</p><p class='  ref   item '>sp</p>"
    "<a rel=' nofollow  noopener ' class='x' href='/produits/bf180'>x</a><link rel='a  b'>",
    # broken HTML: unclosed, stray closers, upper case, Outlook tags, duplicate attributes
    "<TABLE><TR CLASS=item><TD class=ref>Réf. SL075<TD>x</TR></td></div><o:p class=ref>o</o:p>"
    "<a HREF='/produits/pl140' href='/other'>dup</a><p data-product-id='MC010' data-product-id='X'>",
    "text before <span class=ref>PV012</span> text after",
    "<span class=ref>only</span>",
    "\n  <table class=ref><tr><td>single element</td></tr></table>\n",
    "<title>t</title><p class=ref>head and body</p>",
    "<!DOCTYPE html><html><head><style>p{}</style></head><body><p class=ref>x</p></body></html>",
    # libxml2 drops what follows </html>, BeautifulSoup keeps it: the BeautifulSoup path answers
    "<html><body><p class=ref>a</p></body></html><div class=ref data-product-id=BF180>after</div>",
    "<p class=ref>a</p></HTML ><img class=ref src='https://t.example/p.gif'>",
    "<p>a<!-- </html> --><b class=ref>b</b>",
    '<p>a<script>x="</html>"</script><b class=ref>b</b>',
    "<iframe><p class=ref>in iframe</p></iframe><textarea><b class=ref>t</b></textarea>",
    # lxml refuses these: the BeautifulSoup fallback answers
    "   \n ",
    '<?xml version="1.0" encoding="utf-8"?><html><body><p class="ref">XMLDECL</p></body></html>',
    "<p class=ref>nul\x00byte</p>",
    "<!-- only a comment -->",
]


@pytest.mark.parametrize("html", ODD_HTML)
def test_odd_html_same_values_as_beautifulsoup(html):
    f = facts(msg("x", html=html))
    soup = _soup_path(f)
    for css in LXML_SELECTORS + SOUPSIEVE_SELECTORS + ["p", "o\\:p", "rt", "b", "span"]:
        assert f.matches(css) == bool(soup.select(css)), css
        for attr in ATTRIBUTES:
            assert f.select_values(css, attr) == soup_values(soup, css, attr), (css, attr)


def test_bad_selector_still_refused_at_load(tmp_path):
    from relay.rules import RuleBook

    root = tmp_path / "rules"
    (root / "blocks").mkdir(parents=True)
    (root / "blocks" / "b.html").write_text("x")
    (root / "r.toml").write_text(
        '[settings]\ndefault_skin = ""\n\n[block.b]\nfind = [\n  { selector = "tr..item" },\n]\n'
    )
    with pytest.raises(RuleError) as e:
        RuleBook.load(root)
    assert e.value.line == 5 and "bad CSS selector" in str(e.value)  # the find = [ line, as before


_TAGS = ["div", "p", "span", "table", "tr", "td", "a", "b", "script", "template", "rt", "rp", "br", "li"]
_TAGS += ["iframe", "textarea", "noscript", "style", "select", "option", "tbody", "html", "body", "o:p"]
_CLASSES = ["item", "ref", "item ref", " ref  item ", "ref\xa0x", "x\x0cref", "", "REF"]
_TEXTS = [
    "",
    " ",
    "Réf. BF180",
    "\xa0",
    "a &amp; b",
    "<!-- c -->",
    "DR100 ",
    "\n\t",
    "<?pi x?>",
    "</td>",
    "&nbsp;x",
]


FUZZ_SELECTORS = ["td", ".ref", "tr.item .ref", "div > p", "a + b", "li:nth-child(odd)", "rt", "body *"]
FUZZ_SELECTORS += ["td:first-child", "b:nth-of-type(2)", "p:only-child", "div:not(.ref) span", "a ~ a"]


@st.composite
def _html(draw, depth=0):
    parts = []
    for _ in range(draw(st.integers(0, 4 if depth < 3 else 0))):
        tag = draw(st.sampled_from(_TAGS))
        attrs = ""
        if draw(st.booleans()):
            attrs += f' class="{draw(st.sampled_from(_CLASSES))}"'
        if draw(st.booleans()):
            attrs += f' href="/produits/{draw(st.sampled_from(["bf180", "x", ""]))}"'
        if draw(st.booleans()):
            attrs += f' data-product-id="{draw(st.sampled_from(["SL075", "", "x y"]))}"'
        inner = draw(st.sampled_from(_TEXTS)) + draw(_html(depth + 1))
        close = draw(st.sampled_from([f"</{tag}>", f"</{tag}>", ""]))  # sometimes left open
        parts.append(f"<{tag}{attrs}>{inner}{close}{draw(st.sampled_from(_TEXTS))}")
    return "".join(parts)


@settings(
    max_examples=int(os.environ.get("SELECTOR_FUZZ", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(_html())
def test_random_html_same_values_as_beautifulsoup(html):
    f = facts(msg("x", html="<html><body>" + html + "</body></html>"))
    soup = _soup_path(f)
    for css in SHIPPED + FUZZ_SELECTORS:
        for attr in (None, "href", "class", "data-product-id"):
            assert f.select_values(css, attr) == soup_values(soup, css, attr), (css, attr)
