"""The worker's pipeline parses each message once for the rules and the rewrap, and bounds what it keeps."""

from __future__ import annotations

import email
import time
from pathlib import Path

from relay.config import from_mapping
from relay.delivery import pipeline as pipeline_mod
from relay.delivery.pipeline import Pipeline
from relay.store.queue import Claim

ROOT = Path(__file__).resolve().parents[2]
ORDER = (ROOT / "tests" / "fixtures" / "order_confirmation_30k.eml").read_bytes()


def make(tmp_path: Path) -> Pipeline:
    settings = from_mapping(
        {"paths": {"skins": str(ROOT / "skins"), "rules": str(ROOT / "rules"), "state": str(tmp_path)}},
        base=tmp_path,
    )
    return Pipeline(settings)


def claim(queue_id: str, address: str = "camille@example.org") -> Claim:
    return Claim(id=1, queue_id=queue_id, address=address, attempts=0, mail_from="shop@boutique.example",
                 received_at=time.time(), source="127.0.0.1", client_addr="127.0.0.1")


def test_one_parse_serves_the_rules_and_every_recipient(tmp_path, monkeypatch):
    p = make(tmp_path)
    calls = []
    real = email.message_from_bytes

    def counting(data, *a, **kw):
        calls.append(data == ORDER)
        return real(data, *a, **kw)

    monkeypatch.setattr(email, "message_from_bytes", counting)  # the rules' and the rewrap's parser
    for rcpt in ("camille@example.org", "louis@example.org"):
        prepared = p(ORDER, claim("Q0000000001", rcpt))
        assert prepared.skin  # rewrapped
    assert calls == [True]


def test_a_big_message_s_facts_are_not_kept(tmp_path, monkeypatch):
    """Neither its MIME tree nor the raw bytes the facts hold stay in the worker after a recipient."""
    p = make(tmp_path)
    monkeypatch.setattr(pipeline_mod, "KEEP_PARSE_BELOW", len(ORDER))
    p(ORDER, claim("Q0000000001"))
    p(ORDER, claim("Q0000000002"))
    assert p._facts == {} and p._facts_bytes == 0


def test_the_facts_cache_is_bounded_in_bytes(tmp_path, monkeypatch):
    p = make(tmp_path)
    monkeypatch.setattr(pipeline_mod, "FACTS_CACHE_BYTES", 3 * len(ORDER))
    for i in range(10):
        p.facts(ORDER, claim(f"Q{i:010d}"))
    assert len(p._facts) == 3 and p._facts_bytes == 3 * len(ORDER)
