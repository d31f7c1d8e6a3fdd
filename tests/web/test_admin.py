"""The admin console over real HTTP: a relay delivering to an aiosmtpd sink, the console on its own
loopback listener over the relay's store (SQLite and PostgreSQL), pages fetched with urllib."""

from __future__ import annotations

import base64
import io
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.app import free_port
from relay.intake.auth import hash_password
from relay.web.admin import PREVIEW_CSP, AdminApp
from relay.web.http import HttpApp, HttpServer
from tests.conftest import (
    FIXTURES,
    PG_ADMIN,
    PgDatabase,
    RelayThread,
    Sink,
    _pg_available,
    make_settings,
    message,
)

ROOT = Path(__file__).resolve().parents[2]
EVIL = "<script>alert(1)</script> Soldes d'hiver"


@dataclass
class Console:
    relay: RelayThread
    base: str
    app: AdminApp

    def get(self, path: str, headers: dict | None = None):
        req = urllib.request.Request(self.base + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    def qid(self, address: str, subject_part: str) -> str:
        return next(e["queue_id"] for e in self.relay.store.history(address) if subject_part in e["subject"])


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def console(request, tmp_path_factory):
    """One relay per database for the whole module: the console is read-only, the tests share it."""
    tmp = tmp_path_factory.mktemp("admin")
    db = None
    if request.param == "sqlite":
        url = f"sqlite:///{tmp}/relay.db"
    else:
        if not _pg_available():
            if os.environ.get("CI") == "true":
                pytest.fail(f"PostgreSQL not reachable at {PG_ADMIN}")
            pytest.skip("PostgreSQL not reachable")
        db = PgDatabase()
        url = db.url
    sink = Sink().start()
    settings = make_settings(
        tmp, url, sink.port, paths={"skins": str(ROOT / "skins")}, rewrap={"default_skin": "boutique"}
    )
    relay = RelayThread(settings).start()
    server = None
    try:
        with relay.smtp() as c:
            first = message(subject="Votre commande n°1042")
            c.sendmail("shop@boutique.example", ["claire@example.org"], first)
            c.sendmail("shop@boutique.example", ["Claire@Example.org"], message(subject=EVIL))
            c.sendmail(
                "commandes@maison-lumiere.example",
                ["camille@example.org", "reject-me@example.org"],
                (FIXTURES / "order_confirmation_30k.eml").read_bytes(),
            )
        relay.wait_for(lambda: relay.statuses("claire@example.org") == ["sent", "sent"], what="claire sent")
        relay.wait_for(lambda: relay.statuses("camille@example.org") == ["sent"], what="camille sent")
        relay.wait_for(lambda: relay.statuses("reject-me@example.org") == ["failed"], what="rejected")
        admin = AdminApp(relay.store, settings)
        http = HttpApp(relay.store.depth, lambda: None)

        def mounted(environ, start_response):  # what HttpApp will do once the lead mounts the console
            if admin.matches(environ.get("PATH_INFO", "")):
                return admin(environ, start_response)
            return http(environ, start_response)

        server = HttpServer("127.0.0.1", free_port(), mounted)
        server.start()
        yield Console(relay, f"http://127.0.0.1:{server.port}", admin)
    finally:
        if server:
            server.stop()
        relay.stop()
        sink.stop()
        if db:
            db.drop()


def _security_headers(headers, frame: str = "DENY") -> None:
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Cache-Control"] == "no-store"
    assert headers["X-Frame-Options"] == frame


def test_overview_shows_depth_counts_and_escaped_subjects(console):
    status, headers, body = console.get("/admin")
    assert status == 200
    _security_headers(headers)
    assert "script-src" not in headers["Content-Security-Policy"]
    assert headers["Content-Security-Policy"].startswith("default-src 'none'")
    page = body.decode()
    assert "Votre commande n°1042" in page
    assert "Confirmation de votre commande n° 10452" in page  # RFC 2047 subject, decoded at intake
    assert "&lt;script&gt;alert(1)&lt;/script&gt; Soldes d&#39;hiver" in page
    assert "<script" not in page.lower()
    assert re.search(r'<div class="n">3</div>\s*<div class="l"><span class="badge s-sent">sent', page)
    assert 'name="address"' in page and 'action="/admin/timeline"' in page
    assert "loopback only" in page  # the footer says how access is granted
    # the console shares the listener: /metrics still answers
    assert console.get("/metrics")[0] == 200
    assert console.get("/admin/")[0] == 200


def test_timeline_is_newest_first_with_reply_skin_and_events(console):
    status, headers, body = console.get("/admin/timeline?address=CLAIRE%40example.org")
    assert status == 200
    _security_headers(headers)
    page = body.decode()
    newest, oldest = page.index("&lt;script&gt;alert(1)"), page.index("Votre commande n°1042")
    assert newest < oldest
    assert "<script" not in page.lower()
    assert "Timeline of CLAIRE@example.org" in page
    assert "2 messages" in page
    assert "250 2.0.0 Ok: stored" in page and "boutique" in page
    assert page.count("<strong>received</strong>") == 2 and page.count("<strong>sent</strong>") == 2
    empty = console.get("/admin/timeline?address=nobody@example.org")[2].decode()
    assert "No message for this address" in empty
    assert console.get("/admin/timeline")[0] == 400


def test_message_detail_shows_envelope_headers_recipients_and_report(console):
    qid = console.qid("camille@example.org", "10452")
    status, headers, body = console.get(f"/admin/message/{qid}")
    assert status == 200
    _security_headers(headers)
    page = body.decode()
    assert "commandes@maison-lumiere.example" in page  # envelope sender
    assert "Maison Lumière &lt;commandes@maison-lumiere.example&gt;" in page  # decoded From header
    assert "X-Shop-Order" in page and "multipart/alternative" in page
    assert '<span class="badge s-sent">sent</span>' in page
    assert '<span class="badge s-failed">failed</span>' in page and "550 5.1.1 No such user here" in page
    assert "&#34;action&#34;: &#34;rewrapped&#34;" in page  # the transform report, pretty JSON
    assert f'href="/admin/message/{qid}/raw"' in page and f'href="/admin/message/{qid}/preview"' in page
    # an 8-bit UTF-8 subject header (no RFC 2047) reads as UTF-8 too
    other = console.qid("claire@example.org", "1042")
    assert "Votre commande n°1042" in console.get(f"/admin/message/{other}")[2].decode()


def test_raw_download_is_byte_identical(console):
    qid = console.qid("claire@example.org", "alert")
    status, headers, body = console.get(f"/admin/message/{qid}/raw")
    assert status == 200
    _security_headers(headers)
    assert headers["Content-Type"] == "message/rfc822"
    assert headers["Content-Disposition"] == f'attachment; filename="{qid}.eml"'
    assert body == console.relay.store.raw(qid)


def test_preview_renders_in_a_sandboxed_frame_under_a_strict_csp(console):
    qid = console.qid("camille@example.org", "10452")
    status, headers, body = console.get(f"/admin/message/{qid}/preview")
    assert status == 200
    page = body.decode()
    assert f'src="/admin/message/{qid}/preview.html?skin=boutique"' in page
    assert '<iframe class="preview" sandbox' in page
    assert '<span class="badge s-rewrapped">rewrapped</span>' in page
    status, headers, body = console.get(f"/admin/message/{qid}/preview.html?skin=boutique")
    assert status == 200
    assert headers["Content-Security-Policy"] == PREVIEW_CSP
    assert "frame-ancestors 'self'" in PREVIEW_CSP and "script" not in PREVIEW_CSP
    _security_headers(headers, frame="SAMEORIGIN")
    doc = body.decode()
    assert "Maison Lumi" in doc and "10452" in doc and "<script" not in doc.lower()
    # another skin, the original, and an unknown skin
    assert console.get(f"/admin/message/{qid}/preview.html?skin=default")[0] == 200
    assert console.get(f"/admin/message/{qid}/preview.html?skin=-")[0] == 200
    status, _h, body = console.get(f"/admin/message/{qid}/preview?skin=nope")
    assert status == 404 and "No skin named" in body.decode()
    assert console.get(f"/admin/message/{qid}/preview.html?skin=nope")[0] == 404


def test_unknown_ids_and_paths_are_readable_404s(console):
    for path in (
        "/admin/message/0000000000000000000",
        "/admin/message/..%2F..%2Fetc",
        "/admin/nothing",
        "/admin/message/0000000000000000000/raw",
        "/admin/message/x/preview.html",
    ):
        status, headers, body = console.get(path)
        assert status == 404, path
        _security_headers(headers)
        assert "Not found" in body.decode() and "Traceback" not in body.decode()


def test_post_is_refused(console):
    req = urllib.request.Request(console.base + "/admin", data=b"x=1", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 405 and e.value.headers["Allow"] == "GET, HEAD"
    qid = console.qid("claire@example.org", "1042")
    req = urllib.request.Request(console.base + f"/admin/message/{qid}/raw", method="DELETE")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 405


def test_basic_auth_when_admin_users_are_configured(console):
    app = AdminApp(console.relay.store, console.relay.settings, users={"ops": hash_password("linen & clay")})
    server = HttpServer("127.0.0.1", free_port(), app)
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        c = Console(console.relay, base, app)
        status, headers, body = c.get("/admin")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic realm=")
        assert "Votre commande" not in body.decode()

        def auth(user: str, password: str) -> dict:
            return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

        assert c.get("/admin", auth("ops", "wrong"))[0] == 401
        assert c.get("/admin", auth("nobody", "linen & clay"))[0] == 401
        assert c.get("/admin", {"Authorization": "Basic !!!"})[0] == 401
        for _ in range(2):  # the second time comes from the verified-credentials cache
            status, headers, body = c.get("/admin", auth("ops", "linen & clay"))
            assert status == 200 and "Votre commande n°1042" in body.decode()
            assert "Signed in as <strong>ops</strong>" in body.decode()
            assert "HTTP Basic" in body.decode()
        # with users configured, a non-loopback client is fine once signed in
        assert _call(app, "203.0.113.5", headers=auth("ops", "linen & clay"))[0].startswith("200")
        assert _call(app, "203.0.113.5")[0].startswith("401")
    finally:
        server.stop()


# -- direct WSGI calls: the access rules that need another client address ------------------------------


def _call(
    app: AdminApp,
    remote: str,
    path: str = "/admin",
    method: str = "GET",
    headers: dict | None = None,
    host: str = "127.0.0.1:9101",
):
    environ = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "REMOTE_ADDR": remote,
        "HTTP_HOST": host,
        "wsgi.input": io.BytesIO(b""),
    }
    for k, v in (headers or {}).items():
        environ["HTTP_" + k.upper().replace("-", "_")] = v
    got: dict = {}

    def start_response(status, hdrs):
        got["status"], got["headers"] = status, dict(hdrs)

    body = b"".join(app(environ, start_response))
    return got["status"], got["headers"], body


class _NoStore:
    """The access checks come before any query: a store that fails loudly proves it."""

    def __getattr__(self, name):
        raise AssertionError(f"store used: {name}")


def test_without_users_only_loopback_clients_are_served(console):
    app = AdminApp(console.relay.store, console.relay.settings)
    assert _call(app, "127.0.0.1")[0] == "200 OK"
    assert _call(app, "127.8.9.10")[0] == "200 OK"
    assert _call(app, "::1", host="[::1]:9101")[0] == "200 OK"
    assert _call(app, "::ffff:127.0.0.1", host="localhost:9101")[0] == "200 OK"
    blind = AdminApp(_NoStore(), console.relay.settings)
    status, headers, body = _call(blind, "203.0.113.5")
    assert status.startswith("403") and "loopback" in body.decode()
    assert headers["X-Frame-Options"] == "DENY" and headers["Cache-Control"] == "no-store"
    assert _call(blind, "10.0.0.8", "/admin/message/X/raw")[0].startswith("403")
    # a DNS-rebinding page reaches loopback with a foreign Host; a local reverse proxy adds forwarding headers
    assert _call(blind, "127.0.0.1", host="attacker.example")[0].startswith("403")
    assert _call(blind, "127.0.0.1", headers={"X-Forwarded-For": "203.0.113.5"})[0].startswith("403")
    assert _call(blind, "127.0.0.1", method="POST")[0].startswith("405")
    status, _h, body = _call(app, "127.0.0.1", method="HEAD")
    assert status == "200 OK" and body == b""


def test_a_failing_store_gives_a_plain_page_not_a_traceback(console):
    class Broken:
        engine = None

        def counts(self):
            raise RuntimeError("secret internals")

    status, headers, body = _call(AdminApp(Broken(), console.relay.settings), "127.0.0.1")
    assert status.startswith("500") and b"secret internals" not in body and b"Traceback" not in body
