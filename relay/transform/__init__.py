"""The rewrap engine: raw message bytes + decisions -> rewrapped bytes + Report (issue 3).

See README.md in this directory for the rules (pass-through cases, request headers, DKIM,
size budget, fail-open) and the skin template context.
"""

from .dkim import verify_dkim
from .engine import (
    REQUEST_HEADERS,
    passthrough_reason,
    read_request_headers,
    transform,
    transform_fail_open,
)
from .skins import Skin, SkinLibrary
from .types import (
    Block,
    Decisions,
    DkimKey,
    DkimSigningError,
    Report,
    SkinError,
    Spliced,
    TransformError,
    TransformTimeout,
    UnknownSkin,
    joined,
)

__all__ = [
    "REQUEST_HEADERS",
    "Block",
    "Decisions",
    "DkimKey",
    "DkimSigningError",
    "Report",
    "Skin",
    "SkinError",
    "SkinLibrary",
    "Spliced",
    "TransformError",
    "TransformTimeout",
    "UnknownSkin",
    "passthrough_reason",
    "read_request_headers",
    "transform",
    "transform_fail_open",
    "joined",
    "verify_dkim",
]
