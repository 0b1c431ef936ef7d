"""Admin API through which the control process keeps the gateway's service table in sync.

- `PUT /admin/services/{namespace}/{name}` with a service entry (see `services.py`): create
  or replace; responds with the service's view.
- `DELETE /admin/services/{namespace}/{name}`: remove; its endpoints drain.
- `GET /admin/services`: every service with endpoints, readiness and in-flight counts.
- `GET /admin/services/{namespace}/{name}`: one service.

Every request carries `x-llmisvc-admin-token`, compared in constant time with the token the
gateway was started with. Without a token the admin API returns 404 for every request.
"""

from __future__ import annotations

import hmac
import logging

from llmisvc.protocol.errors import AuthenticationError, BadRequestError, NotFoundError

from .jsonutil import JSONDecodeError, loads
from .server import ClientConnection, Request
from .services import ServiceTable

logger = logging.getLogger(__name__)

ADMIN_TOKEN_HEADER = b"x-llmisvc-admin-token"


class AdminAPI:
    """Handler of `/admin/...` requests for one service table."""

    def __init__(self, table: ServiceTable, token: str | None):
        self._table = table
        self._token = token.encode() if token else None

    def handle(self, request: Request, client: ClientConnection) -> None:
        """Handle one admin request; raise APIError subclasses for client errors."""
        if self._token is None:
            raise NotFoundError("the admin API is disabled: start the gateway with --admin-token-file")
        supplied = request.header(ADMIN_TOKEN_HEADER) or b""
        if not hmac.compare_digest(supplied, self._token):
            raise AuthenticationError("missing or invalid x-llmisvc-admin-token")

        parts = request.path.rstrip("/").split("/")
        # ["", "admin", "services", namespace?, name?]
        if len(parts) < 3 or parts[2] != "services":
            raise NotFoundError(f"no admin route for {request.path}")
        method = request.method
        if len(parts) == 3 and method == b"GET":
            client.send_json(200, {"services": self._table.describe()})
            return
        if len(parts) != 5 or not parts[3] or not parts[4]:
            raise NotFoundError(f"no admin route for {request.method.decode()} {request.path}")
        namespace, name = parts[3], parts[4]

        if method == b"PUT":
            try:
                entry = loads(request.body or b"null")
            except JSONDecodeError as exc:
                raise BadRequestError(f"service entry is not valid JSON: {exc}", param="body") from None
            service = self._table.put(namespace, name, entry)
            client.send_json(200, service.describe())
        elif method == b"DELETE":
            service = self._table.delete(namespace, name)
            if service is None:
                raise NotFoundError(f"service {namespace}/{name} not found")
            client.send_json(200, {"deleted": f"{namespace}/{name}"})
        elif method == b"GET":
            service = self._table.by_key.get((namespace, name))
            if service is None:
                raise NotFoundError(f"service {namespace}/{name} not found")
            client.send_json(200, service.describe())
        else:
            raise NotFoundError(f"no admin route for {request.method.decode()} {request.path}")
