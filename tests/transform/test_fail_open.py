"""Fail open: a raising skin or a runaway transform forwards the original, marked as failed."""

from __future__ import annotations

import threading
import time

from relay.transform import Decisions, transform_fail_open

from .conftest import header_count, load


def _call(raw, skins, skin="explosive", **kw):
    return transform_fail_open(
        raw,
        recipient="a@example.org",
        queue_id="Q-9",
        decisions=Decisions(skin=skin),
        skins=skins,
        mail_from="shop@example.com",
        **kw,
    )


def _with_subject(subject: bytes) -> bytes:
    raw = load("latin1_text_qp.eml")
    return raw.replace(b"Subject: =?ISO-8859-1?Q?Votre_colis_est_pr=EAt?=", b"Subject: " + subject)


def test_ok_message_is_rewrapped(skins):
    out, report = _call(_with_subject(b"Hello"), skins)
    assert report.action == "rewrapped" and b"X-Relay-Skin: explosive" in out


def test_raising_skin_forwards_original(skins):
    raw = _with_subject(b"BOOM").replace(b"MIME-Version", b"X-Relay-Category: x\r\nMIME-Version", 1)
    out, report = _call(raw, skins)
    assert report.action == "failed" and "ZeroDivisionError" in report.reason
    assert report.skin == "explosive" and report.dkim == "untouched"
    assert out == b"X-Relay-Id: Q-9\r\n" + raw.replace(b"X-Relay-Category: x\r\n", b"")
    assert report.to_dict()["action"] == "failed"


def test_unknown_skin_fails_open(skins):
    raw = _with_subject(b"Hello")
    out, report = _call(raw, skins, skin="nope")
    assert report.action == "failed" and "UnknownSkin" in report.reason
    assert out == b"X-Relay-Id: Q-9\r\n" + raw


def test_time_limit_interrupts_runaway(skins):
    raw = _with_subject(b"SLOW")
    t0 = time.perf_counter()
    out, report = _call(raw, skins, time_limit=0.3)
    elapsed = time.perf_counter() - t0
    assert report.action == "failed" and "TransformTimeout" in report.reason
    assert elapsed < 5
    assert out == b"X-Relay-Id: Q-9\r\n" + raw
    # the alarm is disarmed afterwards
    out, report = _call(_with_subject(b"Hello"), skins, time_limit=0.3)
    time.sleep(0.4)
    assert report.action == "rewrapped"


def test_garbage_input_never_raises(skins):
    for raw in (
        b"",
        b"\x00\xff" * 50,
        b"no headers at all",
        b"Subject: x\r\n",
        b"\r\n\r\nbody only",
        b"Content-Type: multipart/mixed\r\n\r\n--\r\n",
    ):
        out, report = _call(raw, skins, skin="plain")
        assert report.action in ("rewrapped", "passthrough", "failed")
        assert header_count(out, "X-Relay-Id") == 1


def test_bad_queue_id_sanitised(skins):
    out, report = transform_fail_open(
        b"Subject: x\r\n\r\nhi\r\n",
        recipient="a@example.org",
        queue_id="a\r\nb c",
        decisions=Decisions(skin="plain"),
        skins=skins,
    )
    assert report.action == "failed" and out.startswith(b"X-Relay-Id: a__b_c\r\n")


def test_no_limit_outside_main_thread(skins):
    result = {}

    def worker():
        result["r"] = _call(_with_subject(b"Hello"), skins, time_limit=0.01)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert result["r"][1].action == "rewrapped"
