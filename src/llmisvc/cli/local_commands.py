"""`llmisvc apply|get|describe|logs|delete|control`: kubectl habits for local services.

Every command except `control` talks to the control process over its Unix socket;
`apply` starts the control process on demand. Heavy packages are never imported here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from llmisvc.runtime.local.client import EXIT_ALREADY_RUNNING, ControlClient, ControlError, ControlNotRunning
from llmisvc.runtime.local.paths import Home, gateway_port_from_env

SERVICE_RESOURCE = "llminferenceservice.serving.kserve.io"


def add_parser(subparsers, name: str, help: str) -> None:
    """Register command `name` (apply, get, describe, logs, delete or control)."""
    parser = subparsers.add_parser(name, help=help, description=help)
    if name in ("get", "describe", "logs", "delete"):
        parser.add_argument("-n", "--namespace", default=None, help="namespace of the service (default: default)")
    if name == "apply":
        parser.add_argument("-f", "--filename", required=True, type=Path, help="YAML file with LLMInferenceService and LLMInferenceServiceConfig documents")
        parser.add_argument("--dry-run", action="store_true", help="print what would change and the planned processes, start nothing")
        parser.add_argument("--gateway-port", type=int, default=None, help="port of the local gateway when this starts the control process (default: LLMISVC_GATEWAY_PORT or 8000)")
        parser.add_argument("--timeout", type=float, default=None, help="seconds to wait for replicas to become ready (default: the engine's start-up limit)")
        parser.set_defaults(func=run_apply)
    elif name == "get":
        parser.add_argument("name", nargs="?", help="service name (default: every service)")
        parser.add_argument("-o", "--output", choices=("yaml", "json", "wide"), help="output format")
        parser.set_defaults(func=run_get)
    elif name == "describe":
        parser.add_argument("name", help="service name")
        parser.set_defaults(func=run_describe)
    elif name == "logs":
        parser.add_argument("name", help="service name")
        which = parser.add_mutually_exclusive_group()
        which.add_argument("--prefill", action="store_true", help="show the prefill replicas instead of the main (decode) ones")
        which.add_argument("--scheduler", action="store_true", help="show the gateway's log, where the scheduler runs")
        parser.add_argument("--replica", type=int, default=None, help="index of one replica (0-based, in `describe` order; default: all)")
        parser.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until interrupted")
        parser.add_argument("--tail", type=int, default=None, help="lines to show from the end of each log (default: all)")
        parser.set_defaults(func=run_logs)
    elif name == "delete":
        parser.add_argument("name", nargs="?", help="service name")
        parser.add_argument("-f", "--filename", type=Path, help="delete the services named in this YAML file")
        parser.set_defaults(func=run_delete)
    elif name == "control":
        parser.add_argument("--gateway-port", type=int, default=None, help="port of the local gateway (default: LLMISVC_GATEWAY_PORT or 8000)")
        parser.set_defaults(func=run_control)


def _client() -> ControlClient:
    home = Home.from_env()
    if len(os.fsencode(home.socket)) > 107:
        raise SystemExit(f"error: LLMISVC_HOME {home.root} is too long for a Unix socket path; choose a shorter one")
    return ControlClient(home)


def _connected_client(for_configs: bool = False) -> ControlClient:
    """Return a client, starting the control process when services are stored.

    A stopped control process restarts the stored services on start, like a rebooted
    node; without a store there is nothing to start it for.
    """
    from llmisvc.runtime.local.store import stored_count

    client = _client()
    stored = stored_count(client.home.store) + (stored_count(client.home.store, "configs") if for_configs else 0)
    if stored > 0 and not client.is_running():
        client.ensure_started()
    return client


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# apply


def run_apply(args: argparse.Namespace) -> int:
    """Validate the file, start the control process if needed, apply and wait for readiness."""
    from llmisvc.api import SpecError
    from llmisvc.api.load import load_documents

    try:
        text = args.filename.read_text(encoding="utf-8")
    except OSError as exc:
        return _error(f"cannot read {args.filename}: {exc.strerror}")
    # Validate before starting anything, so a bad file never starts the control process.
    try:
        load_documents(text)
    except SpecError as exc:
        return _error(f"{args.filename} is invalid:\n{exc}")

    client = _client()
    if args.dry_run:
        return _dry_run(client, text)

    try:
        info = client.ensure_started(args.gateway_port)
    except ControlError as exc:
        return _error(str(exc))
    if args.gateway_port is not None and info.get("gateway_port") != args.gateway_port:
        print(f"warning: the control process already runs with gateway port {info.get('gateway_port')}; "
              f"--gateway-port {args.gateway_port} applies only when it starts", file=sys.stderr)
    try:
        result = client.call("apply", progress=_progress, yaml=text, wait_timeout_s=args.timeout)
    except ControlError as exc:
        if exc.kind == "spec":
            return _error(f"{args.filename} was rejected; nothing was changed:\n{exc}")
        return _error(str(exc))
    for config in result.get("configs", []):
        print(f"llminferenceserviceconfig.serving.kserve.io/{config} configured")
    for service in result["services"]:
        print(f"{SERVICE_RESOURCE}/{service['name']} ready" if service["ready"] == "True" else f"{SERVICE_RESOURCE}/{service['name']} {service['reason']}")
        print(f"  URL:   {service['url']}/v1  (OpenAI API)")
        print(f"  Model: {service['model']}  (also at {service['gateway_url']}/v1 with \"model\": \"{service['model']}\")")
        if service["reason"] == "PrefillDecodeAggregated":
            print(f"  Note:  {service['message']}")
    return 0


def _dry_run(client: ControlClient, text: str) -> int:
    """Print the plan, from the running control process when there is one, because only it has the current state."""
    try:
        result = client.call("apply", yaml=text, dry_run=True)
    except ControlNotRunning:
        result = _plan_locally(text)
    except ControlError as exc:
        return _error(f"rejected:\n{exc}")
    if result is None:
        return 1
    for action, plan in zip(result["actions"], result["plans"]):
        print(f"{SERVICE_RESOURCE}/{plan['name']} {action['action']} (dry run)")
        for change in action["changes"]:
            print(f"  - {change}")
        for workload in plan["workloads"]:
            print(f"  workload {workload['name']}: {workload['replicas']} x {workload['engine']} engine, role {workload['role']}, "
                  f"threads {workload['threads']}, devices {workload['gpus_per_replica']}, revision {workload['revision']}")
            print(f"    args: {' '.join(workload['engine_args'])}")
        for warning in plan["warnings"]:
            print(f"  warning: {warning}")
        if plan.get("aggregated_reason"):
            print(f"  note: {plan['aggregated_reason']}")
    return 0


def _plan_locally(text: str) -> dict | None:
    from llmisvc.api import SpecError, resolve
    from llmisvc.api.load import load_documents
    from llmisvc.controller.errors import PlanError
    from llmisvc.controller.machine import Machine
    from llmisvc.controller.plan import build_plan

    resources = load_documents(text)
    configs = {r.name: r for r in resources if r.kind == "LLMInferenceServiceConfig"}
    machine = Machine.detect()
    actions, plans, failed = [], [], False
    for resource in resources:
        if resource.kind != "LLMInferenceService":
            continue
        try:
            plan = build_plan(resolve(resource, configs), machine, pvc_root=Home.from_env().volumes)
        except (SpecError, PlanError) as exc:
            print(f"error: {resource.namespace}/{resource.name} was rejected:\n{exc}", file=sys.stderr)
            failed = True
            continue
        plans.append(plan.to_dict())
        actions.append({"service": plan.key, "action": "create", "changes": [f"start {w.replicas} {w.component} replica(s)" for w in plan.workloads]})
    return None if failed else {"actions": actions, "plans": plans}


# get and describe


def _age(seconds: float) -> str:
    """Format an age as kubectl does: 45s, 12m, 5h, 3d."""
    seconds = int(max(0, seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size * (2 if unit != "d" else 1):
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join("   ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def run_get(args: argparse.Namespace) -> int:
    """List services (NAME URL READY REASON AGE), or print them as YAML or JSON."""
    try:
        result = _connected_client().call("get", name=args.name, namespace=args.namespace, full=args.output in ("yaml", "json"))
        services = result["services"]
    except ControlNotRunning:
        if args.name:
            return _error(f"{SERVICE_RESOURCE} \"{args.name}\" not found")
        services = []
    except ControlError as exc:
        return _error(str(exc))

    if args.output in ("yaml", "json"):
        objects = [service["resource"] for service in services]
        document = objects[0] if args.name else {"apiVersion": "v1", "kind": "List", "items": objects}
        if args.output == "json":
            print(json.dumps(document, indent=2))
        else:
            import yaml

            print(yaml.safe_dump(document, sort_keys=False), end="")
        return 0
    if not services:
        print("No resources found.", file=sys.stderr)
        return 0
    header = ["NAME", "URL", "READY", "REASON", "AGE"]
    if args.output == "wide":
        header += ["REPLICAS", "MODEL", "SHAPE", "GENERATION", "POOLS"]
    rows = [header]
    for service in services:
        row = [service["name"], service["url"], service["ready"], service["reason"], _age(service["age_s"])]
        if args.output == "wide":
            row += [f"{service['replicas_ready']}/{service['replicas_desired']}", service["model"], service["shape"], str(service["generation"])]
            row.append(",".join(f"{pool['role']}:{pool['ready']}/{pool['desired']}" for pool in service.get("pools", [])))
        rows.append(row)
    print(_table(rows))
    return 0


def run_describe(args: argparse.Namespace) -> int:
    """Print a service's spec summary, conditions, replicas, last crash log tails and events."""
    try:
        info = _connected_client().call("describe", name=args.name, namespace=args.namespace)
    except ControlNotRunning:
        return _error(f"{SERVICE_RESOURCE} \"{args.name}\" not found")
    except ControlError as exc:
        return _error(str(exc))
    print(render_description(info), end="")
    return 0


