"""DKIM: verify at intake, sign the rewrapped message last (dkimpy, relaxed/relaxed).

dkimpy is imported when first needed: with dnspython it adds ~14 MB to each of the relay's processes,
and a relay with no key and no signed mail never needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from .types import DkimKey, DkimSigningError

# Signed when present; From is signed one extra time so a second From cannot be added.
SIGNED_HEADERS = (
    "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc", "in-reply-to",
    "references", "mime-version", "content-type", "list-unsubscribe", "list-unsubscribe-post", "list-id",
    "x-relay-id",
)  # fmt: skip


def key_for(from_domain: str | None, keys: Mapping[str, DkimKey]) -> DkimKey | None:
    """The key for the From domain, or for a parent domain (DMARC relaxed alignment)."""
    if not from_domain or not keys:
        return None
    labels = from_domain.lower().rstrip(".").split(".")
    for i in range(len(labels) - 1):
        key = keys.get(".".join(labels[i:]))
        if key is not None:
            return key
    return None


def sign(message: bytes, key: DkimKey, present: set[str], *, linesep: bytes = b"\r\n") -> bytes:
    """Return ``message`` with a DKIM-Signature prepended. Raises DkimSigningError, never returns unsigned."""
    include = [h for h in SIGNED_HEADERS if h in present]
    if "from" not in include:
        raise DkimSigningError("no From header to sign")
    include.append("from")
    import dkim

    try:
        sig = dkim.sign(
            message,
            key.selector.encode("ascii"),
            key.domain.encode("ascii"),
            key.private_key,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=[h.encode("ascii") for h in include],
            linesep=linesep,
        )
    except Exception as e:  # dkim.DKIMException, key parsing errors, anything: defer, never send unsigned
        raise DkimSigningError(f"DKIM signing for d={key.domain} s={key.selector} failed: {e}") from e
    if not sig or not sig.startswith(b"DKIM-Signature:"):
        raise DkimSigningError("DKIM signing produced no signature")
    return sig + message


def verify_dkim(raw: bytes, dnsfunc: Callable | None = None) -> str:
    """Verify the DKIM signatures of a message as received: "pass" when one signature verifies,
    "none" without signatures, "temperror" when a key lookup failed temporarily, else "fail".

    ``dnsfunc(name: bytes, timeout=5) -> bytes | None`` returns the TXT record (dkimpy's
    interface); the default queries DNS, so intake should call this off the event loop.
    """
    import dkim

    try:
        d = dkim.DKIM(raw)
    except Exception:
        return "fail"
    count = sum(1 for name, _ in d.headers if name.lower() == b"dkim-signature")
    if count == 0:
        return "none"
    lookup = dnsfunc or dkim.dnsplug.get_txt
    temp = False

    def wrapped(name, timeout=5):
        nonlocal temp
        try:
            return lookup(name, timeout=timeout)
        except dkim.DnsTimeoutError:
            temp = True
            raise
        except Exception as e:
            temp = True
            raise dkim.DnsTimeoutError(str(e)) from e

    for idx in range(count):
        try:
            if d.verify(idx, dnsfunc=wrapped):
                return "pass"
        except dkim.DnsTimeoutError:
            temp = True
        except Exception:
            continue
    return "temperror" if temp else "fail"
