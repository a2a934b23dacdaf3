"""Is the cluster's RecommenderModel CRD the one this operator was built with?

Helm installs a chart's CRDs on first install and never upgrades them. After `helm upgrade` to a release whose API
gained fields, the old CRD's structural schema prunes every field it does not know from each manifest applied: a
`rollout.shadow`, say, is dropped without an error and the model rolls out without its shadow phase. Nothing the
operator reads of a model can show that, so the operator compares the installed CRD with its own at start.

The CRD carries the digest of its `spec` in the `recserve.dev/schema-digest` annotation; `hack/sync_crds.py`
writes it into `crds/recommendermodels.yaml` and into `SCHEMA_DIGEST` below, and `make lint` fails when either is
stale. Pure: the caller fetches the CRD.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CRD_NAME = "recommendermodels.recserve.dev"
SCHEMA_DIGEST_ANNOTATION = "recserve.dev/schema-digest"
# The digest of crds/recommendermodels.yaml's spec; written by hack/sync_crds.py, never by hand.
SCHEMA_DIGEST = "699133bc2aae458e"
# --force-conflicts: Helm (or an earlier apply) owns the fields this release changes, and taking them over is the point.
UPGRADE_COMMAND = "kubectl apply --server-side --force-conflicts -f charts/recserve/crds/"

CURRENT, OUTDATED, UNVERSIONED, MISSING = "Current", "Outdated", "Unversioned", "Missing"


def schema_digest(spec: Mapping[str, Any]) -> str:
    """The first 16 hex digits of the SHA-256 of a CRD spec as canonical JSON (key order and layout ignored)."""
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CrdCheck:
    reason: str  # CURRENT, OUTDATED, UNVERSIONED or MISSING
    message: str

    @property
    def current(self) -> bool:
        return self.reason == CURRENT


def check_installed(crd: Mapping[str, Any] | None, expected: str = SCHEMA_DIGEST) -> CrdCheck:
    """Compare the installed CRD (None: not installed) with the schema this operator expects."""
    if crd is None:
        return CrdCheck(MISSING, f"CRD {CRD_NAME} is not installed: install it with `{UPGRADE_COMMAND}` "
                                 "(or helm install the chart)")  # fmt: skip
    installed = ((crd.get("metadata") or {}).get("annotations") or {}).get(SCHEMA_DIGEST_ANNOTATION)
    if installed == expected:
        return CrdCheck(CURRENT, f"CRD {CRD_NAME} schema {expected} is the one this operator expects")
    why = (f"has no {SCHEMA_DIGEST_ANNOTATION} annotation (installed by an earlier release)" if installed is None
           else f"has schema {installed}")  # fmt: skip
    return CrdCheck(
        UNVERSIONED if installed is None else OUTDATED,
        f"CRD {CRD_NAME} {why}, this operator expects {expected}: Helm never upgrades CRDs, so fields the installed "
        f"schema does not know are dropped from every RecommenderModel applied. Apply this release's CRDs: "
        f"`{UPGRADE_COMMAND}`",
    )  # fmt: skip
