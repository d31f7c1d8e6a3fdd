"""Signed, expiring unsubscribe tokens (HMAC-SHA256) and the List-Unsubscribe header values."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path
from urllib.parse import quote

DEFAULT_LIFETIME = 90 * 86400.0  # RFC 8058 links must keep working for a while after sending


class BadToken(ValueError):
    """A token that is malformed, forged or expired."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, address: str, expires: int) -> str:
    return _b64(hmac.new(secret, f"unsubscribe\n{address}\n{expires}".encode(), hashlib.sha256).digest())


def make_token(secret: bytes, address: str, now: float, lifetime: float = DEFAULT_LIFETIME) -> str:
    """``ADDRESS_B64.EXPIRES.MAC``: the address (lower-cased), the expiry (epoch seconds), the HMAC."""
    if not secret:
        raise ValueError("unsubscribe secret is empty")
    address = address.strip().lower()
    expires = int(now + lifetime)
    return f"{_b64(address.encode())}.{expires}.{_mac(secret, address, expires)}"


def verify_token(secret: bytes, token: str, now: float) -> str:
    """The address a token stands for; raises BadToken when malformed, forged or expired."""
    try:
        a, e, mac = token.strip().split(".")
        address = _unb64(a).decode("utf-8")
        expires = int(e)
    except (ValueError, UnicodeDecodeError):
        raise BadToken("malformed token") from None
    if not hmac.compare_digest(mac, _mac(secret, address, expires)):
        raise BadToken("bad signature")
    if now > expires:
        raise BadToken("expired")
    return address


def unsubscribe_url(public_url: str, token: str) -> str:
    """``{public_url}/unsubscribe?t=TOKEN`` (public_url: the relay's http listener as seen from outside)."""
    return f"{public_url.rstrip('/')}/unsubscribe?t={quote(token, safe='')}"


def list_unsubscribe_headers(
    secret: bytes,
    public_url: str,
    address: str,
    now: float,
    *,
    mailto: str | None = None,
    lifetime: float = DEFAULT_LIFETIME,
) -> list[tuple[str, str]]:
    """List-Unsubscribe (https first, then mailto) and List-Unsubscribe-Post (RFC 8058)."""
    token = make_token(secret, address, now, lifetime)
    parts = [f"<{unsubscribe_url(public_url, token)}>"]
    if mailto:
        parts.append(f"<mailto:{mailto}?subject=unsubscribe%20{quote(token, safe='')}>")
    return [("List-Unsubscribe", ", ".join(parts)), ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click")]


def load_or_create_secret(path: Path | str) -> bytes:
    """The secret in ``path`` (created with 32 random bytes, mode 0600, when missing)."""
    path = Path(path)
    try:
        data = path.read_bytes().strip()
        if data:
            return data
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_hex(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(value + b"\n")
    return value
