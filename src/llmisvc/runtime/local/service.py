"""One service's replicas on this machine: reconcile toward a plan, route, report status.

`ServiceRuntime.reconcile` is the declarative step behind `apply`. It scales each workload
and rolls a changed template out one replica at a time: start the new replica, wait until
it is ready, stop routing to the old one, wait for its in-flight requests, stop it. Then it
waits until every replica is ready. Applies to one service run one at a time.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import aiohttp

from llmisvc.controller.machine import Machine
from llmisvc.controller.plan import Plan, Workload
from llmisvc.controller.status import ObservedService, ObservedWorkload, service_status
from llmisvc.runtime.local.devices import DeviceAllocator
from llmisvc.runtime.local.gateway_process import GatewayError, GatewayProcess
from llmisvc.runtime.local.paths import Home
from llmisvc.runtime.local.probe_runner import run_probe
from llmisvc.runtime.local.process import ProcessRef, is_alive, terminate
from llmisvc.runtime.local.replica import (
    Replica,
    ReplicaRecord,
    new_replica_id,
    record_from_dict,
    record_to_dict,
)
from llmisvc.runtime.local.store import Event, Store

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

# How often `apply` reports which replicas are still loading: at most every 5 seconds when
# something changed, and every 30 seconds when nothing did.
_PROGRESS_INTERVAL_S = 5.0
_QUIET_PROGRESS_INTERVAL_S = 30.0


class ReconcileError(RuntimeError):
    """A reconcile step failed, for example a replica never became ready; the message names the replica."""


@dataclass
class RuntimeContext:
    """Objects shared by every service of the control process."""

    home: Home
    store: Store
    session: aiohttp.ClientSession
    gateway: GatewayProcess
    devices: DeviceAllocator
    machine: Machine


class ServiceRuntime:
    """Replicas, routing and status of the service `plan` describes."""

    def __init__(self, plan: Plan, context: RuntimeContext):
        self.plan = plan
        self._context = context
        self.replicas: dict[str, list[Replica]] = {}
        self.lock = asyncio.Lock()
        self.router_ready = False
        self.router_message = "not registered with the gateway yet"
        self.rollout_message: str | None = None
        self.status: dict = {}
        self._sync_task: asyncio.Task | None = None
        self._sync_again = False
        self._reconcile_task: asyncio.Task | None = None
        self._sync_lock = asyncio.Lock()

    @property
    def namespace(self) -> str:
        return self.plan.namespace

    @property
    def name(self) -> str:
        return self.plan.name

    def all_replicas(self) -> list[Replica]:
        return [replica for replicas in self.replicas.values() for replica in replicas]

    # events and persistence

    def event(self, type_: str, reason: str, message: str, obj: str | None = None) -> None:
        """Record an event for this service and log it."""
        event = Event(time.time(), type_, reason, obj or f"llminferenceservice/{self.name}", message)
        self._context.store.add_event(self.namespace, self.name, event)
        log = logger.warning if type_ == "Warning" else logger.info
        log("%s/%s %s: %s", self.namespace, self.name, reason, message)

    def _persist(self, replica: Replica) -> None:
        if replica.state in ("Terminating", "Stopped"):
            return
        self._context.store.put_replica(replica.id, self.namespace, self.name, record_to_dict(replica.record))

    def _on_replica_change(self, replica: Replica) -> None:
        self._persist(replica)
        self.schedule_gateway_sync()

    # replicas

    def _new_replica(self, workload: Workload, slot: int, record: ReplicaRecord | None = None, ready: bool = False) -> Replica:
        if record is None:
            replica_id = new_replica_id(workload)
            log_path = self._context.home.service_log_dir(self.namespace, self.name) / f"{replica_id}.log"
            record = ReplicaRecord(replica_id, workload.component, slot, workload.revision, str(log_path), time.time())
            devices = self._context.devices.claim(replica_id, workload.gpus_per_replica)
            if devices is None:
                raise ReconcileError(
                    f"replica {replica_id} needs {workload.gpus_per_replica} nvidia.com/gpu but only "
                    f"{self._context.devices.free_count} are free on this machine"
                )
            record.devices = devices
        replica = Replica(
            record,
            workload,
            self._context.session,
            gpu_visible=self._context.machine.gpu_count > 0,
            on_change=self._on_replica_change,
            on_event=lambda type_, reason, message, replica_id=record.id: self.event(type_, reason, message, f"replica/{replica_id}"),
        )
        replica.ready = ready
        self.replicas.setdefault(workload.component, []).append(replica)
        self._persist(replica)
        replica.start()
        return replica

    async def adopt(self) -> None:
        """Resume supervising the replicas the store records.

        A replica whose process still runs and passes its readiness probe is adopted as
        ready, so the gateway keeps routing to it without a gap. The others are restarted.
        """
        for data in self._context.store.list_replicas(self.namespace, self.name):
            record = record_from_dict(data)
            workload = self.plan.workload(record.component)
            if workload is None or workload.revision != record.revision:
                # The process belongs to an older template; adopt it under the workload so the
                # next reconcile rolls it out properly.
                workload = _workload_for_record(self.plan, record)
            self._context.devices.restore(record.id, record.devices)
            ready = False
            if record.pid is not None and is_alive(ProcessRef(record.pid, record.start_ticks or 0)) and record.port:
                ready, detail = await run_probe(self._context.session, workload.readiness, record.port, workload.serving_scheme)
                if not ready:
                    logger.info("replica %s runs but is not ready (%s); restarting it", record.id, detail)
                    await terminate(ProcessRef(record.pid, record.start_ticks or 0), None, workload.grace_period_s)
            self._new_replica(workload, record.slot, record, ready=ready)

    async def _drain_and_stop(self, replicas: list[Replica], reason: str) -> None:
        """Stop routing to `replicas`, wait for their in-flight requests, then stop them."""
        if not replicas:
            return
        for replica in replicas:
            replica.draining = True
        await self.sync_gateway()
        grace = max(replica.workload.grace_period_s for replica in replicas)
        deadline = time.monotonic() + grace
        for replica in replicas:
            while replica.address and time.monotonic() < deadline:
                try:
                    if await self._context.gateway.in_flight(self.namespace, self.name, replica.address) == 0:
                        break
                except (GatewayError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    logger.warning("cannot read in-flight requests of %s from the gateway: %s", replica.id, exc)
                    break
                await asyncio.sleep(0.2)
        remaining = max(1.0, deadline - time.monotonic())
        await asyncio.gather(*(replica.stop(remaining) for replica in replicas))
        for replica in replicas:
            self.replicas[replica.record.component].remove(replica)
            self._context.store.delete_replica(replica.id)
            self._context.devices.release(replica.id)
            self.event("Normal", "Killing", f"stopped replica {replica.id}: {reason}", f"replica/{replica.id}")

    # reconcile

    async def reconcile(self, plan: Plan, progress: Progress, wait_timeout_s: float | None = None) -> None:
        """Bring the running replicas to `plan` and wait until they are ready.

        Raises ReconcileError when a new replica does not become ready (the old replicas
        keep serving) or the wait times out.
        """
        async with self.lock:
            self._reconcile_task = asyncio.current_task()
            try:
                await self._reconcile_locked(plan, progress, wait_timeout_s)
            finally:
                self._reconcile_task = None

    async def _reconcile_locked(self, plan: Plan, progress: Progress, wait_timeout_s: float | None) -> None:
        self.plan = plan
        if plan.stopped:
            await self._stop_everything("stopped by the serving.kserve.io/stop annotation")
            self.event("Normal", "Stopped", "workloads stopped by the serving.kserve.io/stop annotation")
            return
        for warning in plan.warnings:
            self.event("Warning", "PlanWarning", warning)

        wanted = {workload.component for workload in plan.workloads}
        for component, replicas in list(self.replicas.items()):
            if component not in wanted:
                await self._drain_and_stop(list(replicas), f"workload {component} removed from the spec")

        for workload in plan.workloads:
            await self._reconcile_workload(workload, progress)
        await self.sync_gateway()
        await self._wait_ready(progress, wait_timeout_s)
        # Readiness changes reach the gateway from a background task; push once more so
        # the service routes to every ready replica before apply returns.
        await self.sync_gateway()

    async def _reconcile_workload(self, workload: Workload, progress: Progress) -> None:
        replicas = self.replicas.setdefault(workload.component, [])
        for replica in replicas:
            if replica.record.revision == workload.revision:
                replica.workload = workload

        excess = len(replicas) - workload.replicas
        if excess > 0:
            # Remove outdated and unready replicas first, so scaling down keeps the best ones.
            victims = sorted(replicas, key=lambda r: (r.record.revision == workload.revision, r.ready, -r.record.slot))[:excess]
            await self._drain_and_stop(victims, f"scaled {workload.name} down to {workload.replicas}")
            self.event("Normal", "ScaledDown", f"scaled {workload.name} down to {workload.replicas} replicas")

        outdated = sorted((r for r in replicas if r.record.revision != workload.revision), key=lambda r: (r.ready, r.record.slot))
        for old in outdated:
            await self._replace(old, workload, progress)
        if outdated:
            self.rollout_message = None
            self.event("Normal", "RolledOut", f"rolled out revision {workload.revision} of {workload.name} to {len(outdated)} replicas")

        missing = workload.replicas - len(replicas)
        if missing > 0:
            used = {replica.record.slot for replica in replicas}
            slots = [slot for slot in range(workload.replicas + len(used)) if slot not in used][:missing]
            for slot in slots:
                self._new_replica(workload, slot)
            self.event("Normal", "ScaledUp", f"scaled {workload.name} up to {workload.replicas} replicas")
            progress(f"starting {missing} {workload.component} replica(s) of {self.name} ({workload.engine} engine)")

    async def _replace(self, old: Replica, workload: Workload, progress: Progress) -> None:
        """Replace `old` with a replica at `workload`'s revision without dropping requests."""
        self.rollout_message = f"rolling out revision {workload.revision} of {workload.name}: replacing {old.id}"
        progress(self.rollout_message)
        # An unready replica serves nothing, and a device-bound one may hold the only free
        # device, so those are stopped before their successor starts.
        if not old.ready or self._context.devices.free_count < workload.gpus_per_replica:
            await self._drain_and_stop([old], f"replaced by revision {workload.revision}")
            new = self._new_replica(workload, old.record.slot)
            if not await self._wait_replica(new, workload, progress):
                raise ReconcileError(f"replica {new.id} of revision {workload.revision} did not become ready; run `llmisvc describe {self.name}`")
            return
        new = self._new_replica(workload, old.record.slot)
        if not await self._wait_replica(new, workload, progress):
            await self._drain_and_stop([new], "rollout failed")
            self.rollout_message = None
            self.event("Warning", "RolloutFailed", f"new replica of revision {workload.revision} did not become ready; {old.id} keeps serving")
            raise ReconcileError(
                f"rollout of {workload.name} stopped: the new replica did not become ready "
                f"(last termination: {(new.record.last_termination or {}).get('message', 'none')}); the old replicas keep serving"
            )
        await self.sync_gateway()
        await self._drain_and_stop([old], f"replaced by revision {workload.revision}")

    async def _wait_replica(self, replica: Replica, workload: Workload, progress: Progress) -> bool:
        timeout = workload.startup_timeout_s
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await replica.wait_ready_or_failed(_PROGRESS_INTERVAL_S):
                return True
            if replica.crash_looping:
                return False
            progress(self._loading_line([replica]))
        return False

    async def _wait_ready(self, progress: Progress, timeout_s: float | None) -> None:
        """Wait until every replica is ready, reporting the loading ones periodically."""
        timeout_s = timeout_s or max((w.startup_timeout_s for w in self.plan.workloads), default=60.0)
        deadline = time.monotonic() + timeout_s
        last_report = 0.0
        last_status = ""
        while True:
            replicas = self.all_replicas()
            if all(replica.ready for replica in replicas):
                return
            looping = [replica.id for replica in replicas if replica.crash_looping]
            if looping:
                raise ReconcileError(f"replicas in CrashLoopBackOff: {', '.join(looping)}; run `llmisvc describe {self.name}`")
            if time.monotonic() > deadline:
                raise ReconcileError(f"timed out after {timeout_s:.0f}s waiting for replicas to become ready; run `llmisvc describe {self.name}`")
            # Report when a replica's state or last log line changed, and otherwise now and
            # then, so a long model load shows it is alive without flooding the terminal.
            waiting = [replica for replica in replicas if not replica.ready]
            status = "|".join(f"{r.id}:{r.state}:{_last_line(Path(r.record.log_path))}" for r in waiting)
            since_report = time.monotonic() - last_report
            if (status != last_status and since_report >= _PROGRESS_INTERVAL_S) or since_report >= _QUIET_PROGRESS_INTERVAL_S:
                last_report, last_status = time.monotonic(), status
                progress(self._loading_line(waiting))
            await asyncio.sleep(0.2)

    def _loading_line(self, replicas: list[Replica]) -> str:
        """Describe loading replicas: state, seconds since start and the last log line."""
        parts = []
        ready = sum(1 for replica in self.all_replicas() if replica.ready)
        for replica in replicas:
            seconds = time.time() - replica.record.created
            last_line = _last_line(Path(replica.record.log_path))
            state = "loading" if replica.state == "Starting" else replica.state.lower()
            parts.append(f"  {replica.id} ({replica.record.component}): {state} for {seconds:.0f}s" + (f": {last_line}" if last_line else ""))
        return f"{ready}/{len(self.all_replicas())} replicas ready, waiting for:\n" + "\n".join(parts)

    async def _stop_everything(self, reason: str) -> None:
        for replicas in list(self.replicas.values()):
            await self._drain_and_stop(list(replicas), reason)
        async with self._sync_lock:
            await self._context.gateway.delete_service(self.namespace, self.name)
        self.router_ready = False
        self.router_message = reason

    def interrupt_reconcile(self) -> None:
        """Cancel a running reconcile (an apply still waiting for replicas), so delete need not wait for it."""
        if self._reconcile_task is not None:
            self._reconcile_task.cancel()

    async def delete(self) -> None:
        """Drain and stop every replica and remove the service from the gateway."""
        self.interrupt_reconcile()
        async with self.lock:
            if self._sync_task is not None:
                self._sync_task.cancel()
            await self._stop_everything("service deleted")

    async def shutdown(self) -> None:
        """Drain and stop every replica but keep the stored spec (control process shutdown)."""
        self.interrupt_reconcile()
        async with self.lock:
            await self._stop_everything("control process shutting down")

    def detach(self) -> None:
        """Leave every process running for the next control process to adopt."""
        for replica in self.all_replicas():
            replica.detach()
        if self._sync_task is not None:
            self._sync_task.cancel()

    # gateway

    def gateway_entry(self) -> dict:
        """Build the admin API service entry: model, shape, scheduler config, endpoints."""
        plan = self.plan
        shape = "scheduler" if plan.aggregated_reason else plan.shape
        endpoints = []
        for replica in self.all_replicas():
            if replica.draining or replica.address is None or replica.state in ("Terminating", "Stopped"):
                continue
            # Unready replicas are left out, as Kubernetes leaves them out of a Service's
            # ready endpoints. This also keeps the gateway from health-probing a replica that
            # is still loading and then holding it as unhealthy until its next probe.
            if not replica.ready:
                continue
            endpoints.append({"address": replica.address, "role": replica.workload.role, "ready": replica.ready, "labels": dict(replica.workload.labels)})
        return {
            "model": plan.model_name,
            "shape": shape,
            "scheduler_config": None if plan.aggregated_reason else plan.scheduler_config,
            "criticality": plan.criticality or "Standard",
            "engine_api_key": None,
            "endpoints": endpoints,
        }

    async def sync_gateway(self) -> None:
        """Push this service's routing state to the gateway now.

        Pushes are serialised and each builds its entry only once it holds the lock, so an
        older view can never overwrite a newer one at the gateway.
        """
        async with self._sync_lock:
            await self._push_entry()

    async def _push_entry(self) -> None:
        if self.plan.stopped:
            return
        try:
            await self._context.gateway.put_service(self.namespace, self.name, self.gateway_entry())
            self.router_ready = True
            self.router_message = f"routed by the gateway at {self._context.gateway.base_url}"
        except (GatewayError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            self.router_ready = False
            self.router_message = f"gateway update failed: {exc}"
            logger.warning("%s/%s: gateway update failed: %s", self.namespace, self.name, exc)

    def schedule_gateway_sync(self) -> None:
        """Push routing state soon; changes that arrive during a push trigger one more push."""
        if self._sync_task is not None and not self._sync_task.done():
            self._sync_again = True
            return
        self._sync_task = asyncio.create_task(self._sync_loop(), name=f"gateway sync {self.namespace}/{self.name}")

    async def _sync_loop(self) -> None:
        while True:
            self._sync_again = False
            await self.sync_gateway()
            if not self._sync_again:
                return

    # status

    def observe(self) -> ObservedService:
        workloads = []
        for workload in self.plan.workloads:
            replicas = self.replicas.get(workload.component, [])
            workloads.append(
                ObservedWorkload(
                    component=workload.component,
                    desired=workload.replicas,
                    ready=sum(1 for replica in replicas if replica.ready and not replica.draining),
                    updated=sum(1 for replica in replicas if replica.record.revision == workload.revision),
                    crash_looping=[replica.id for replica in replicas if replica.crash_looping and not replica.ready],
                    oom_killed=[
                        replica.id for replica in replicas
                        if (replica.record.last_termination or {}).get("reason") == "OOMKilled" and not replica.ready
                    ],
                )
            )
        return ObservedService(
            workloads=workloads,
            router_ready=self.router_ready,
            router_message=self.router_message,
            uses_scheduler=self.plan.shape in ("scheduler", "pd"),
            stopped=self.plan.stopped,
            rollout_message=self.rollout_message,
            aggregated_reason=self.plan.aggregated_reason,
        )

    def refresh_status(self, generation: int | None, url: str) -> dict:
        """Recompute the status dict from the current observation; returns it."""
        self.status = service_status(self.observe(), generation, url, self.status)
        return self.status


def _workload_for_record(plan: Plan, record: ReplicaRecord) -> Workload:
    """Return a stand-in workload for an adopted replica of an older revision."""
    current = plan.workload(record.component) or plan.workloads[0]
    stand_in = Workload.from_dict(current.to_dict())
    stand_in.component = record.component
    stand_in.revision = record.revision
    return stand_in


# Timestamp, level and logger name that llmisvc processes put before each log message.
_LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d[ T][\d:,.]+ [A-Z]+ [\w.]+: ")


def _last_line(path: Path) -> str:
    """Return the last non-empty log line of `path` without its timestamp prefix."""
    try:
        with open(path, "rb") as log:
            log.seek(max(0, path.stat().st_size - 4096))
            lines = [line for line in log.read().decode("utf-8", "replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return _LOG_PREFIX.sub("", lines[-1])[:160] if lines else ""
