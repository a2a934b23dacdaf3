"""The model store's keys in a model's namespace, copied from the chart's own Secret (cluster mode)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from recserve_operator.names import COMPONENT_LABEL, MANAGED_BY_LABEL, MANAGER

# What build Jobs and serving pods read from the Secret (envFrom with the STORE_ prefix).
STORE_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
STORE_COMPONENT = "model-store"


class StoreKeysMissing(ValueError):
    """The source Secret lacks a key the copies need."""


def store_keys_secret(namespace: str, name: str, source: Mapping[str, Any]) -> dict[str, Any]:
    """The copy, in `namespace`, of the store's keys from the source Secret as the API returned it (base64 `data`).

    Only the keys build Jobs and serving pods read are copied (the source also holds the store's identities). The
    copy is shared by the namespace's models, so it has no owner: it stays when they go, like a namespace default.
    """
    data = source.get("data") or {}
    missing = [k for k in STORE_KEYS if not data.get(k)]
    if missing:
        meta = source.get("metadata") or {}
        raise StoreKeysMissing(f"Secret {meta.get('namespace')}/{meta.get('name')} has no {', '.join(missing)}")
    labels = {MANAGED_BY_LABEL: MANAGER, COMPONENT_LABEL: STORE_COMPONENT}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "type": "Opaque",
        "data": {k: data[k] for k in STORE_KEYS},
    }
