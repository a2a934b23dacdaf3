"""`python -m recserve_operator`: run the operator with namespaces, leader election and liveness from the environment.

Kopf runs standalone in every replica (no Kopf peering): each replica watches and keeps its caches warm, and
leader election over a Lease (RECSERVE_LEADER_ELECTION, see recserve_operator.leader) decides which one reconciles.
"""

from __future__ import annotations

import os

import kopf

from recserve_operator import handlers  # noqa: F401  (registers the handlers)
from recserve_operator.settings import OperatorDefaults


def main() -> None:
    defaults = OperatorDefaults.from_env()
    kopf.run(
        clusterwide=not defaults.watch_namespaces,
        namespaces=defaults.watch_namespaces,
        standalone=True,
        liveness_endpoint=os.environ.get("RECSERVE_LIVENESS_ENDPOINT", "http://0.0.0.0:8080/healthz"),
    )


if __name__ == "__main__":
    main()
