"""Router protocol and factory: turn a traffic plan into the Kubernetes objects that realise it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from recserve_operator.rollout.policy import ParentRef, RoutingPolicy, RoutingProvider
from recserve_operator.routers import builtin
from recserve_operator.routers.gateway_api import build_httproute
from recserve_operator.routers.plan import TrafficPlan

__all__ = ["BuiltinRouter", "GatewayApiRouter", "Router", "UnknownRouterError", "get_router"]


class UnknownRouterError(ValueError):
    """Raised for a routing provider this operator does not implement."""


class Router(Protocol):
    @property
    def provider(self) -> RoutingProvider: ...

    def render(
        self, plan: TrafficPlan, model: str, namespace: str, owner_ref: Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """Objects to apply (server-side apply) so that `model`'s traffic follows `plan` (names.router_name,
        labelled names.router_labels)."""
        ...


@dataclass(frozen=True)
class GatewayApiRouter:
    parent_ref: ParentRef
    provider: RoutingProvider = RoutingProvider.GATEWAY_API

    def render(
        self, plan: TrafficPlan, model: str, namespace: str, owner_ref: Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        return [build_httproute(plan, model, namespace, self.parent_ref, owner_ref=owner_ref)]


@dataclass(frozen=True)
class BuiltinRouter:
    image: str = builtin.DEFAULT_IMAGE
    replicas: int = 2
    placement: Mapping[str, Any] = field(default_factory=dict)  # nodeSelector / tolerations of the pods
    provider: RoutingProvider = RoutingProvider.BUILTIN
    shadow_image: str | None = None  # RecServe's image, for the shadow comparator sidecar

    def _sidecar(self, plan: TrafficPlan, model: str, namespace: str) -> dict[str, Any] | None:
        if plan.shadow is None:
            return None
        if not self.shadow_image:
            raise UnknownRouterError("a shadow phase needs the comparator image (the operator's fetcher image)")
        return builtin.build_shadow_container(model, namespace, plan, self.shadow_image)

    def render(
        self, plan: TrafficPlan, model: str, namespace: str, owner_ref: Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        cm = builtin.build_router_configmap(model, namespace, plan, owner_ref)
        conf_hash = builtin.config_hash(cm["data"][builtin.CONF_KEY])
        return [
            cm,
            builtin.build_router_deployment(
                model,
                namespace,
                conf_hash,
                image=self.image,
                replicas=self.replicas,
                owner_ref=owner_ref,
                placement=self.placement,
                sidecar=self._sidecar(plan, model, namespace),
            ),
            builtin.build_router_service(model, namespace, owner_ref, shadow=plan.shadow is not None),
        ]


def get_router(
    provider: str, routing: RoutingPolicy | None = None, *, image: str | None = None,
    placement: Mapping[str, Any] | None = None, shadow_image: str | None = None,
) -> Router:  # fmt: skip
    """Router for a provider name ("builtin" | "gatewayAPI"); raises UnknownRouterError otherwise."""
    try:
        kind = RoutingProvider(provider)
    except ValueError:
        allowed = ", ".join(p.value for p in RoutingProvider)
        raise UnknownRouterError(f"unknown routing provider {provider!r} (known: {allowed})") from None
    if kind is RoutingProvider.GATEWAY_API:
        if routing is None or routing.parent_ref is None:
            raise UnknownRouterError("gatewayAPI routing needs rollout.routing.parentRef")
        return GatewayApiRouter(routing.parent_ref)
    return BuiltinRouter(image=image or builtin.DEFAULT_IMAGE, placement=dict(placement or {}),
                         shadow_image=shadow_image)  # fmt: skip
