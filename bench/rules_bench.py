"""RuleBook.decide() timing with the shipped rules: p50/p99 per message kind, one core, no ledger.

    .venv/bin/python bench/rules_bench.py [--runs 500]

Each run builds fresh MessageFacts (as the worker does once per message) and decides for one recipient,
so the lazy MIME parse, HTML parse and selectors are paid every time, as for a new message.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from relay.rules import MessageFacts, RuleBook  # noqa: E402

T0 = 1_790_000_000.0


def _msg(subject: str, headers: str, text: str, html: str) -> bytes:
    return (
        "From: Maison Lumiere <bonjour@maison-lumiere.example>\r\nTo: claire@example.org\r\n"
        f"Subject: {subject}\r\n{headers}Message-ID: <b1@maison-lumiere.example>\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/alternative; boundary="b1"\r\n\r\n--b1\r\n'
        "Content-Type: text/plain; charset=utf-8\r\n\r\n" + text + "\r\n--b1\r\n"
        "Content-Type: text/html; charset=utf-8\r\n\r\n" + html + "\r\n--b1--\r\n"
    ).encode()


PASSWORD_RESET = _msg(
    "Réinitialisation de votre mot de passe",
    "",
    "Bonjour,\r\nPour choisir un nouveau mot de passe : https://www.maison-lumiere.example/reset?t=abc\r\n",
    "<html><body><p>Bonjour,</p><p><a href='https://www.maison-lumiere.example/reset?t=abc'>"
    "Choisir un nouveau mot de passe</a></p></body></html>",
)
NEWSLETTER = _msg(
    "Les nouveautés d'automne",
    "List-Id: Nouveautes <news.maison-lumiere.example>\r\nPrecedence: bulk\r\n",
    "Nos nouveautés d'automne.\r\n" * 40,
    "<html><body>"
    + "".join(
        f"<table><tr><td><h2>Produit {i}</h2><p>Une belle nouveauté.</p></td></tr></table>" for i in range(60)
    )
    + "</body></html>",
)


def bench(book: RuleBook, raw: bytes, source: str, runs: int) -> tuple[float, float]:
    def once() -> None:
        f = MessageFacts.from_raw(raw, source=source, mail_from="commandes@maison-lumiere.example")
        book.decide(f, "camille.durand@example.org", None, T0)

    for _ in range(30):
        once()
    times = []
    gc.collect()
    for _ in range(runs):
        t = time.perf_counter()
        once()
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=500)
    args = ap.parse_args()
    book = RuleBook.load(
        ROOT / "rules", secret=b"bench-secret-0123456789", public_url="https://relay.example"
    )
    order = (ROOT / "tests" / "fixtures" / "order_confirmation_30k.eml").read_bytes()
    cases = [
        ("order confirmation 30 KB (cross-sell)", order, "10.0.3.21"),
        ("password reset", PASSWORD_RESET, "10.0.3.21"),
        ("newsletter", NEWSLETTER, "10.0.3.21"),
    ]
    print(f"RuleBook.decide(), shipped rules, {args.runs} runs after warm-up (ms)")
    for name, raw, source in cases:
        p50, p99 = bench(book, raw, source, args.runs)
        print(f"  {name:<40} p50 {p50:6.3f}  p99 {p99:6.3f}")


if __name__ == "__main__":
    main()
