"""`python -m recserve_operator`: run the operator with namespaces, peering and liveness from the environment."""

from __future__ import annotations

import os

import kopf

from recserve_operator import handlers  # noqa: F401  (registers the handlers)
from recserve_operator.settings import OperatorDefaults


def main() -> None:
    defaults = OperatorDefaults.from_env()
    standalone = os.environ.get("RECSERVE_STANDALONE", "false").lower() in ("1", "true", "yes")
    kopf.run(
        clusterwide=not defaults.watch_namespaces,
        namespaces=defaults.watch_namespaces,
        standalone=standalone,
        priority=int(os.environ.get("RECSERVE_PEERING_PRIORITY", "0")),
        peering_name=os.environ.get("RECSERVE_PEERING_NAME", "recserve"),
        liveness_endpoint=os.environ.get("RECSERVE_LIVENESS_ENDPOINT", "http://0.0.0.0:8080/healthz"),
    )


if __name__ == "__main__":
    main()