def render_description(info: dict) -> str:
    """Format a `describe` result as kubectl-style text."""
    lines = [
        f"Name:         {info['name']}",
        f"Namespace:    {info['namespace']}",
        f"URL:          {info['url']}",
        f"Model:        {info['model']}",
        f"Shape:        {info['shape']}",
        f"Generation:   {info['generation']}",
        f"Age:          {_age(info['age_s'])}",
        f"Replicas:     {info['replicas_ready']}/{info['replicas_desired']} ready",
        f"Gateway:      pid {info['gateway']['pid']}, port {info['gateway']['port']}, restarts {info['gateway']['restarts']}",
    ]
    lines += _workload_lines(info["plan"])

    lines.append("Conditions:")
    rows = [["Type", "Status", "Reason", "Message"]]
    rows += [[c["type"], c["status"], c.get("reason", ""), c.get("message", "")] for c in info["conditions"]]
    lines += ["  " + line for line in _table(rows).splitlines()]

    lines.append("Replicas:")
    for replica in info["replicas"]:
        lines += _replica_lines(replica)

    lines.append("Events:")
    if not info["events"]:
        lines.append("  <none>")
    else:
        now = time.time()
        rows = [["Type", "Reason", "Age", "From", "Message"]]
        rows += [[e["type"], e["reason"], _age(now - e["time"]), e["object"], e["message"]] for e in info["events"]]
        lines += ["  " + line for line in _table(rows).splitlines()]
    return "\n".join(lines) + "\n"


