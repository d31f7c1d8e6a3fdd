"""AUTH PLAIN/LOGIN against the users of the config, with scrypt password hashes (stdlib hashlib).

Hash format: ``scrypt$N$r$p$<salt b64>$<key b64>``. Verification costs ~50 ms on purpose; a verified
(user, password) pair is remembered by an HMAC of it so a tool that authenticates on every connection
does not cost the event loop 50 ms each time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets

from aiosmtpd.smtp import AuthResult, LoginPassword

from relay.config import SmtpSettings, UserSettings
from relay.intake import replies

log = logging.getLogger(__name__)

N, R, P = 2**14, 8, 1


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=N, r=R, p=P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${N}${R}${P}${b64(salt).decode()}${b64(key).decode()}"


def verify_password(password: bytes, encoded: str) -> bool:
    try:
        _, n, r, p, salt, key = encoded.split("$")
        expected = base64.b64decode(key)
        got = hashlib.scrypt(password, salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(expected), maxmem=256 * 1024 * 1024)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


class Authenticator:
    """aiosmtpd ``authenticator``: only PLAIN and LOGIN, only under TLS (aiosmtpd enforces the TLS part)."""

    def __init__(self, settings: SmtpSettings):
        self.users = {u.name: u for u in settings.users}
        self._pepper = secrets.token_bytes(32)
        self._verified: set[bytes] = set()

    def __call__(self, server, session, envelope, mechanism: str, auth_data) -> AuthResult:
        fail = AuthResult(success=False, handled=False, message=replies.AUTH_FAILED)
        if mechanism not in ("PLAIN", "LOGIN") or not isinstance(auth_data, LoginPassword):
            return fail
        name = auth_data.login.decode("utf-8", "replace")
        user = self.users.get(name)
        if user is None:
            verify_password(auth_data.password, _DUMMY)  # same cost whether the user exists or not
            log.warning("AUTH failed for unknown user %r from %s", name, session.peer)
            return fail
        token = hmac.new(self._pepper, auth_data.login + b"\0" + auth_data.password, "sha256").digest()
        if token not in self._verified:
            if not verify_password(auth_data.password, user.password_hash):
                log.warning("AUTH failed for %r from %s", name, session.peer)
                return fail
            self._verified.add(token)
        return AuthResult(success=True, auth_data=user)


def user_of(session) -> UserSettings | None:
    data = getattr(session, "auth_data", None)
    return data if session.authenticated and isinstance(data, UserSettings) else None


_DUMMY = hash_password(secrets.token_hex(8))
