"""Each step of the rewrap's hot path against the alternatives it was chosen over (issue 6: "measure each
choice"), on the 30 KB order confirmation, one core: ``python bench/transform_choices.py [--json F]``.

Every row times one implementation of one step on the same input (the fixture's HTML part, the skin
`default`), median of ``--iterations`` calls after warm-up. The chosen implementation is the one
`relay.transform` runs; the others are what a first version would reach for (BeautifulSoup everywhere,
the stdlib's email API, a second parse). Alternatives that need a package the relay does not install
(premailer) are timed when it is importable and listed as "not installed" otherwise.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import json
import os
import quopri
import statistics
import sys
import time
from email import quoprimime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bs4 import BeautifulSoup  # noqa: E402
from lxml import etree  # noqa: E402
from lxml import html as lxml_html  # noqa: E402
from markupsafe import Markup  # noqa: E402

from relay.transform import SkinLibrary, _content, _mime  # noqa: E402
from relay.transform.parse import parse_message  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "order_confirmation_30k.eml"


def timed(fn, iterations: int) -> float:
    for _ in range(max(5, iterations // 10)):
        fn()
    times = []
    for _ in range(iterations):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def _bs_body(html: str, builder: str) -> str:
    soup = BeautifulSoup(html, builder)
    body = soup.body or soup
    return body.decode_contents()


def _lxml_body(html: str) -> str:
    root = lxml_html.document_fromstring(html)
    body = root.find("body")
    node = body if body is not None else root
    return (node.text or "") + "".join(etree.tostring(c, encoding="unicode", method="html") for c in node)


def _stdlib_mime(text: str, html: str) -> bytes:
    msg = EmailMessage()
    msg["Subject"] = "Votre commande"
    msg.set_content(text, cte="quoted-printable")
    msg.add_alternative(html, subtype="html", cte="quoted-printable")
    return msg.as_bytes(policy=email.policy.SMTP)


def measure(iterations: int) -> dict[str, Any]:
    raw = FIXTURE.read_bytes()
    msg = parse_message(raw)
    analysis = _mime.analyse(msg)
    original = _content.part_text(analysis.html)
    body = _content.clean_original_html(original)
    skin = SkinLibrary.load(ROOT / "skins").get("default")
    context = {
        "content": Markup(body), "subject": "Votre commande", "recipient": "claire@example.org",
        "preheader": _content.preheader_of(body), "brand": skin.brand, "headers": {}, "category":
        "transactional", "kind": "order_confirmation", "queue_id": "19A2B3C4D5E6F7A8B9C0",
        "skin": "default", "crosssell": Markup(""), "blocks": [],
    }  # fmt: skip
    final_html = skin.render_html(context)
    text = _content.html_to_text(body)
    eol = b"\r\n"

    steps: list[tuple[str, list[tuple[str, Any, bool]]]] = [
        ("MIME parse of the 28 KB message", [
            ("stdlib compat32, once, the tree shared by rules and rewrap", lambda: parse_message(raw), True),
            ("stdlib compat32 twice (rules, then rewrap)",
             lambda: (parse_message(raw), parse_message(raw)), False),
            ("stdlib policy.default (EmailMessage)",
             lambda: email.message_from_bytes(raw, policy=email.policy.default), False),
        ]),
        ("original HTML -> safe body fragment", [
            ("css-inline (its <style>) + one nh3 pass (extract + sanitise)",
             lambda: _content.clean_original_html(original), True),
            ("BeautifulSoup(lxml) parse + body.decode_contents() (not even sanitised)",
             lambda: _bs_body(original, "lxml"), False),
            ("BeautifulSoup(html.parser) parse + decode_contents() (not sanitised)",
             lambda: _bs_body(original, "html.parser"), False),
            ("lxml.html parse + body serialised (not sanitised)", lambda: _lxml_body(original), False),
        ]),
        ("visible text of the body (text part, preheader)", [
            ("lxml HTMLParser + iterwalk (html_to_text)", lambda: _content.html_to_text(body), True),
            ("BeautifulSoup(lxml) get_text('\\n')",
             lambda: BeautifulSoup(body, "lxml").get_text("\n"), False),
            ("lxml.html text_content() (no block breaks, no link targets)",
             lambda: lxml_html.fragment_fromstring(body, create_parent="div").text_content(), False),
        ]),
        ("skin: render layout.html + inline style.css", [
            ("Jinja2 + css-inline, content substituted after inlining", lambda: skin.render_html(context),
             True),
            ("Jinja2 + css-inline over the whole page, content included",
             lambda: skin.inliner.inline(skin.html.render(context)), False),
            *_premailer_rows(skin, context),
        ]),
        ("quoted-printable, text + HTML parts", [
            ("binascii.b2a_qp (C)",
             lambda: (_mime.qp_encode(text, eol), _mime.qp_encode(final_html, eol)), True),
            ("email.quoprimime.body_encode (pure Python)",
             lambda: (quoprimime.body_encode(text), quoprimime.body_encode(final_html)), False),
            ("quopri.encodestring (the same C encoder; LF endings, a final space unencoded: not wire-ready)",
             lambda: (quopri.encodestring(text.encode()), quopri.encodestring(final_html.encode())), False),
        ]),
        ("MIME output (multipart/alternative, QP)", [
            ("bytes assembled by _mime.write_message",
             lambda: _mime.write_message([b"Subject: Votre commande\r\n"], _mime.qp_encode(text, eol),
                                         _mime.qp_encode(final_html, eol), [], [], eol=eol, seed=b"s"),
             True),  # fmt: skip
            ("stdlib EmailMessage.set_content/add_alternative + as_bytes",
             lambda: _stdlib_mime(text, final_html), False),
        ]),
    ]  # fmt: skip
    out: dict[str, Any] = {"input": str(FIXTURE.relative_to(ROOT)), "bytes": len(raw),
                           "html_chars": len(original), "iterations": iterations, "steps": []}  # fmt: skip
    for step, rows in steps:
        timed_rows = []
        for name, fn, chosen in rows:
            if fn is None:
                timed_rows.append({"impl": name, "ms": None, "chosen": chosen})
                continue
            timed_rows.append({"impl": name, "ms": timed(fn, iterations), "chosen": chosen})
        out["steps"].append({"step": step, "rows": timed_rows})
    return out


def _premailer_rows(skin, context: dict[str, Any]) -> list[tuple[str, Any, bool]]:
    try:
        import logging

        import cssutils
        import premailer
    except ImportError:
        return [("premailer (not installed here)", None, False)]
    from relay.transform.skins import CONTENT_TOKEN

    cssutils.log.setLevel(logging.CRITICAL)  # it reports every property it does not know
    style = f"<style>{skin.css}</style>"

    def render() -> str:  # as the chosen row: the content substituted after inlining
        page = skin.html.render(dict(context, content=Markup(CONTENT_TOKEN)))
        page = page.replace("</head>", style + "</head>", 1)
        inlined = premailer.transform(page, disable_validation=True)
        return inlined.replace(CONTENT_TOKEN, str(context["content"]))

    return [("Jinja2 + premailer (lxml + cssutils), content substituted after inlining", render, False)]


def markdown(res: dict[str, Any]) -> str:
    lines = [
        f"Input: {res['input']} ({res['bytes']:,} bytes; its HTML part {res['html_chars']:,} characters). "
        f"Median of {res['iterations']} calls per row, one core, in one process, one after the other.",
        "",
        "| step | implementation | ms | x chosen |",
        "|---|---|---:|---:|",
    ]
    for step in res["steps"]:
        chosen = next(r["ms"] for r in step["rows"] if r["chosen"])
        for r in step["rows"]:
            ms = "-" if r["ms"] is None else f"{r['ms']:.2f}"
            ratio = "-" if r["ms"] is None else f"{r['ms'] / chosen:.1f}"
            name = f"**{r['impl']}** (chosen)" if r["chosen"] else r["impl"]
            lines.append(f"| {step['step']} | {name} | {ms} | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    try:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    except (AttributeError, OSError):
        pass
    res = measure(a.iterations)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    print(markdown(res))


if __name__ == "__main__":
    main()
