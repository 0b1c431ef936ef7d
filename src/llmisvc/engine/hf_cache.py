"""Find a Hugging Face Hub model in the local cache, offline.

The cache layout is the one `huggingface_hub` writes: `<cache>/models--<org>--<name>/` with
`refs/<revision>` files holding a commit hash and `snapshots/<commit>/` directories holding
the files. Nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path


def hub_cache_dir() -> Path:
    """Return the Hub cache directory: `HF_HUB_CACHE`, else `HF_HOME/hub`, else the default.

    The default is `$XDG_CACHE_HOME/huggingface/hub`, falling back to `~/.cache/huggingface/hub`.
    """
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home).expanduser() / "huggingface" / "hub"


def find_cached_snapshot(repo_id: str, revision: str = "main", cache_dir: Path | None = None) -> Path | None:
    """Return the snapshot directory of `repo_id` at `revision`, or None when it is not cached.

    `revision` is a ref name (looked up under `refs/`) or a commit hash. A repository with no
    matching ref but exactly one snapshot yields that snapshot, because some tools copy a
    snapshot without its refs.
    """
    repo_dir = (cache_dir or hub_cache_dir()) / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return None

    ref_file = repo_dir / "refs" / revision
    if ref_file.is_file():
        commit = ref_file.read_text().strip()
        candidate = snapshots / commit
        return candidate if candidate.is_dir() else None
    if (snapshots / revision).is_dir():
        return snapshots / revision
    entries = [entry for entry in snapshots.iterdir() if entry.is_dir()]
    if revision == "main" and len(entries) == 1:
        return entries[0]
    return None
