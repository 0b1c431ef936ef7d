"""Model storage on Kubernetes: how a model URI becomes files at `/mnt/models` in a pod.

- `hf://org/name` and `s3://bucket/path`: an init container (KServe's storage initializer)
  downloads the model into an `emptyDir` volume that the engine mounts read-only.
- `pvc://claim/path`: the claim is mounted read-only, `path` as the mount's subPath.
- `oci://registry/image:tag`: the image is mounted as an image volume (the ImageVolume
  feature: alpha in Kubernetes 1.31, beta in 1.33).
- anything else (`file://`, a plain path, the embedded default model) is passed to the engine
  unchanged, because it names something inside the engine image or on the node.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MODEL_MOUNT_PATH = "/mnt/models"
LORA_MOUNT_ROOT = "/mnt/lora"

# Volume and container names as KServe's controller uses them, so existing tooling that
# looks for the model volume finds it.
PROVISION_VOLUME = "kserve-provision-location"
PVC_VOLUME = "kserve-pvc-source"
OCI_VOLUME = "kserve-oci-model"
STORAGE_INITIALIZER = "storage-initializer"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass
class ModelStorage:
    """Volumes, init containers and engine mounts that make the model visible in a pod.

    `model_path` is the value for the engine's model argument.
    """

    model_path: str
    volumes: list[dict] = field(default_factory=list)
    init_containers: list[dict] = field(default_factory=list)
    volume_mounts: list[dict] = field(default_factory=list)


def parse_pvc_uri(uri: str) -> tuple[str, str]:
    """Split `pvc://claim/sub/path` into (`claim`, `sub/path`); the path may be empty.

    Raises ValueError when the claim name is missing.
    """
    rest = uri[len("pvc://"):]
    claim, _, path = rest.partition("/")
    if not claim:
        raise ValueError(f"invalid pvc:// model URI {uri!r}: missing claim name")
    return claim, path.strip("/")


def model_storage(uri: str, initializer_image: str, initializer_enabled: bool = True,
                  mount_path: str = MODEL_MOUNT_PATH, volume_suffix: str = "") -> ModelStorage:
    """Return the volumes, init containers and mounts that make `uri` visible to the engine.

    `initializer_image` runs the download for `hf://` and `s3://` URIs. With the initializer
    disabled (`spec.storageInitializer.enabled: false`), an `hf://org/name` URI is passed to
    the engine as the repository id `org/name`, for engines that download it themselves.
    Raises ValueError for a malformed `pvc://` URI, and for `s3://` without the initializer.
    `mount_path` and `volume_suffix` place a second artifact (a LoRA adapter) beside the model.
    """
    if not initializer_enabled and uri.startswith("hf://"):
        return ModelStorage(model_path=uri[len("hf://"):])
    if not initializer_enabled and uri.startswith("s3://"):
        raise ValueError("spec.storageInitializer.enabled: an s3:// model needs the storage "
                         "initializer; enable it or use a pvc:// or hf:// URI")
    if uri.startswith(("hf://", "s3://")):
        return ModelStorage(
            model_path=mount_path,
            volumes=[{"name": PROVISION_VOLUME + volume_suffix, "emptyDir": {}}],
            init_containers=[
                {
                    "name": STORAGE_INITIALIZER + volume_suffix,
                    "image": initializer_image,
                    "args": [uri, mount_path],
                    "volumeMounts": [{"name": PROVISION_VOLUME + volume_suffix, "mountPath": mount_path}],
                    "resources": {
                        "requests": {"cpu": "100m", "memory": "100Mi"},
                        "limits": {"cpu": "1", "memory": "1Gi"},
                    },
                }
            ],
            volume_mounts=[
                {"name": PROVISION_VOLUME + volume_suffix, "mountPath": mount_path, "readOnly": True}
            ],
        )

    if uri.startswith("pvc://"):
        claim, path = parse_pvc_uri(uri)
        mount = {"name": PVC_VOLUME + volume_suffix, "mountPath": mount_path, "readOnly": True}
        if path:
            mount["subPath"] = path
        return ModelStorage(
            model_path=mount_path,
            volumes=[
                {
                    "name": PVC_VOLUME + volume_suffix,
                    "persistentVolumeClaim": {"claimName": claim, "readOnly": True},
                }
            ],
            volume_mounts=[mount],
        )

    if uri.startswith("oci://"):
        return ModelStorage(
            model_path=mount_path,
            volumes=[
                {
                    "name": OCI_VOLUME + volume_suffix,
                    "image": {"reference": uri[len("oci://"):], "pullPolicy": "IfNotPresent"},
                }
            ],
            volume_mounts=[{"name": OCI_VOLUME + volume_suffix, "mountPath": mount_path, "readOnly": True}],
        )

    # NOTE: a file:// URI or plain path must exist inside the engine image (or on a volume
    # the template mounts itself); nothing here checks that.
    return ModelStorage(model_path=uri)


def adapter_storage(adapters: list[dict], initializer_image: str,
                    initializer_enabled: bool = True) -> tuple[dict[str, str], ModelStorage]:
    """Return ({adapter name: path for the engine}, storage) for LoRA `adapters`.

    Each adapter (`{name, uri}`) is placed at `/mnt/lora/<name>` the way the model is placed at
    `/mnt/models`. Raises ValueError for an adapter without a name or URI, or a name that is
    not a DNS-1123 label of at most 32 characters (it becomes part of a 63-character volume
    name).
    """
    paths: dict[str, str] = {}
    combined = ModelStorage(model_path="")
    for index, adapter in enumerate(adapters):
        name, uri = (adapter or {}).get("name"), (adapter or {}).get("uri")
        if not name or not uri:
            raise ValueError(f"spec.model.lora.adapters[{index}]: name and uri are required")
        if not _DNS_LABEL.match(name) or len(name) > 32:
            raise ValueError(f"spec.model.lora.adapters[{index}].name: must be a DNS-1123 label "
                             f"of at most 32 characters, got {name!r}")
        storage = model_storage(uri, initializer_image, initializer_enabled,
                                mount_path=f"{LORA_MOUNT_ROOT}/{name}", volume_suffix=f"-lora-{name}")
        paths[name] = storage.model_path
        combined.volumes += storage.volumes
        combined.init_containers += storage.init_containers
        combined.volume_mounts += storage.volume_mounts
    return paths, combined
