"""What the worker does to a message before sending it: decide, rewrap, stamp.

Kept apart from the worker loop so the same call serves `relay preview` and tests. The transform is
fail-open: a broken skin or a runaway template sends the original (with X-Relay-Id), records why, and
counts it; only a DKIM signing failure defers, since sending unsigned would be worse than waiting.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from relay import metrics
from relay.config import ConfigError, Settings
from relay.delivery.worker import Prepared
from relay.store.queue import Claim
from relay.transform import (
    Decisions,
    DkimKey,
    DkimSigningError,
    SkinError,
    SkinLibrary,
    transform_fail_open,
    verify_dkim,
)
from relay.transform._raw import split_message

log = logging.getLogger(__name__)

RELOAD_EVERY = 2.0  # seconds between checks of the skins folder for edits


def load_dkim_keys(settings: Settings) -> dict[str, DkimKey]:
    keys = {}
    for i, k in enumerate(settings.rewrap.dkim):
        try:
            pem = Path(k.key_file).read_bytes()
        except OSError as e:
            raise ConfigError(
                settings.source, f"rewrap.dkim[{i}].key_file", f"{k.key_file}: {e.strerror}"
            ) from None
        keys[k.domain] = DkimKey(domain=k.domain, selector=k.selector, private_key=pem)
    return keys


class Pipeline:
    """Callable the worker uses: (raw, claim) -> Prepared."""

    def __init__(self, settings: Settings, clock=time.monotonic):
        self.settings = settings
        self.clock = clock
        self.dkim_keys = load_dkim_keys(settings)
        self.strict = frozenset(settings.rewrap.dmarc_strict_domains)
        self.skins: SkinLibrary | None = None
        self.skins_error: str | None = None
        self._checked = 0.0
        self._load_skins()
        self._verified: dict[str, str] = {}

    def _load_skins(self) -> None:
        try:
            self.skins = SkinLibrary.load(self.settings.paths.skins)
            self.skins_error = None
        except (SkinError, OSError) as e:
            self.skins_error = f"skins not loaded: {e}"
            log.error("%s; messages are forwarded unwrapped until it is fixed", self.skins_error)
        self._checked = self.clock()

    def _fresh_skins(self) -> SkinLibrary | None:
        if self.clock() - self._checked >= RELOAD_EVERY:
            if self.skins is None:
                self._load_skins()
            else:
                self._checked = self.clock()
                try:
                    if self.skins.reload_if_changed():
                        log.info("skins reloaded from %s", self.settings.paths.skins)
                except Exception as e:  # noqa: BLE001 - the last good skins keep serving
                    log.error("skin reload refused: %s", e)
        return self.skins

    def decisions(self, raw: bytes, claim: Claim) -> Decisions:
        skin = self.settings.rewrap.default_skin or None
        return Decisions(skin=skin)

    def dkim_result(self, raw: bytes, queue_id: str) -> str | None:
        """The original signature's verdict, once per message, before the rewrap breaks it."""
        if not self.settings.rewrap.verify_dkim:
            return None
        if queue_id in self._verified:
            return None
        head = split_message(raw)[0]
        result = "none" if b"dkim-signature:" not in head.lower() else verify_dkim(raw)
        self._verified[queue_id] = result
        if len(self._verified) > 1000:
            self._verified.pop(next(iter(self._verified)))
        return result

    def __call__(self, raw: bytes, claim: Claim) -> Prepared:
        dkim = self.dkim_result(raw, claim.queue_id)
        skins = self._fresh_skins()
        decisions = self.decisions(raw, claim)
        if skins is None:
            decisions = Decisions(skin=None)
        try:
            data, report = transform_fail_open(
                raw,
                time_limit=self.settings.delivery.transform_time_limit,
                recipient=claim.address,
                queue_id=claim.queue_id,
                decisions=decisions,
                skins=skins or _EMPTY,
                mail_from=claim.mail_from,
                dkim_keys=self.dkim_keys,
                dmarc_strict_domains=self.strict,
                html_budget=self.settings.rewrap.html_budget,
            )
        except DkimSigningError as e:
            metrics.transform_failures.labels(reason="dkim_signing").inc()
            return Prepared(
                data=raw, defer=f"4.7.0 DKIM signing failed, not sent unsigned: {e}"[:300], dkim=dkim
            )
        metrics.transform_actions.labels(action=report.action).inc()
        error = None
        if report.action == "failed":
            metrics.transform_failures.labels(
                reason="exception" if "Timeout" not in report.reason else "time_limit"
            ).inc()
            error = report.reason
        elif self.skins_error and report.action == "passthrough":
            error = self.skins_error
        if report.over_budget:
            metrics.transform_failures.labels(reason="over_budget").inc()
        return Prepared(
            data=data,
            skin=report.skin if report.action == "rewrapped" else None,
            blocks=tuple(report.blocks),
            report=report.to_dict(),
            error=error,
            dkim=dkim,
        )


class _EmptySkins:
    """Stands in when no skin could be loaded: every message passes through."""

    def __contains__(self, name: object) -> bool:
        return False


_EMPTY = _EmptySkins()