def _workload_lines(plan: dict) -> list[str]:
    lines = ["Workloads:"]
    for workload in plan["workloads"]:
        lines.append(f"  {workload['name']}: {workload['replicas']} replicas, {workload['engine']} engine, role {workload['role']}, "
                     f"revision {workload['revision']}, threads {workload['threads']}, devices {workload['gpus_per_replica']}")
        lines.append(f"    Args: {' '.join(workload['engine_args'])}")
    if plan.get("aggregated_reason"):
        lines.append(f"  Note: {plan['aggregated_reason']}")
    return lines


def _replica_lines(replica: dict) -> list[str]:
    lines = [
        f"  {replica['id']}:",
        f"    Role:       {replica['role']} ({replica['component']})",
        f"    State:      {replica['state']}",
        f"    Ready:      {replica['ready']}",
        f"    Port:       {replica['port']}",
        f"    PID:        {replica['pid']}",
        f"    Restarts:   {replica['restarts']}",
        f"    Revision:   {replica['revision']}",
    ]
    if replica["devices"]:
        lines.append(f"    Devices:    {','.join(str(d) for d in replica['devices'])}")
    lines.append(f"    Log:        {replica['log_path']}")

    last = replica.get("last_termination")
    if last:
        exit_code = last.get("exit_code")
        shown_code = exit_code if exit_code is not None else "unknown"
        lines.append(f"    Last State: Terminated ({last['reason']}, exit code {shown_code}): {last['message']}")
        if last.get("log_tail"):
            lines.append("    Last log lines before termination:")
            lines += [f"      {line}" for line in last["log_tail"].splitlines()]
    return lines


