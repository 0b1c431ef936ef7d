"""`llmisvc sidecar`: the decode pod's prefill/decode proxy for Kubernetes.

On Kubernetes the gateway picks a decode endpoint and a prefill endpoint and sends the request
to the decode pod's sidecar with the prefill address in `x-prefiller-host-port`, as llm-d's
routing sidecar expects. The sidecar runs the prefill leg against that address and the decode
leg against the engine in its own pod (`localhost:--vllm-port`), with the same rules as the
gateway (`llmisvc.gateway.pd`). Requests without the header, and every other path, are
proxied to the local engine unchanged.

A prefill address must belong to the service's pool, so a request cannot make the sidecar
call an arbitrary host. The sidecar checks it against `--prefill-pool host:port,...` (static,
exact host and port). With `--enable-ssrf-protection` it also accepts any port on the IPs of
the pods that the InferencePool (`--inference-pool-name`, `--inference-pool-namespace`)
selects, read from the Kubernetes API with the pod's service account, as llm-d does. Any
other address gets 403, and with no pool source configured every prefill address does.

Flag names follow llm-d's routing sidecar (`--port`, `--vllm-port`, `--connector`,
`--prefiller-use-tls`, `--decoder-use-tls`, `--prefiller-tls-insecure-skip-verify`,
`--decoder-tls-insecure-skip-verify`, `--secure-proxy`, `--cert-path`,
`--enable-ssrf-protection`, `--inference-pool-namespace`, `--inference-pool-name`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import ssl
import uuid
from pathlib import Path
from typing import Any

from llmisvc.protocol.headers import CLIENT_ROUTING_HEADERS, HOP_BY_HOP, PREFILLER_HOST_PORT, REQUEST_ID

logger = logging.getLogger(__name__)

_SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
_POOL_REFRESH_SECONDS = 10.0
# InferencePool API groups, newest first; llm-d deployments use either.
_POOL_APIS = ("inference.networking.k8s.io/v1", "inference.networking.x-k8s.io/v1alpha2")
_PD_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
_CONNECTORS = ("nixl", "nixlv2", "lmcache")


def add_parser(subparsers: Any, name: str, help: str) -> None:
    """Register the `sidecar` subcommand."""
    parser = subparsers.add_parser(name, help=help, description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=8000, help="port the sidecar listens on (default 8000)")
    parser.add_argument("--vllm-port", type=int, default=8001, help="port of the decode engine on localhost (default 8001)")
    parser.add_argument(
        "--vllm-host", default="127.0.0.1", help="host of the decode engine (default 127.0.0.1, the same pod)"
    )
    parser.add_argument(
        "--connector",
        default="nixlv2",
        choices=_CONNECTORS,
        help="P/D connector protocol of the engines (default nixlv2, vLLM's NixlConnector fields)",
    )
    parser.add_argument("--prefiller-use-tls", action="store_true", help="use HTTPS for prefill legs")
    parser.add_argument("--decoder-use-tls", action="store_true", help="use HTTPS for the local decode engine")
    parser.add_argument(
        "--prefiller-tls-insecure-skip-verify", action="store_true", help="skip certificate checks on prefill legs"
    )
    parser.add_argument(
        "--decoder-tls-insecure-skip-verify", action="store_true", help="skip certificate checks on decode legs"
    )
    parser.add_argument(
        "--secure-proxy",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="serve HTTPS with tls.crt and tls.key from --cert-path (default off)",
    )
    parser.add_argument("--cert-path", default="", help="directory with tls.crt and tls.key for --secure-proxy")
    parser.add_argument(
        "--enable-ssrf-protection",
        action="store_true",
        help="allow prefill hosts that are pods of the InferencePool (read from the Kubernetes API)",
    )
    parser.add_argument(
        "--inference-pool-namespace",
        default=os.environ.get("INFERENCE_POOL_NAMESPACE", ""),
        help="namespace of the InferencePool (default $INFERENCE_POOL_NAMESPACE)",
    )
    parser.add_argument(
        "--inference-pool-name",
        default=os.environ.get("INFERENCE_POOL_NAME", ""),
        help="name of the InferencePool (default $INFERENCE_POOL_NAME)",
    )
    parser.add_argument(
        "--prefill-pool",
        default="",
        help="comma-separated host:port list of allowed prefill endpoints (static pool, for tests and plain hosts)",
    )
    parser.add_argument(
        "--prefill-timeout", type=float, default=60.0, help="seconds to wait for a prefill leg (default 60)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the sidecar until SIGINT or SIGTERM; return the exit code."""
    if args.enable_ssrf_protection and not (args.inference_pool_namespace and args.inference_pool_name):
        logger.error("--enable-ssrf-protection needs --inference-pool-namespace and --inference-pool-name")
        return 2
    if args.secure_proxy and not args.cert_path:
        logger.error("--secure-proxy needs --cert-path with tls.crt and tls.key")
        return 2
    if args.connector == "nixl":
        logger.warning("connector nixl is the deprecated name of nixlv2; both use the same kv_transfer_params")
    if args.connector == "lmcache":
        logger.error("connector lmcache is not supported by llmisvc engines; use nixlv2")
        return 2
    try:
        static_pool = parse_pool(args.prefill_pool)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    try:
        asyncio.run(_serve(args, static_pool))
    except KeyboardInterrupt:
        pass
    return 0


