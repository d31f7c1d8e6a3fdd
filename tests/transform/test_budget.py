"""Size budget: lowest-priority blocks dropped first; still over -> flagged."""

from __future__ import annotations

from relay.transform import Block, Decisions

from .conftest import html_part, load, parse, run


def _block(name, priority, size=3000):
    return Block(name, f"<p>{name}</p>" + "<span>x</span>" * (size // 14), priority)


def test_blocks_within_budget_all_kept(skins):
    blocks = (_block("a", 1), _block("b", 2))
    out, report = run(load("latin1_text_qp.eml"), skins, decisions=Decisions(skin="plain", blocks=blocks))
    assert report.blocks == ["a", "b"] and report.dropped_blocks == [] and not report.over_budget
    html = html_part(parse(out))
    assert html.index('data-relay-block="a"') < html.index('data-relay-block="b"')


def test_lowest_priority_dropped_first(skins):
    raw = load("latin1_text_qp.eml")
    base = run(raw, skins)[1].html_bytes
    blocks = (_block("low", 1), _block("high", 9), _block("mid", 5), _block("lowest", 0))
    out, report = run(raw, skins, decisions=Decisions(skin="plain", blocks=blocks), html_budget=base + 6500)
    assert report.blocks == ["high", "mid"]
    assert report.dropped_blocks == ["lowest", "low"]
    assert not report.over_budget and report.html_bytes <= base + 6500
    html = html_part(parse(out))
    assert 'data-relay-block="high"' in html and 'data-relay-block="low"' not in html


def test_still_over_budget_flagged(skins):
    raw = load("order_confirmation_30k.eml")
    out, report = run(
        raw, skins, decisions=Decisions(skin="plain", blocks=(_block("a", 1),)), html_budget=10_000
    )
    assert report.dropped_blocks == ["a"] and report.blocks == []
    assert report.over_budget and report.html_bytes > 10_000
    assert report.action == "rewrapped"
