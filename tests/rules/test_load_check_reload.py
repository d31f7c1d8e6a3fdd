"""Loading, file:line errors, `relay check`, catalog formats and hot reload."""

from __future__ import annotations

import os
import shutil

import pytest

from relay.rules import Catalog, RuleBook, RuleError, check

from .conftest import RULES, SKINS, T0, facts, msg


def _bump(path):
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def test_shipped_rules_catalog_and_skins_check_clean():
    assert check(RULES, SKINS) == []
    book = RuleBook.load(RULES)
    assert len(book.catalog) >= 20
    assert book.rule_names()[:4] == ["newsletter", "password-reset", "shipping", "order-confirmation"]


def test_toml_syntax_error_has_file_and_line(rules_copy):
    f = rules_copy / "10-classify.toml"
    lines = f.read_text().splitlines()
    lines.insert(6, 'kind = "oops')  # line 7
    f.write_text("\n".join(lines))
    with pytest.raises(RuleError) as e:
        RuleBook.load(rules_copy)
    assert e.value.file.endswith("10-classify.toml") and e.value.line == 7
    assert check(rules_copy)[0].startswith(f"{f}:7: TOML")


@pytest.mark.parametrize(
    "snippet,key,message",
    [
        ('blocks = ["nope"]', "blocks", "no [block.nope]"),
        ("subject = '(unclosed'", "subject", "bad regular expression"),
        ('colour = "red"', "colour", "unknown key"),
        ("canary = 150", "canary", "canary"),
        ('html = "a[[["', "html", "bad CSS selector"),
        ('sender = "ghost"', "sender", "no [sender.ghost]"),
    ],
)
def test_semantic_errors_point_at_the_rule_line(tmp_path, snippet, key, message):
    root = tmp_path / "r"
    root.mkdir()
    in_match = key in ("subject", "html")
    text = (
        '# comment\n\n[[rule]]\nname = "ok"\nkind = "a"\n\n[[rule]]\nname = "bad"\n'
        + ("[rule.match]\n" if in_match else "")
        + snippet
        + "\n"
    )
    (root / "r.toml").write_text(text)
    with pytest.raises(RuleError) as e:
        RuleBook.load(root)
    assert message in e.value.message
    expected = text.splitlines().index(snippet) + 1
    assert (e.value.file, e.value.line) == (str(root / "r.toml"), expected)


def test_block_template_syntax_error_points_at_template(rules_copy):
    (rules_copy / "blocks" / "complementary.html").write_text(
        "<p>\n{% for p in products %}\n<b>{{ p.title }</b>\n"
    )
    with pytest.raises(RuleError) as e:
        RuleBook.load(rules_copy)
    assert e.value.file.endswith("complementary.html") and e.value.line == 3


def test_check_reports_missing_skin_and_bad_catalog(rules_copy, tmp_path):
    f = rules_copy / "10-classify.toml"
    f.write_text(f.read_text().replace('name = "shipping"', 'name = "shipping"\nskin = "ghost"'))
    errs = check(rules_copy, SKINS)
    assert len(errs) == 1 and "skin 'ghost' not found" in errs[0] and errs[0].startswith(str(f))
    (rules_copy / "catalog.xml").write_text("<rss><channel><item><g:id>1</item></channel></rss>")
    errs = check(rules_copy, SKINS)
    assert errs and errs[0].startswith(str(rules_copy / "catalog.xml") + ":1: XML")
    assert check(tmp_path / "missing")[0].endswith("rules directory not found")


ATOM = """<?xml version="1.0"?>
<feed xmlns="http://www.w3.org/2005/Atom" xmlns:g="http://base.google.com/ns/1.0">
<title>x</title>
<entry><g:id>L1</g:id><title>Lampe en lin</title><link href="https://shop.example/p/l1"/>
<g:price>45.00 EUR</g:price><g:availability>in stock</g:availability>
<g:product_type>Luminaires</g:product_type>
<g:item_group_id>L</g:item_group_id><g:custom_label_0>A1</g:custom_label_0></entry>
<entry><g:id>A1</g:id><title>Abat-jour</title><link href="https://shop.example/p/a1"/>
<g:price>1234.5 EUR</g:price><g:availability>out_of_stock</g:availability>
<g:custom_label_1>featured</g:custom_label_1></entry>
</feed>"""


