"""Value types and exceptions shared by the transform package."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Block:
    """A cross-sell block already rendered by the rules engine.

    ``html`` is trusted, safe HTML: the transform wraps it in
    ``<div data-relay-block="NAME">...</div>`` and never escapes or sanitises it.
    """

    name: str
    html: str
    priority: int = 0  # higher = more important; the lowest is dropped first when over budget
    products: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decisions:
    """What the rules decided for one message and recipient."""

    skin: str | None = "default"  # None: do not wrap (forward unchanged but for X-Relay-Id)
    category: str = "transactional"
    kind: str | None = None
    blocks: tuple[Block, ...] = ()
    set_headers: tuple[tuple[str, str], ...] = ()  # set/replace on rewrapped output; no CR/LF allowed


@dataclass
class Report:
    """What the transform did; ``to_dict()`` is JSON-serialisable."""

    action: str  # "rewrapped" | "passthrough" | "failed"
    reason: str = ""  # why passthrough/failed ("" when rewrapped)
    skin: str | None = None
    blocks: list[str] = field(default_factory=list)  # blocks actually injected
    dropped_blocks: list[str] = field(default_factory=list)
    over_budget: bool = False
    html_bytes: int = 0
    dkim: str = "none"  # "signed" | "stripped" | "none" | "untouched"
    skin_version: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DkimKey:
    """A DKIM signing key: PEM private key (PKCS#1 or PKCS#8, RSA)."""

    domain: str
    selector: str
    private_key: bytes

    def __repr__(self) -> str:  # never print key material in logs
        size = len(self.private_key)
        return f"DkimKey(domain={self.domain!r}, selector={self.selector!r}, private_key=<{size} bytes>)"


class TransformError(Exception):
    """Base class of the transform's own errors."""


class SkinError(TransformError):
    """A skin that cannot be loaded or rendered; carries the file and line to fix."""

    def __init__(self, file: str, line: int, message: str) -> None:
        self.file = str(file)
        self.line = int(line)
        self.message = message
        super().__init__(f"{self.file}:{self.line}: {message}")


class UnknownSkin(TransformError, LookupError):
    """Decisions named a skin the library does not have."""


class DkimSigningError(TransformError):
    """Signing failed: the caller must defer the message, never send it unsigned.

    ``transform_fail_open`` lets this one exception through on purpose.
    """


class TransformTimeout(TransformError):
    """The fail-open time limit interrupted a transform."""


class Spliced:
    """A message's bytes as pieces, the big ones views of the stored original: the rewrap or pass-through
    of a big message when the caller asks for it (``transform(..., spliced=True)``), so that delivery
    sends it piece by piece instead of joining it, which would hold a second copy of it in memory."""

    __slots__ = ("pieces", "size")

    def __init__(self, pieces: list[bytes | memoryview]):
        self.pieces = pieces
        self.size = sum(len(p) for p in pieces)

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.pieces)

    def prefix(self, n: int) -> bytes:
        """The first ``n`` bytes (headers, say) without joining the rest."""
        out, left = [], n
        for p in self.pieces:
            if left <= 0:
                break
            out.append(bytes(p[:left]))
            left -= len(out[-1])
        return b"".join(out)

    def isascii(self) -> bool:
        window = 1024 * 1024  # a view is checked a slice at a time, never copied whole
        return all(bytes(p[i : i + window]).isascii() for p in self.pieces for i in range(0, len(p), window))


def joined(data: bytes | Spliced) -> bytes:
    """The bytes themselves, joined when spliced (for the callers that need one buffer)."""
    return bytes(data) if isinstance(data, Spliced) else data
