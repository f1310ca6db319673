"""reparam's safetensors metadata: the `reparam.` keys of a deploy file's header, decoded.

Kept free of torch so that `reparam batch` can tell deploy files from inputs without importing it.
"""

from __future__ import annotations

import json

META_PREFIX = "reparam."


def decode_metadata(raw: dict[str, str]) -> dict[str, object]:
    """reparam's entries of a safetensors header's metadata, prefix removed, JSON values decoded."""
    meta: dict[str, object] = {}
    for k, v in raw.items():
        if not k.startswith(META_PREFIX):
            continue
        try:
            meta[k[len(META_PREFIX):]] = json.loads(v)
        except (json.JSONDecodeError, RecursionError):
            meta[k[len(META_PREFIX):]] = v
    return meta


def is_deploy_metadata(meta: dict[str, object]) -> bool:
    """Whether decoded metadata is that of a reparam deploy file (which always stores its spec and
    its verification figures, `verified: false` included)."""
    return "spec" in meta and "verification" in meta
