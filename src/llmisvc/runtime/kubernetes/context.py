"""The facts about one resolved service that every rendering step reads."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmisvc.runtime.kubernetes.names import MANAGED_BY, MANAGED_BY_LABEL, ChildNames, owner_reference
from llmisvc.runtime.kubernetes.options import RenderOptions


@dataclass
class ServiceContext:
    """One LLMInferenceService as input to rendering.

    `spec` is the merged, template-rendered spec. `uid` is the service's UID on the cluster, or
    None when rendering a file. Without it children carry no owner reference, because a
    made-up UID would make the garbage collector delete them as orphans.
    """

    name: str
    namespace: str
    api_version: str
    kind: str
    uid: str | None
    spec: dict
    annotations: dict
    model_uri: str
    model_name: str
    shape: str
    scheduler_config: dict | None
    options: RenderOptions
    scheduler_config_ref: dict | None = None
    names: ChildNames = field(init=False)

    def __post_init__(self) -> None:
        self.names = ChildNames(self.name)

    @property
    def pool_name(self) -> str:
        """Return the InferencePool's name: `router.scheduler.pool.ref.name`, else the rendered one."""
        pool = (((self.spec.get("router") or {}).get("scheduler") or {}).get("pool") or {})
        return (pool.get("ref") or {}).get("name") or self.names.pool

    def metadata(self, name: str, labels: dict[str, str], annotations: dict | None = None) -> dict:
        """Return object metadata for child `name`: namespace, labels, owner reference."""
        meta: dict = {
            "name": name,
            "namespace": self.namespace,
            "labels": {**labels, MANAGED_BY_LABEL: MANAGED_BY},
        }
        if annotations:
            meta["annotations"] = dict(annotations)
        if self.uid:
            meta["ownerReferences"] = [
                owner_reference(self.api_version, self.kind, self.name, self.uid)
            ]
        return meta
