"""`session-affinity-scorer`: keep a session on the endpoint that served it before.

Parameters: none.
The request header `x-session-token` carries the base64 encoding of an endpoint address;
that endpoint scores 1 and every other 0 (no header: all 0). After each decision the
response carries `x-session-token` for the chosen endpoint, which the client sends back.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

from llmisvc.protocol.headers import SESSION_TOKEN
from llmisvc.scheduler.datastore import Endpoint
from llmisvc.scheduler.framework import CycleState, LifecycleHooks, Plugin, SchedulingResult


def encode_token(address: str) -> str:
    """Return the session token for `address`."""
    return base64.urlsafe_b64encode(address.encode()).decode()


def decode_token(token: str) -> str | None:
    """Return the address in a session token, or None when it is malformed."""
    try:
        address = base64.b64decode(token.encode() + b"=" * (-len(token) % 4), altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return address or None


class SessionAffinityScorer(Plugin, LifecycleHooks):
    """Scores 1 for the endpoint named by the session token."""

    type_name = "session-affinity-scorer"
    kind = "scorer"
    PARAMETERS = ()

    def __init__(self, name: str, parameters: dict, context) -> None:
        super().__init__(name)

    def score(self, state: CycleState, endpoints: Sequence[Endpoint]) -> dict[str, float]:
        token = state.request.headers.get(SESSION_TOKEN)
        session_address = decode_token(token) if token else None
        return {e.address: 1.0 if e.address == session_address else 0.0 for e in endpoints}

    def on_pick(self, state: CycleState, result: SchedulingResult) -> None:
        result.response_headers[SESSION_TOKEN] = encode_token(result.target.address)
