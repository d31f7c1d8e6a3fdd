from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from relay.rules import MessageFacts, RuleBook
from relay.store.database import make_engine, migrate
from relay.store.ledger import Ledger

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "rules"
SKINS = ROOT / "skins"
FIXTURES = ROOT / "tests" / "fixtures"
SECRET = b"test-secret-0123456789abcdef"
PUBLIC = "https://relay.maison-lumiere.example"
T0 = 1_790_000_000.0  # the injectable clock's start


def msg(
    subject: str = "Bonjour",
    *,
    headers: str = "",
    body: str = "Bonjour,\r\nMerci.\r\n",
    html: str | None = None,
    frm: str = "Boutique <shop@maison-lumiere.example>",
) -> bytes:
    head = (
        f"From: {frm}\r\nTo: claire@example.org\r\nSubject: {subject}\r\n{headers}"
        "Message-ID: <x1@maison-lumiere.example>\r\nMIME-Version: 1.0\r\n"
    )
    if html is None:
        return (head + "Content-Type: text/plain; charset=utf-8\r\n\r\n" + body).encode()
    return (
        head + 'Content-Type: multipart/alternative; boundary="b1"\r\n\r\n--b1\r\n'
        "Content-Type: text/plain; charset=utf-8\r\n\r\n" + body + "\r\n--b1\r\n"
        "Content-Type: text/html; charset=utf-8\r\n\r\n" + html + "\r\n--b1--\r\n"
    ).encode()


def facts(
    raw: bytes, source: str = "10.0.3.21", mail_from: str = "shop@maison-lumiere.example"
) -> MessageFacts:
    return MessageFacts.from_raw(raw, source=source, mail_from=mail_from)


@pytest.fixture(scope="session")
def book() -> RuleBook:
    return RuleBook.load(RULES, secret=SECRET, public_url=PUBLIC)


@pytest.fixture
def rules_copy(tmp_path) -> Path:
    dst = tmp_path / "rules"
    shutil.copytree(RULES, dst)
    return dst


@pytest.fixture
def ledger(db_url) -> Ledger:
    engine = make_engine(db_url)
    migrate(engine)
    yield Ledger(engine)
    engine.dispose()


@pytest.fixture
def order_raw() -> bytes:
    return (FIXTURES / "order_confirmation_30k.eml").read_bytes()