def test_atom_and_csv_feeds(tmp_path):
    (tmp_path / "f.xml").write_text(ATOM)
    cat = Catalog.load(tmp_path / "f.xml")
    l1 = cat.get("L1")
    assert (l1.link, l1.related, l1.in_stock, l1.item_group_id) == (
        "https://shop.example/p/l1",
        ("A1",),
        True,
        "L",
    )
    assert cat.get("A1").price_display == "1\u202f234,50\u00a0€" and not cat.get("A1").in_stock
    assert [p.id for p in cat.recognise("https://www.shop.example/p/l1?utm=x")] == ["L1"]
    assert [p.id for p in cat.recognise("L")] == ["L1"] and [p.id for p in cat.recognise("abat-jour")] == [
        "A1"
    ]
    assert [p.id for p in cat.featured()] == ["A1"]
    (tmp_path / "f.csv").write_text(
        "id;title;price;availability;related;featured\nX;Vase;12 EUR;in_stock;Y;\n"
        "Y;Fleurs séchées;9.90 EUR;in_stock;;yes\n",
        encoding="utf-8",
    )
    cat = Catalog.load(tmp_path / "f.csv")
    assert (
        cat.get("X").related == ("Y",)
        and cat.get("Y").featured
        and cat.get("X").price_display == "12,00\u00a0€"
    )
    (tmp_path / "bad.csv").write_text("id,title\nX,\n")
    with pytest.raises(RuleError) as e:
        Catalog.load(tmp_path / "bad.csv")
    assert e.value.line == 2


def test_out_of_stock_and_relations_from_rules(book):
    dr = book.catalog.get("DR240")
    assert not dr.in_stock
    assert book.catalog.get("TB030").related[:2] == ("NT045", "SV045")  # [catalog.relations]


def test_hot_reload_good_then_broken_edit(rules_copy, order_raw):
    seen = []
    book = RuleBook.load(rules_copy, on_error=seen.append)
    v1 = book.version
    assert book.reload_if_changed() is False  # nothing changed
    f = rules_copy / "10-classify.toml"
    f.write_text(f.read_text().replace('kind = "shipping"', 'kind = "expedition"'))
    _bump(f)
    assert book.reload_if_changed() is True and book.version != v1
    assert book.decide(facts(msg("Votre colis")), "c@example.org", None, T0).decisions.kind == "expedition"
    v2 = book.version
    good = f.read_text()
    f.write_text(good + '\n[[rule]]\nname = "broken"\nblocks = ["missing"]\n')
    _bump(f)
    assert book.reload_if_changed() is False
    assert (
        book.version == v2 and seen and seen[0].file == str(f) and seen[0].line == good.count("\n") + 4
    )  # the blocks = line
    assert book.errors and str(book.errors[0]).startswith(f"{f}:")
    assert book.reload_if_changed() is False and len(seen) == 1  # reported once
    assert book.decide(facts(msg("Votre colis")), "c@example.org", None, T0).decisions.kind == "expedition"
    f.write_text(good)
    _bump(f)
    assert book.reload_if_changed() is True and book.errors == []


def test_catalog_reloaded_when_the_file_changes(rules_copy, order_raw):
    book = RuleBook.load(rules_copy)
    before = book.decide(facts(order_raw), "c@example.org", None, T0).products_offered
    cat = rules_copy / "catalog.xml"
    text = cat.read_text()
    for pid in before:  # take the offered products out of stock
        i = text.index(f"<g:id>{pid}</g:id>")
        j = text.index("<g:availability>in_stock", i)
        text = text[:j] + "<g:availability>out_of_stock" + text[j + len("<g:availability>in_stock") :]
    cat.write_text(text)
    _bump(cat)
    assert book.reload_if_changed() is True
    after = book.decide(facts(order_raw), "c@example.org", None, T0).products_offered
    assert after and not set(after) & set(before)


def test_catalog_outside_rules_dir_is_watched(tmp_path, rules_copy):
    outside = tmp_path / "feed.xml"
    shutil.copy(rules_copy / "catalog.xml", outside)
    book = RuleBook.load(rules_copy, catalog=outside)
    v = book.catalog.version
    outside.write_text(outside.read_text().replace("Maison Lumière – catalogue", "Catalogue"))
    _bump(outside)
    assert book.reload_if_changed() is True and book.catalog.version != v


def test_readme_examples_load(tmp_path):
    import re

    text = (RULES / "README.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, re.S)
    rule = next(b for b in blocks if b.startswith("[[rule]]"))
    settings = next(b for b in blocks if b.startswith("[settings]"))
    extra = [b for b in blocks if b.startswith(("[block.", "[followup."))]
    root = tmp_path / "r"
    shutil.copytree(RULES, root)
    for f in root.glob("*.toml"):
        f.unlink()
    (root / "00.toml").write_text(settings)
    (root / "10.toml").write_text(rule)
    (root / "20.toml").write_text("\n".join(extra))
    book = RuleBook.load(root)
    assert book.rule_names() == ["order-confirmation"] and book.caps["marketing_per_week"] == 3