def parse_pool(text: str) -> set[str]:
    """Parse a comma-separated host:port list; raise ValueError naming a bad entry."""
    pool: set[str] = set()
    for entry in filter(None, (part.strip() for part in text.split(","))):
        host, sep, port = entry.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--prefill-pool entry {entry!r} is not host:port")
        pool.add(f"{host}:{int(port)}")
    return pool


class PrefillPool:
    """The set of prefill addresses the sidecar may call.

    `static` contains exact host:port entries; `hosts` contains pod IPs learned from
    Kubernetes, on which any port is allowed.
    """

    def __init__(self, static: set[str]):
        self.static = set(static)
        self.hosts: set[str] = set()

    def allows(self, host_port: str) -> bool:
        """Return True when `host_port` belongs to the pool."""
        host, sep, port = host_port.rpartition(":")
        if not sep or not port.isdigit():
            return False
        if f"{host}:{int(port)}" in self.static:
            return True
        return host.strip("[]") in self.hosts


class KubernetesPoolSource:
    """Refreshes `PrefillPool.hosts` from the InferencePool's selector and its pods.

    Reads the in-cluster API address from KUBERNETES_SERVICE_HOST / _PORT and the service
    account token and CA from the standard mount, unless given explicitly.
    """

    def __init__(
        self,
        pool: PrefillPool,
        namespace: str,
        name: str,
        *,
        api_url: str | None = None,
        token: str | None = None,
        ca_file: str | None = None,
    ):
        self.pool = pool
        self.namespace = namespace
        self.name = name
        if api_url is None:
            host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
            port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
            if not host:
                raise RuntimeError("KUBERNETES_SERVICE_HOST is unset: the sidecar is not running in a cluster")
            api_url = f"https://{host}:{port}"
        self.api_url = api_url.rstrip("/")
        if token is None and (_SERVICE_ACCOUNT_DIR / "token").exists():
            token = (_SERVICE_ACCOUNT_DIR / "token").read_text().strip()
        self.token = token
        if ca_file is None and (_SERVICE_ACCOUNT_DIR / "ca.crt").exists():
            ca_file = str(_SERVICE_ACCOUNT_DIR / "ca.crt")
        self.ssl = ssl.create_default_context(cafile=ca_file) if self.api_url.startswith("https") else None

    async def refresh(self, session: Any) -> None:
        """Read the pool's selector and the Running pods it selects; replace `pool.hosts`."""
        selector = await self._selector(session)
        label_selector = ",".join(f"{key}={value}" for key, value in sorted(selector.items()))
        url = f"{self.api_url}/api/v1/namespaces/{self.namespace}/pods"
        pods = await self._get(session, url, params={"labelSelector": label_selector})
        hosts = {
            item.get("status", {}).get("podIP")
            for item in pods.get("items", [])
            if item.get("status", {}).get("phase") == "Running"
        }
        hosts.discard(None)
        if hosts != self.pool.hosts:
            logger.info("prefill pool %s/%s: %d pods %s", self.namespace, self.name, len(hosts), sorted(hosts))
        self.pool.hosts = hosts  # type: ignore[assignment]

    async def _selector(self, session: Any) -> dict[str, str]:
        last_error: Exception | None = None
        for api in _POOL_APIS:
            url = f"{self.api_url}/apis/{api}/namespaces/{self.namespace}/inferencepools/{self.name}"
            try:
                obj = await self._get(session, url)
            except LookupError as exc:
                last_error = exc
                continue
            selector = obj.get("spec", {}).get("selector", {})
            # v1 nests the labels under matchLabels; v1alpha2 lists them directly.
            labels = selector.get("matchLabels", selector)
            if not isinstance(labels, dict) or not labels:
                raise RuntimeError(f"InferencePool {self.namespace}/{self.name} has no label selector")
            return {str(k): str(v) for k, v in labels.items()}
        raise RuntimeError(f"InferencePool {self.namespace}/{self.name} not found: {last_error}")

    async def _get(self, session: Any, url: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        async with session.get(url, params=params, headers=headers, ssl=self.ssl) as response:
            if response.status == 404:
                raise LookupError(url)
            if response.status != 200:
                raise RuntimeError(f"GET {url} failed with status {response.status}: {(await response.text())[:200]}")
            return await response.json()

    async def run(self, session: Any) -> None:
        """Refresh forever; errors are logged and the last known hosts kept."""
        while True:
            try:
                await self.refresh(session)
            except (RuntimeError, OSError, ValueError, asyncio.TimeoutError) as exc:
                logger.warning("refreshing prefill pool %s/%s failed: %s", self.namespace, self.name, exc)
            except Exception as exc:  # aiohttp client errors
                logger.warning("refreshing prefill pool %s/%s failed: %s", self.namespace, self.name, exc)
            await asyncio.sleep(_POOL_REFRESH_SECONDS)


async def _serve(args: argparse.Namespace, static_pool: set[str]) -> None:
    from aiohttp import web

    pool = PrefillPool(static_pool)
    app = SidecarApp(args, pool)
    await app.start()
    tasks: list[asyncio.Task] = []
    if args.enable_ssrf_protection:
        source = KubernetesPoolSource(pool, args.inference_pool_namespace, args.inference_pool_name)
        tasks.append(asyncio.create_task(source.run(app.session)))
    if not static_pool and not args.enable_ssrf_protection:
        logger.warning(
            "no prefill pool is configured: every x-prefiller-host-port gets 403; "
            "set --prefill-pool or --enable-ssrf-protection"
        )

    ssl_context = None
    if args.secure_proxy:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(Path(args.cert_path) / "tls.crt", Path(args.cert_path) / "tls.key")

    runner = web.AppRunner(app.web_app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, ssl_context=ssl_context)
    await site.start()
    logger.info(
        "sidecar listening on %s:%d; decode engine %s:%d; static prefill pool %s",
        args.host,
        args.port,
        args.vllm_host,
        args.vllm_port,
        sorted(static_pool) or "empty",
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("sidecar stopping")
    for task in tasks:
        task.cancel()
    await runner.cleanup()
    await app.close()


class SidecarApp:
    """The sidecar's request handling: PD legs for routed requests, plain proxy otherwise."""

    def __init__(self, args: argparse.Namespace, pool: PrefillPool):
        from prometheus_client import CollectorRegistry

        from .pd import PDMetrics, PDOrchestrator

        self.args = args
        self.pool = pool
        self.registry = CollectorRegistry()
        self.pd = PDOrchestrator(PDMetrics(self.registry), prefill_timeout=args.prefill_timeout)
        scheme = "https" if args.decoder_use_tls else "http"
        self.decoder_url = f"{scheme}://{args.vllm_host}:{args.vllm_port}"
        self.prefill_scheme = "https" if args.prefiller_use_tls else "http"
        self.prefill_ssl: Any = False if args.prefiller_tls_insecure_skip_verify else None
        self.decoder_ssl: Any = False if args.decoder_tls_insecure_skip_verify else None
        self.session: Any = None

    async def start(self) -> None:
        """Open the HTTP client session used for both legs."""
        import aiohttp

        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            auto_decompress=False,
        )

    async def close(self) -> None:
        """Close the client session."""
        if self.session is not None:
            await self.session.close()

    def web_app(self) -> Any:
        """Return the aiohttp application serving every path."""
        from aiohttp import web

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/sidecar/metrics", self._metrics)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _metrics(self, request: Any) -> Any:
        from aiohttp import web
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _handle(self, request: Any) -> Any:
        prefiller = request.headers.get(PREFILLER_HOST_PORT)
        if request.method == "POST" and request.path in _PD_PATHS and prefiller:
            return await self._handle_pd(request, prefiller.strip())
        body = await request.read()
        return await self._relay(request, request.method, request.path_qs, body, rewriter=None)

    async def _handle_pd(self, request: Any, prefiller: str) -> Any:
        from aiohttp import web

        from llmisvc.protocol.errors import BadRequestError, ForbiddenError

        from .jsonutil import JSONDecodeError, loads
        from .pd import scores_prompt

        if not self.pool.allows(prefiller):
            logger.warning("rejected prefill address %s: not in the prefill pool", prefiller)
            return _error_response(ForbiddenError(f"prefill host {prefiller} is not in this service's pool"))
        raw_body = await request.read()
        try:
            body = loads(raw_body)
        except JSONDecodeError as exc:
            return _error_response(BadRequestError(f"request body is not valid JSON: {exc}"))
        if not isinstance(body, dict):
            return _error_response(BadRequestError("request body must be a JSON object"))

        request_id = request.headers.get(REQUEST_ID) or uuid.uuid4().hex
        model = str(body.get("model", ""))
        if scores_prompt(body):
            # The decode engine computes a scored prompt itself, so a prefill leg would be wasted.
            self.pd.count_decode_only(model)
            return await self._relay(request, "POST", request.path_qs, raw_body, rewriter=None, request_id=request_id)
        outcome = await self.pd.run_prefill(
            request=body,
            path=request.path,
            request_id=request_id,
            model=model,
            prefill_address=prefiller,
            send=self._send_prefill,
            headers=_forward_headers(request.headers, drop=(REQUEST_ID,)),
        )
        if outcome.response is not None:
            status, payload = outcome.response
            return web.Response(status=status, body=payload, headers={"Content-Type": "application/json", REQUEST_ID: request_id})

        try:
            return await self._relay(
                request,
                "POST",
                request.path_qs,
                outcome.decode_body,
                rewriter=outcome.usage_rewriter(),
                request_id=request_id,
                outcome=outcome,
            )
        except asyncio.CancelledError:
            # The client went away between the legs or during decode: free the prefill
            # blocks now rather than at the end of their lease.
            await asyncio.shield(self.pd.release_prefill(outcome))
            raise

    async def _send_prefill(
        self, address: str, path: str, body: bytes, headers: list[tuple[str, str]], timeout: float
    ) -> tuple[int, bytes]:
        import aiohttp

        from .pd import PrefillLegFailed

        url = f"{self.prefill_scheme}://{address}{path}"
        try:
            async with self.session.post(
                url, data=body, headers=headers, ssl=self.prefill_ssl, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as response:
                return response.status, await response.read()
        except aiohttp.ClientConnectorError as exc:
            raise PrefillLegFailed("connect", str(exc)) from exc
        except asyncio.TimeoutError as exc:
            raise PrefillLegFailed("timeout", f"no response within {timeout}s") from exc
        except aiohttp.ClientError as exc:
            raise PrefillLegFailed("closed", str(exc)) from exc

    async def _relay(
        self,
        request: Any,
        method: str,
        path_qs: str,
        body: bytes,
        *,
        rewriter: Any,
        request_id: str | None = None,
        outcome: Any = None,
    ) -> Any:
        """Send one request to the decode engine and stream its response back."""
        import aiohttp
        from aiohttp import web

        from llmisvc.protocol.errors import APIError

        headers = _forward_headers(request.headers, drop=(REQUEST_ID,) if request_id else ())
        if request_id:
            headers.append((REQUEST_ID, request_id))
        if body:
            headers = [(k, v) for k, v in headers if k.lower() != "content-type"] + [("Content-Type", "application/json")]
        try:
            upstream = await self.session.request(
                method, self.decoder_url + path_qs, data=body or None, headers=headers, ssl=self.decoder_ssl
            )
        except aiohttp.ClientError as exc:
            if outcome is not None:
                await self.pd.release_prefill(outcome)
            error = APIError(f"decode engine {self.decoder_url} is unreachable: {exc}")
            error.status = 502
            return _error_response(error)

        async with upstream:
            if outcome is not None and upstream.status >= 400:
                # The decode engine rejected the request (for example a prompt over its
                # context length), so no engine will read the prefill blocks.
                await self.pd.release_prefill(outcome)
            reply_headers = {
                key: value
                for key, value in upstream.headers.items()
                if key.lower() not in _DROPPED_RESPONSE_HEADERS
            }
            streaming = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
            if rewriter is not None and not streaming:
                payload = rewriter.rewrite_json(await upstream.read())
                return web.Response(status=upstream.status, body=payload, headers=reply_headers)

            response = web.StreamResponse(status=upstream.status, headers=reply_headers)
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                data = rewriter.feed(chunk) if rewriter is not None else chunk
                if data:
                    await response.write(data)
            if rewriter is not None:
                tail = rewriter.flush()
                if tail:
                    await response.write(tail)
            await response.write_eof()
            return response


# Headers the relay recomputes (framing) or never forwards.
_DROPPED_RESPONSE_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})


def _forward_headers(headers: Any, drop: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """Return the client's headers minus hop-by-hop, framing and routing headers."""
    skip = HOP_BY_HOP | CLIENT_ROUTING_HEADERS | {"host", "content-length", *drop}
    return [(key, value) for key, value in headers.items() if key.lower() not in skip]


def _error_response(error: Any) -> Any:
    from aiohttp import web

    from .jsonutil import dumps

    return web.Response(status=error.status, body=dumps(error.body()), headers={"Content-Type": "application/json"})
