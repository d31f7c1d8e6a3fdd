from __future__ import annotations

import email
import hashlib
import re
from email import policy
from email.message import Message
from pathlib import Path

import pytest

from relay.transform import Decisions, SkinLibrary, transform
from relay.transform._content import html_to_text, normalize_ws

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SKINS = FIXTURES / "skins"


@pytest.fixture(scope="session")
def skins() -> SkinLibrary:
    return SkinLibrary.load(SKINS)


def load(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def run(
    raw: bytes,
    skins: SkinLibrary,
    *,
    skin: str | None = "plain",
    mail_from: str | None = "shop@example.com",
    queue_id: str = "Q-0001",
    **kw,
):
    decisions = kw.pop("decisions", None) or Decisions(skin=skin)
    return transform(
        raw,
        recipient="camille.durand@example.org",
        queue_id=queue_id,
        decisions=decisions,
        skins=skins,
        mail_from=mail_from,
        **kw,
    )


def parse(data: bytes) -> Message:
    return email.message_from_bytes(data, policy=policy.default)


def is_attachment_like(part: Message) -> bool:
    if part.is_multipart() or part.get_content_type() == "message/rfc822":
        return False
    if part.get_content_type() in ("text/plain", "text/html"):
        return part.get_content_disposition() == "attachment" or bool(part.get_filename())
    return True


def attachments(msg: Message) -> list[tuple[str, str | None, str]]:
    """(content type, filename, sha256 of the decoded bytes) of every non-body leaf, sorted."""
    out = []
    for part in msg.walk():
        if is_attachment_like(part):
            data = part.get_payload(decode=True) or b""
            out.append((part.get_content_type(), part.get_filename(), hashlib.sha256(data).hexdigest()))
    return sorted(out, key=lambda t: (t[0], t[1] or "", t[2]))


def html_part(msg: Message) -> str:
    for part in msg.walk():
        if part.get_content_type() == "text/html" and not is_attachment_like(part):
            return part.get_content()
    raise AssertionError("no text/html part")


def text_part(msg: Message) -> str:
    for part in msg.walk():
        if part.get_content_type() == "text/plain" and not is_attachment_like(part):
            return part.get_content()
    raise AssertionError("no text/plain part")


def visible(html: str) -> str:
    return normalize_ws(html_to_text(html, fragment=False, links=False))


def header_count(raw: bytes, name: str) -> int:
    head = re.split(rb"\r?\n\r?\n", raw, maxsplit=1)[0]
    return len(re.findall(rb"(?im)^" + re.escape(name.encode()) + rb"[ \t]*:", head))


def assert_safe(html: str) -> None:
    low = html.lower()
    assert "<script" not in low
    assert "javascript:" not in low
    assert "vbscript:" not in low
    assert re.search(r"<[^>]+\son[a-z]+\s*=", low) is None, "event handler attribute left"
    assert "<form" not in low and "<iframe" not in low
    assert "expression(" not in low
