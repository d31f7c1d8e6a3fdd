"""Every fixture (broken MIME, odd charsets, S/MIME ...) and arbitrary bytes: decide() never raises."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.rules import MessageFacts, RuleBook

from .conftest import FIXTURES, T0, facts

ALL = sorted(p for p in FIXTURES.glob("*.eml"))


@pytest.fixture(scope="module")
def greedy(tmp_path_factory):
    """Rules that look at everything: body regex, CSS selectors, every header."""
    root = tmp_path_factory.mktemp("greedy")
    (root / "r.toml").write_text(
        """
[[rule]]
name = "body"
kind = "body"
[rule.match]
body = 'merci|thank'
[[rule]]
name = "html"
category = "marketing"
[rule.match]
html = ["a[href]", "img[src$='.jpg']"]
[[rule]]
name = "hdr"
skin = ""
[rule.match]
header = { "content-type" = "multipart", "from" = "@" }
"""
    )
    return RuleBook.load(root)


@pytest.mark.parametrize("path", ALL, ids=[p.name for p in ALL])
def test_every_fixture(book, greedy, path):
    raw = path.read_bytes()
    for b in (book, greedy):
        d = b.decide(facts(raw), "claire@example.org", None, T0)
        assert d.decisions.category
        for name, value in d.decisions.set_headers:
            assert "\n" not in value and "\r" not in value and name


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400) | st.text(max_size=400).map(lambda s: s.encode("utf-8", "surrogatepass")))
def test_arbitrary_bytes(book, greedy, data):
    for b in (book, greedy):
        f = MessageFacts.from_raw(data, source="127.0.0.1", mail_from="")
        b.decide(f, "x@example.org", None, T0)
