"""Files of the local runtime under LLMISVC_HOME (default ~/.llmisvc)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_GATEWAY_PORT = 8000

# Linux limits a Unix socket path to 108 bytes including the terminating NUL (sun_path).
_MAX_SOCKET_PATH = 107


def gateway_port_from_env() -> int:
    """Return LLMISVC_GATEWAY_PORT, else 8000. Raises ValueError for a non-numeric value."""
    return int(os.environ.get("LLMISVC_GATEWAY_PORT", DEFAULT_GATEWAY_PORT))


@dataclass(frozen=True)
class Home:
    """Layout of the state directory; `ensure` creates it readable only by its owner."""

    root: Path

    @classmethod
    def from_env(cls) -> "Home":
        return cls(Path(os.environ.get("LLMISVC_HOME") or Path.home() / ".llmisvc").expanduser().resolve())

    @property
    def store(self) -> Path:
        return self.root / "state.db"

    @property
    def socket(self) -> Path:
        return self.root / "control.sock"

    @property
    def control_log(self) -> Path:
        return self.root / "control.log"

    @property
    def control_pid(self) -> Path:
        return self.root / "control.pid"

    @property
    def admin_token(self) -> Path:
        return self.root / "admin-token"

    @property
    def gateway_log(self) -> Path:
        return self.root / "logs" / "gateway.log"

    @property
    def volumes(self) -> Path:
        """Directory standing in for PersistentVolumeClaims (`pvc://claim/path`)."""
        return self.root / "volumes"

    def service_log_dir(self, namespace: str, name: str) -> Path:
        return self.root / "logs" / namespace / name

    def ensure(self) -> None:
        """Create the directory (mode 0700). Raises ValueError when the socket path is too long."""
        if len(os.fsencode(self.socket)) > _MAX_SOCKET_PATH:
            raise ValueError(
                f"LLMISVC_HOME {self.root} is too long for a Unix socket path "
                f"({len(os.fsencode(self.socket))} bytes, at most {_MAX_SOCKET_PATH}); choose a shorter LLMISVC_HOME"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        (self.root / "logs").mkdir(exist_ok=True)