# logs


def run_logs(args: argparse.Namespace) -> int:
    """Print replica logs (all replicas of the role, or one), optionally following them."""
    from llmisvc.runtime.local.logs import follow, print_lines, tail_lines

    try:
        result = _connected_client().call("logs", name=args.name, namespace=args.namespace, prefill=args.prefill,
                                scheduler=args.scheduler, replica=args.replica)
    except ControlNotRunning:
        return _error(f"{SERVICE_RESOURCE} \"{args.name}\" not found")
    except ControlError as exc:
        return _error(str(exc))
    paths = [Path(path) for path in result["paths"]]
    prefixes = [f"[{replica}] " if len(paths) > 1 else "" for replica in result["replicas"]]
    offsets = []
    for path, prefix in zip(paths, prefixes):
        lines, size = tail_lines(path, args.tail)
        print_lines(sys.stdout, prefix, lines)
        offsets.append(size)
    if args.follow:
        try:
            follow(paths, offsets, lambda index, line: print_lines(sys.stdout, prefixes[index], [line]))
        except KeyboardInterrupt:
            pass
    return 0


# delete and control


def run_delete(args: argparse.Namespace) -> int:
    """Delete services by name or by the documents of a file; waits until they stopped."""
    names: list[tuple[str | None, str]] = []
    if args.filename is not None:
        from llmisvc.api import SpecError
        from llmisvc.api.load import load_file

        try:
            resources = load_file(args.filename)
        except (SpecError, OSError) as exc:
            return _error(f"cannot read services from {args.filename}: {exc}")
        names = [(r.namespace, r.name) for r in resources if r.kind == "LLMInferenceService"]
        configs = [(r.namespace, r.name) for r in resources if r.kind == "LLMInferenceServiceConfig"]
    elif args.name:
        names = [(args.namespace, args.name)]
        configs = []
    else:
        return _error("give a service NAME or -f FILE")
    client = _connected_client(for_configs=bool(configs))
    status = 0
    # Configs first: deleting the last service stops the control process.
    for namespace, name in configs:
        try:
            result = client.call("delete_config", name=name, namespace=namespace)
            print(f"llminferenceserviceconfig.serving.kserve.io \"{name}\" deleted")
            if result["referenced_by"]:
                print(f"warning: still named in baseRefs of {', '.join(result['referenced_by'])}; "
                      "they keep running, and their next apply fails until the config exists again", file=sys.stderr)
        except ControlNotRunning:
            status = _error(f"llminferenceserviceconfig.serving.kserve.io \"{name}\" not found")
        except ControlError as exc:
            status = _error(str(exc))
    for namespace, name in names:
        try:
            client.call("delete", progress=_progress, name=name, namespace=namespace)
            print(f"{SERVICE_RESOURCE} \"{name}\" deleted")
        except ControlNotRunning:
            status = _error(f"{SERVICE_RESOURCE} \"{name}\" not found")
        except ControlError as exc:
            status = _error(str(exc))
    _wait_control_exit(client)
    return status


def _wait_control_exit(client: ControlClient, timeout_s: float = 30.0) -> None:
    """Wait for the control process to exit when it stops after the last delete."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if client.call("ping")["services"] > 0:
                return
        except ControlNotRunning:
            return
        except ControlError:
            pass
        time.sleep(0.2)


def run_control(args: argparse.Namespace) -> int:
    """Run the control process in the foreground until SIGTERM or SIGINT."""
    import asyncio
    import fcntl

    from llmisvc.runtime.local.control import ControlServer

    home = Home.from_env()
    home.ensure()
    port = args.gateway_port
    if port is None and "LLMISVC_GATEWAY_PORT" not in os.environ:
        port = _last_gateway_port(home)
    if port is None:
        port = gateway_port_from_env()
    lock = open(home.root / "control.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _error(f"another control process already runs for {home.root}")
        return EXIT_ALREADY_RUNNING
    return asyncio.run(ControlServer(home, port).run())


def _last_gateway_port(home: Home) -> int | None:
    """Return the gateway port the previous control process of `home` used, if any."""
    if not home.store.exists():
        return None
    from llmisvc.runtime.local.store import Store

    store = Store(home.store)
    try:
        return (store.get_setting("gateway") or {}).get("port")
    finally:
        store.close()
