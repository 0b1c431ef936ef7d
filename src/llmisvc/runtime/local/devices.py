"""Claims of CUDA devices by replicas, so no device is given to two replicas."""

from __future__ import annotations


class DeviceAllocator:
    """Hand out distinct device indices from `device_ids` to replicas."""

    def __init__(self, device_ids: tuple[int, ...]):
        self._free = list(device_ids)
        self._claims: dict[str, list[int]] = {}

    def claim(self, replica_id: str, count: int) -> list[int] | None:
        """Claim `count` devices for `replica_id`; None when fewer are free."""
        if count == 0:
            return []
        if len(self._free) < count:
            return None
        devices, self._free = self._free[:count], self._free[count:]
        self._claims[replica_id] = devices
        return devices

    def restore(self, replica_id: str, devices: list[int]) -> None:
        """Re-register the devices of an adopted replica."""
        self._free = [device for device in self._free if device not in devices]
        self._claims[replica_id] = list(devices)

    def release(self, replica_id: str) -> None:
        self._free = sorted(self._free + self._claims.pop(replica_id, []))

    @property
    def free_count(self) -> int:
        return len(self._free)
