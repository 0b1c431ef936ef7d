"""`kv_transfer_params` as vLLM's NixlConnector spells them.

The prefill leg sends {"do_remote_decode": true}. A prefill engine that stopped on the
length cap returns the remote_* fields below, and the decode leg sends those back.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack


@dataclass
class KVTransferParams:
    """Fields of the `kv_transfer_params` object in requests and responses."""

    do_remote_decode: bool = False
    do_remote_prefill: bool = False
    remote_engine_id: str | None = None
    remote_block_ids: list[int] = field(default_factory=list)
    remote_host: str | None = None
    remote_port: int | None = None
    tp_size: int = 1
    # Extra keys the peer sent (for example vLLM's remote_request_id); kept and echoed.
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "KVTransferParams":
        """Build params from a decoded JSON object; unknown keys go to `extra`."""
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        params = cls(**{k: v for k, v in data.items() if k in known})
        params.extra = {k: v for k, v in data.items() if k not in known}
        return params

    def to_json(self) -> dict[str, Any]:
        """Return the JSON object, extra keys included."""
        data = asdict(self)
        extra = data.pop("extra")
        data.update(extra)
        return data


# The KV side channel (served by each engine on `remote_port`) carries frames of a 4-byte
# big-endian payload length followed by a msgpack map. Engines use it with each other. The
# gateway and the sidecar only send `{"op": "free", "request_id": ...}`, which releases a
# prefill engine's held blocks early when a request ends between its two legs.
SIDE_CHANNEL_FRAME_HEADER = ">I"


def encode_side_channel_frame(message: dict[str, Any]) -> bytes:
    """Return one side-channel frame (length prefix and msgpack payload) for `message`."""
    payload = msgpack.packb(message, use_bin_type=True)
    return struct.pack(SIDE_CHANNEL_FRAME_HEADER, len(payload)) + payload
