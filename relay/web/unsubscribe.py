"""The unsubscribe endpoint (RFC 8058 one-click and a confirmation page), as a WSGI application.

Routes (mount under the http listener; ``prefix`` defaults to "/unsubscribe"):
  GET  /unsubscribe?t=TOKEN   a small page naming the address, with a button that POSTs the form below
  POST /unsubscribe?t=TOKEN   body "List-Unsubscribe=One-Click" (mail clients) or the page's form:
                              records the suppression (and cancels pending follow-ups); 200 page
A bad or expired token: 400 with a short page, nothing recorded. Nothing here needs a cookie or JavaScript.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from html import escape
from typing import Any
from urllib.parse import parse_qs

from relay.rules.tokens import BadToken, verify_token

log = logging.getLogger(__name__)

MAX_BODY = 4096

_PAGE = """<!DOCTYPE html>
<html lang="{lang}"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex"><title>{title}</title>
<style>body{{font-family:-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;
background:#f4ede3;color:#3a2e28;margin:0;padding:48px 16px}}
main{{max-width:480px;margin:0 auto;background:#fffcf7;padding:32px;border-radius:6px}}
button{{font-size:16px;padding:12px 20px;border:0;border-radius:4px;background:#9c5a3c;color:#fff;
cursor:pointer}}
</style></head><body><main><h1>{title}</h1>{body}</main></body></html>"""

TEXTS = {
    "fr": {
        "confirm_title": "Se désinscrire",
        "confirm": "<p>Ne plus recevoir nos e-mails promotionnels à l’adresse "
        "<strong>{address}</strong>&nbsp;?</p>"
        "<p>Vous continuerez à recevoir les e-mails liés à vos commandes.</p>",
        "button": "Me désinscrire",
        "done_title": "Désinscription confirmée",
        "done": "<p><strong>{address}</strong> ne recevra plus nos e-mails promotionnels.</p>",
        "bad_title": "Lien invalide",
        "bad": "<p>Ce lien de désinscription est invalide ou a expiré. Utilisez le lien d’un e-mail récent, "
        "ou répondez à l’un de nos e-mails.</p>",
    },
    "en": {
        "confirm_title": "Unsubscribe",
        "confirm": "<p>Stop receiving marketing e-mail at <strong>{address}</strong>?</p>"
        "<p>You will still receive e-mail about your orders.</p>",
        "button": "Unsubscribe",
        "done_title": "You are unsubscribed",
        "done": "<p><strong>{address}</strong> will no longer receive marketing e-mail.</p>",
        "bad_title": "Invalid link",
        "bad": "<p>This unsubscribe link is invalid or has expired.</p>",
    },
}


class UnsubscribeApp:
    """WSGI app. ``ledger``: relay.store.ledger.Ledger; ``secret``: the token HMAC key; ``clock``: injectable;
    ``on_unsubscribe(address)``: optional hook (metrics, timeline event)."""

    def __init__(
        self,
        ledger: Any,
        secret: bytes,
        *,
        clock: Callable[[], float] = time.time,
        prefix: str = "/unsubscribe",
        language: str = "fr",
        on_unsubscribe: Callable[[str], None] | None = None,
    ) -> None:
        self.ledger = ledger
        self.secret = secret
        self.clock = clock
        self.prefix = prefix.rstrip("/")
        self.texts = TEXTS.get(language, TEXTS["en"])
        self.lang = language if language in TEXTS else "en"
        self.on_unsubscribe = on_unsubscribe

    def matches(self, path: str) -> bool:
        return path.rstrip("/") == self.prefix

    def _page(self, start_response, status: str, title_key: str, body: str):  # noqa: ANN001, ANN202
        html = _PAGE.format(lang=self.lang, title=escape(self.texts[title_key]), body=body).encode()
        start_response(
            status,
            [
                ("Content-Type", "text/html; charset=utf-8"),
                ("Content-Length", str(len(html))),
                ("Cache-Control", "no-store"),
                ("X-Robots-Tag", "noindex"),
                ("Referrer-Policy", "no-referrer"),
                (
                    "Content-Security-Policy",
                    "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
                ),
            ],
        )
        return [html]

    def __call__(self, environ: dict, start_response):  # noqa: ANN204
        method = environ.get("REQUEST_METHOD", "GET").upper()
        if not self.matches(environ.get("PATH_INFO", "")):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        query = parse_qs(environ.get("QUERY_STRING", ""))
        form: dict[str, list[str]] = {}
        if method == "POST":
            try:
                length = min(int(environ.get("CONTENT_LENGTH") or 0), MAX_BODY)
            except ValueError:
                length = 0
            body = environ["wsgi.input"].read(length) if length > 0 else b""
            form = parse_qs(body.decode("utf-8", "replace"))
        elif method not in ("GET", "HEAD"):
            start_response(
                "405 Method Not Allowed", [("Allow", "GET, HEAD, POST"), ("Content-Type", "text/plain")]
            )
            return [b"method not allowed\n"]
        token = (query.get("t") or form.get("t") or [""])[0]
        try:
            address = verify_token(self.secret, token, self.clock())
        except BadToken as e:
            log.info("unsubscribe: refused token (%s)", e)
            return self._page(start_response, "400 Bad Request", "bad_title", self.texts["bad"])
        shown = escape(address)
        if method in ("GET", "HEAD"):
            action = escape(f"{self.prefix}?t={token}", quote=True)
            body = (
                self.texts["confirm"].format(address=shown)
                + f'<form method="post" action="{action}">'
                + '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
                + f'<button type="submit">{escape(self.texts["button"])}</button></form>'
            )
            return self._page(start_response, "200 OK", "confirm_title", body)
        one_click = form.get("List-Unsubscribe") == ["One-Click"]
        self.ledger.add_suppression(
            address, reason="one-click" if one_click else "unsubscribe-page", source="http", now=self.clock()
        )
        log.info("unsubscribe: %s (%s)", address, "one-click" if one_click else "page")
        if self.on_unsubscribe:
            try:
                self.on_unsubscribe(address)
            except Exception:  # noqa: BLE001 - the unsubscription is recorded; a hook must not undo the 200
                log.exception("unsubscribe hook failed")
        return self._page(start_response, "200 OK", "done_title", self.texts["done"].format(address=shown))


def make_app(ledger: Any, secret: bytes, **kw: Any) -> UnsubscribeApp:
    return UnsubscribeApp(ledger, secret, **kw)
