"""Embedded SQLite store of applied specs, plans, observed replicas and events.

Only the control process writes to the store; the CLI sends its requests to the control
process over its socket. Writes are small and synchronous, so the event loop blocks for at most a few
milliseconds per write.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Events kept per service; older ones are deleted, as Kubernetes expires old events.
MAX_EVENTS_PER_SERVICE = 200

_SCHEMA = """
CREATE TABLE IF NOT EXISTS services (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    generation INTEGER NOT NULL,
    resource TEXT NOT NULL,
    plan TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (namespace, name)
);
CREATE TABLE IF NOT EXISTS configs (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    resource TEXT NOT NULL,
    PRIMARY KEY (namespace, name)
);
CREATE TABLE IF NOT EXISTS replicas (
    id TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    time REAL NOT NULL,
    type TEXT NOT NULL,
    reason TEXT NOT NULL,
    object TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class StoredService:
    """A service as last applied: the validated resource document and its plan."""

    namespace: str
    name: str
    generation: int
    resource: dict[str, Any]
    plan: dict[str, Any]
    created: float
    updated: float


@dataclass(frozen=True)
class Event:
    """A Kubernetes-style event: type Normal or Warning, a CamelCase reason, a message."""

    time: float
    type: str
    reason: str
    object: str
    message: str


class Store:
    """SQLite-backed state of the control process at `path`."""

    def __init__(self, path: Path):
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    # services

    def put_service(self, namespace: str, name: str, resource: dict, plan: dict, bump_generation: bool) -> int:
        """Insert or update a service; returns its generation (1 on create)."""
        now = time.time()
        row = self._db.execute(
            "SELECT generation FROM services WHERE namespace=? AND name=?", (namespace, name)
        ).fetchone()
        if row is None:
            self._db.execute(
                "INSERT INTO services VALUES (?, ?, 1, ?, ?, ?, ?)",
                (namespace, name, json.dumps(resource), json.dumps(plan), now, now),
            )
            return 1
        generation = row[0] + (1 if bump_generation else 0)
        self._db.execute(
            "UPDATE services SET generation=?, resource=?, plan=?, updated=? WHERE namespace=? AND name=?",
            (generation, json.dumps(resource), json.dumps(plan), now, namespace, name),
        )
        return generation

    def get_service(self, namespace: str, name: str) -> StoredService | None:
        row = self._db.execute(
            "SELECT namespace, name, generation, resource, plan, created, updated FROM services WHERE namespace=? AND name=?",
            (namespace, name),
        ).fetchone()
        return _service(row) if row else None

    def list_services(self) -> list[StoredService]:
        rows = self._db.execute(
            "SELECT namespace, name, generation, resource, plan, created, updated FROM services ORDER BY namespace, name"
        ).fetchall()
        return [_service(row) for row in rows]

    def delete_service(self, namespace: str, name: str) -> None:
        self._db.execute("DELETE FROM services WHERE namespace=? AND name=?", (namespace, name))
        self._db.execute("DELETE FROM replicas WHERE namespace=? AND name=?", (namespace, name))
        self._db.execute("DELETE FROM events WHERE namespace=? AND name=?", (namespace, name))

    # LLMInferenceServiceConfig documents, referenced by baseRefs

    def put_config(self, namespace: str, name: str, resource: dict) -> None:
        self._db.execute("INSERT OR REPLACE INTO configs VALUES (?, ?, ?)", (namespace, name, json.dumps(resource)))

    def delete_config(self, namespace: str, name: str) -> bool:
        """Delete a config; returns False when it was not stored."""
        cursor = self._db.execute("DELETE FROM configs WHERE namespace=? AND name=?", (namespace, name))
        return cursor.rowcount > 0

    def list_configs(self) -> list[dict]:
        return [json.loads(row[0]) for row in self._db.execute("SELECT resource FROM configs").fetchall()]

    # replicas: the observed process table, used to adopt replicas after a restart

    def put_replica(self, replica_id: str, namespace: str, name: str, data: dict) -> None:
        self._db.execute("INSERT OR REPLACE INTO replicas VALUES (?, ?, ?, ?)", (replica_id, namespace, name, json.dumps(data)))

    def delete_replica(self, replica_id: str) -> None:
        self._db.execute("DELETE FROM replicas WHERE id=?", (replica_id,))

    def list_replicas(self, namespace: str, name: str) -> list[dict]:
        rows = self._db.execute("SELECT data FROM replicas WHERE namespace=? AND name=?", (namespace, name)).fetchall()
        return [json.loads(row[0]) for row in rows]

    # events

    def add_event(self, namespace: str, name: str, event: Event) -> None:
        self._db.execute(
            "INSERT INTO events (namespace, name, time, type, reason, object, message) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (namespace, name, event.time, event.type, event.reason, event.object, event.message),
        )
        self._db.execute(
            "DELETE FROM events WHERE namespace=? AND name=? AND id NOT IN "
            "(SELECT id FROM events WHERE namespace=? AND name=? ORDER BY id DESC LIMIT ?)",
            (namespace, name, namespace, name, MAX_EVENTS_PER_SERVICE),
        )

    def list_events(self, namespace: str, name: str, limit: int = MAX_EVENTS_PER_SERVICE) -> list[Event]:
        rows = self._db.execute(
            "SELECT time, type, reason, object, message FROM events WHERE namespace=? AND name=? ORDER BY id DESC LIMIT ?",
            (namespace, name, limit),
        ).fetchall()
        return [Event(*row) for row in reversed(rows)]

    # settings of the control process (gateway address and PID, for adoption)

    def get_setting(self, key: str) -> Any:
        row = self._db.execute("SELECT value FROM settings WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def set_setting(self, key: str, value: Any) -> None:
        self._db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (key, json.dumps(value)))


def _service(row: tuple) -> StoredService:
    namespace, name, generation, resource, plan, created, updated = row
    return StoredService(namespace, name, generation, json.loads(resource), json.loads(plan), created, updated)


def stored_count(path: Path, table: str = "services") -> int:
    """Count the rows of `table` ("services" or "configs") in the store at `path`, read-only.

    Returns 0 when the store does not exist.

    The CLI uses this to decide whether a control process is worth starting.
    """
    if not path.exists():
        return 0
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        if table not in ("services", "configs"):
            raise ValueError(f"unknown table {table!r}")
        return db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()
