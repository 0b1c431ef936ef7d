"""The control process: owns the store, the gateway and every service's replicas.

It listens on a Unix socket under LLMISVC_HOME (mode 0600, so only its owner can drive
it). Each request is one JSON line `{"op": ..., ...}`; the reply is zero or more
`{"progress": "..."}` lines and one final `{"ok": true, "result": ...}` or
`{"ok": false, "error": "...", "kind": "..."}` line.

On start it adopts the gateway and the replicas a previous control process left running
and restarts the rest from the stored specs. SIGTERM or SIGINT drains and stops every
replica within its grace period, then the gateway. When the last service is deleted the
control process stops the gateway and exits, so nothing of llmisvc keeps running.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from typing import Any

import aiohttp

from llmisvc.api import SpecError
from llmisvc.api.load import load_document, load_documents
from llmisvc.controller.errors import PlanError
from llmisvc.controller.machine import Machine
from llmisvc.controller.plan import Plan, build_plan
from llmisvc.runtime.local.devices import DeviceAllocator
from llmisvc.runtime.local.gateway_process import GatewayError, GatewayProcess
from llmisvc.runtime.local.paths import Home
from llmisvc.runtime.local.service import ReconcileError, RuntimeContext, ServiceRuntime
from llmisvc.runtime.local.store import Store

logger = logging.getLogger(__name__)

SERVICE_KIND = "LLMInferenceService"
CONFIG_KIND = "LLMInferenceServiceConfig"
_MAX_REQUEST_BYTES = 16 * 1024 * 1024
# Operations after which a control process without services exits. `ping` and `apply` are
# not among them: the CLI pings a freshly started control process before applying.
_EXIT_WHEN_EMPTY_AFTER = frozenset({"delete", "delete_config", "get", "describe", "logs"})


class ApplyRejected(Exception):
    """Documents of one apply that cannot run, listed per service with their field paths."""


class ControlServer:
    """Serve control requests for `home` with the gateway on `gateway_port`."""

    def __init__(self, home: Home, gateway_port: int):
        self.home = home
        self.gateway_port = gateway_port
        self.services: dict[str, ServiceRuntime] = {}
        self._stop = asyncio.Event()
        self._context: RuntimeContext | None = None
        self._tasks: set[asyncio.Task] = set()

    # start-up and shutdown

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT or the last service is deleted; returns the exit code."""
        self.home.ensure()
        store = Store(self.home.store)
        machine = Machine.detect()
        session = aiohttp.ClientSession()
        gateway = GatewayProcess(self.home, self.gateway_port, store, session, on_restart=self._resync_gateway)
        self._context = RuntimeContext(self.home, store, session, gateway, DeviceAllocator(machine.gpu_ids), machine)
        server = None
        # Handlers first: a signal during start-up must still stop the gateway and replicas
        # started so far, which a KeyboardInterrupt would leave behind.
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        try:
            await gateway.ensure_running()
            gateway.watch()
            await self._restore_services()
            server = await self._listen()
            self.home.control_pid.write_text(str(os.getpid()))
            logger.info("control process %d ready on %s (gateway port %d)", os.getpid(), self.home.socket, self.gateway_port)
            await self._stop.wait()
            logger.info("control process stopping: draining %d services", len(self.services))
            server.close()
            await asyncio.gather(*(service.shutdown() for service in self.services.values()), return_exceptions=True)
            await gateway.stop()
            return 0
        except GatewayError as exc:
            logger.error("%s", exc)
            return 1
        finally:
            if server is not None:
                server.close()
            for task in list(self._tasks):
                task.cancel()
            for path in (self.home.socket, self.home.control_pid):
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
            await session.close()
            store.close()

    async def _restore_services(self) -> None:
        """Adopt or restart every stored service and converge it in the background."""
        store = self._context.store
        for stored in store.list_services():
            plan = Plan.from_dict(stored.plan)
            service = ServiceRuntime(plan, self._context)
            await service.adopt()
            self.services[plan.key] = service
            self._spawn(self._converge(service, plan), f"converge {plan.key}")

    async def _converge(self, service: ServiceRuntime, plan: Plan) -> None:
        try:
            await service.reconcile(plan, lambda line: logger.info("%s: %s", plan.key, line))
        except ReconcileError as exc:
            logger.error("%s: %s", plan.key, exc)

    async def _resync_gateway(self) -> None:
        for service in self.services.values():
            await service.sync_gateway()

    def _spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _listen(self) -> asyncio.AbstractServer:
        try:
            self.home.socket.unlink()
        except FileNotFoundError:
            pass
        old_umask = os.umask(0o177)
        try:
            server = await asyncio.start_unix_server(self._handle, path=str(self.home.socket), limit=_MAX_REQUEST_BYTES)
        finally:
            os.umask(old_umask)
        os.chmod(self.home.socket, 0o600)
        return server

    # requests

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def send(message: dict) -> None:
            writer.write(json.dumps(message).encode() + b"\n")
            await writer.drain()

        op = None
        try:
            line = await reader.readline()
            request = json.loads(line)
            op = request.get("op")
            handler = getattr(self, f"_op_{op}", None) if isinstance(op, str) else None
            if handler is None:
                await send({"ok": False, "error": f"unknown operation {op!r}", "kind": "request"})
                return
            progress_queue: asyncio.Queue[str] = asyncio.Queue()
            # The operation runs in its own task: a client that disconnects mid-apply
            # leaves the apply running to completion, as with a Kubernetes API server.
            task = self._spawn(handler(request, progress_queue.put_nowait), f"op {op}")
            while not task.done() or not progress_queue.empty():
                getter = asyncio.ensure_future(progress_queue.get())
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    await send({"progress": getter.result()})
                else:
                    getter.cancel()
            if task.cancelled():
                await send({"ok": False, "error": f"{op} interrupted: the service was deleted or the control process is stopping", "kind": "interrupted"})
                return
            try:
                result = task.result()
                await send({"ok": True, "result": result})
            except (SpecError, PlanError, ApplyRejected) as exc:
                await send({"ok": False, "error": str(exc), "kind": "spec"})
            except (ReconcileError, GatewayError, LookupError) as exc:
                await send({"ok": False, "error": str(exc).strip("'\""), "kind": exc.__class__.__name__})
        except (ConnectionError, json.JSONDecodeError) as exc:
            logger.warning("control request failed: %s", exc)
        except Exception:
            logger.exception("control request failed")
            try:
                await send({"ok": False, "error": "internal error in the control process; see control.log", "kind": "internal"})
            except ConnectionError:
                pass
        finally:
            writer.close()
        # Started on demand, the control process leaves nothing running once it has no
        # services: after the last delete, or after a read-only request found none.
        if not self.services and op in _EXIT_WHEN_EMPTY_AFTER and not self._stop.is_set():
            logger.info("no services left; control process exiting")
            self._stop.set()

    async def _op_ping(self, request: dict, progress) -> dict:
        return {"pid": os.getpid(), "gateway_port": self.gateway_port, "services": len(self.services)}

    async def _op_apply(self, request: dict, progress) -> dict:
        """Validate and plan every document first, then act; a rejected file changes nothing."""
        resources = load_documents(request["yaml"])
        store = self._context.store
        plans: list[tuple[Any, Plan]] = []
        new_configs = [resource for resource in resources if resource.kind == CONFIG_KIND]
        errors = []
        for resource in resources:
            if resource.kind != SERVICE_KIND:
                continue
            try:
                plans.append((resource, self.plan(resource, new_configs)))
            except (SpecError, PlanError) as exc:
                errors.append(f"{SERVICE_KIND} {resource.namespace}/{resource.name}:\n{exc}")
        # Stored services whose baseRefs name a config in this file are planned again, so a
        # config change reaches every service built on it.
        for resource in self._dependents(new_configs, {(r.namespace, r.name) for r, _ in plans}):
            try:
                plans.append((resource, self.plan(resource, new_configs)))
            except (SpecError, PlanError) as exc:
                errors.append(f"{SERVICE_KIND} {resource.namespace}/{resource.name} (its baseRefs name a config in this file):\n{exc}")
        if errors:
            raise ApplyRejected("\n".join(errors))

        actions = [self._action(resource, plan) for resource, plan in plans]
        if request.get("dry_run"):
            return {"dry_run": True, "actions": actions, "plans": [plan.to_dict() for _, plan in plans]}

        for config in new_configs:
            store.put_config(config.namespace, config.name, config.obj)
        results = []
        for (resource, plan), action in zip(plans, actions):
            generation = store.put_service(plan.namespace, plan.name, resource.obj, plan.to_dict(), bump_generation=action["action"] == "configure")
            service = self.services.get(plan.key)
            if service is None:
                service = ServiceRuntime(plan, self._context)
                self.services[plan.key] = service
            past = {"create": "created", "configure": "configured"}.get(action["action"], action["action"])
            progress(f"{SERVICE_KIND} {plan.key} {past} (generation {generation})")
            await service.reconcile(plan, progress, request.get("wait_timeout_s"))
            results.append(self._summary(service, generation))
        return {"services": results, "configs": [f"{c.namespace}/{c.name}" for c in new_configs]}

    def _dependents(self, configs: list, skip: set[tuple[str, str]]) -> list:
        """Return stored service resources outside `skip` whose baseRefs name one of `configs`."""
        names = {config.name for config in configs}
        dependents = []
        for stored in self._context.store.list_services():
            refs = {ref.get("name") for ref in (stored.resource.get("spec") or {}).get("baseRefs") or []}
            if (stored.namespace, stored.name) in skip or not refs & names:
                continue
            resource, _ = load_document(stored.resource)
            if resource is not None:
                dependents.append(resource)
        return dependents

    def plan(self, resource, new_configs: list) -> Plan:
        """Resolve `resource` against stored and newly applied configs and plan it."""
        from llmisvc.api import resolve

        configs = {}
        for obj in self._context.store.list_configs():
            stored, _ = load_document(obj)
            if stored is not None:
                configs[stored.name] = stored
        for config in new_configs:
            configs[config.name] = config
        resolved = resolve(resource, configs)
        return build_plan(resolved, self._context.machine, pvc_root=self.home.volumes)

    def _action(self, resource, plan: Plan) -> dict:
        """Describe what applying `plan` changes: create, configure or unchanged."""
        stored = self._context.store.get_service(plan.namespace, plan.name)
        if stored is None:
            return {"service": plan.key, "action": "create", "changes": [f"start {w.replicas} {w.component} replica(s)" for w in plan.workloads]}
        before = Plan.from_dict(stored.plan)
        changes = []
        for workload in plan.workloads:
            old = before.workload(workload.component)
            if old is None:
                changes.append(f"start {workload.replicas} {workload.component} replica(s)")
                continue
            if old.revision != workload.revision:
                changes.append(f"roll out {workload.component} revision {old.revision} -> {workload.revision} one replica at a time")
            if old.replicas != workload.replicas:
                changes.append(f"scale {workload.component} {old.replicas} -> {workload.replicas}")
        for old in before.workloads:
            if plan.workload(old.component) is None:
                changes.append(f"stop the {old.component} workload")
        if before.stopped != plan.stopped:
            changes.append("stop all replicas" if plan.stopped else "start replicas again")
        if stored.resource != resource.obj or before.to_dict() != plan.to_dict():
            return {"service": plan.key, "action": "configure", "changes": changes or ["update routing settings"]}
        return {"service": plan.key, "action": "unchanged", "changes": changes}

    def _find(self, request: dict) -> ServiceRuntime:
        key = f"{request.get('namespace') or 'default'}/{request['name']}"
        service = self.services.get(key)
        if service is None:
            raise LookupError(f"{SERVICE_KIND} {key} not found")
        return service

    def _summary(self, service: ServiceRuntime, generation: int | None = None) -> dict:
        stored = self._context.store.get_service(service.namespace, service.name)
        url = f"http://127.0.0.1:{self.gateway_port}/{service.namespace}/{service.name}"
        status = service.refresh_status(stored.generation if stored else generation, url)
        conditions = status["conditions"]
        ready = next((c for c in conditions if c["type"] == "Ready"), {})
        replicas = service.all_replicas()
        desired = sum(w.replicas for w in service.plan.workloads) if not service.plan.stopped else 0
        return {
            "namespace": service.namespace,
            "name": service.name,
            "url": url,
            "gateway_url": f"http://127.0.0.1:{self.gateway_port}",
            "model": service.plan.model_name,
            "shape": service.plan.shape,
            "ready": ready.get("status", "Unknown"),
            "reason": ready.get("reason", ""),
            "message": ready.get("message", ""),
            "replicas_ready": sum(1 for r in replicas if r.ready and not r.draining),
            "replicas_desired": desired,
            # One entry per pool (main/decode and prefill), so `get -o wide` shows both.
            "pools": [
                {
                    "component": workload.component,
                    "role": workload.role,
                    "ready": sum(1 for r in service.replicas.get(workload.component, []) if r.ready and not r.draining),
                    "desired": workload.replicas if not service.plan.stopped else 0,
                }
                for workload in service.plan.workloads
            ],
            "generation": stored.generation if stored else generation,
            "age_s": time.time() - stored.created if stored else 0.0,
            "conditions": conditions,
            "status": status,
        }

    async def _op_get(self, request: dict, progress) -> dict:
        services = [self._find(request)] if request.get("name") else list(self.services.values())
        summaries = []
        for service in services:
            summary = self._summary(service)
            if request.get("full"):
                stored = self._context.store.get_service(service.namespace, service.name)
                summary["resource"] = {**(stored.resource if stored else {}), "status": summary["status"]}
            summaries.append(summary)
        return {"services": summaries}

    async def _op_describe(self, request: dict, progress) -> dict:
        service = self._find(request)
        stored = self._context.store.get_service(service.namespace, service.name)
        events = self._context.store.list_events(service.namespace, service.name, limit=int(request.get("events", 30)))
        return {
            **self._summary(service),
            "plan": service.plan.to_dict(),
            "spec": (stored.resource.get("spec") if stored else {}),
            "replicas": [replica.describe() for replica in sorted(service.all_replicas(), key=lambda r: (r.record.component, r.record.slot))],
            "events": [event.__dict__ for event in events],
            "gateway": {"pid": self._context.gateway.pid, "port": self.gateway_port, "restarts": self._context.gateway.restarts},
        }

    async def _op_logs(self, request: dict, progress) -> dict:
        """Return the log file paths for `logs`; the CLI reads the files itself."""
        if request.get("scheduler"):
            self._find(request)
            return {"paths": [str(self.home.gateway_log)], "replicas": ["gateway"]}
        service = self._find(request)
        component = "prefill" if request.get("prefill") else "main"
        replicas = sorted(service.replicas.get(component, []), key=lambda r: (r.record.slot, r.record.created))
        if not replicas:
            raise LookupError(f"{SERVICE_KIND} {service.plan.key} has no {component} replicas")
        index = request.get("replica")
        if index is not None:
            if not 0 <= int(index) < len(replicas):
                raise LookupError(f"--replica {index} is out of range: {service.plan.key} has {len(replicas)} {component} replicas (0-{len(replicas) - 1})")
            replicas = [replicas[int(index)]]
        return {"paths": [r.record.log_path for r in replicas], "replicas": [r.id for r in replicas]}

    async def _op_delete(self, request: dict, progress) -> dict:
        service = self._find(request)
        progress(f"draining and stopping {len(service.all_replicas())} replicas of {service.plan.key}")
        await service.delete()
        self._context.store.delete_service(service.namespace, service.name)
        del self.services[service.plan.key]
        return {"deleted": service.plan.key}

    async def _op_delete_config(self, request: dict, progress) -> dict:
        """Delete a stored LLMInferenceServiceConfig; services built on it keep running as planned."""
        namespace, name = request.get("namespace") or "default", request["name"]
        if not self._context.store.delete_config(namespace, name):
            raise LookupError(f"{CONFIG_KIND} {namespace}/{name} not found")
        users = [
            f"{stored.namespace}/{stored.name}" for stored in self._context.store.list_services()
            if name in {ref.get("name") for ref in (stored.resource.get("spec") or {}).get("baseRefs") or []}
        ]
        return {"deleted": f"{namespace}/{name}", "referenced_by": users}

    async def _op_shutdown(self, request: dict, progress) -> dict:
        self._stop.set()
        return {"stopping": True}
