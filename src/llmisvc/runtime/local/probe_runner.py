"""Run one health probe against a replica's port: HTTP GET or a TCP connect."""

from __future__ import annotations

import asyncio
import ssl

import aiohttp

from llmisvc.controller.probes import Probe

# Replicas serve HTTPS only with their own certificates (vLLM's --ssl-certfile), which a
# probe on 127.0.0.1 trusts as the kubelet does: without verifying them.
_NO_VERIFY = ssl.create_default_context()
_NO_VERIFY.check_hostname = False
_NO_VERIFY.verify_mode = ssl.CERT_NONE


async def run_probe(session: aiohttp.ClientSession, probe: Probe, port: int, scheme: str) -> tuple[bool, str]:
    """Probe 127.0.0.1:`port` once with `scheme` ("HTTP" or "HTTPS").

    Returns (healthy, detail): healthy on an HTTP status in [200, 400) or an accepted
    TCP connection, like the kubelet; detail describes a failure.
    """
    try:
        if probe.kind == "tcp":
            _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), probe.timeout_s)
            writer.close()
            return True, ""
        url = f"{scheme.lower()}://127.0.0.1:{port}{probe.path}"
        timeout = aiohttp.ClientTimeout(total=probe.timeout_s)
        async with session.get(url, timeout=timeout, ssl=_NO_VERIFY if scheme == "HTTPS" else None) as response:
            if 200 <= response.status < 400:
                return True, ""
            return False, f"HTTP probe failed with status code {response.status}"
    except asyncio.TimeoutError:
        return False, f"probe timed out after {probe.timeout_s:g}s"
    except (aiohttp.ClientError, OSError) as exc:
        return False, f"probe failed: {exc.__class__.__name__}: {exc}"
