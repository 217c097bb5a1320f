"""Routing policies, one module each, behind one small Protocol (policy.py); `make_policy` builds one by name."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from gateway.workers.routing.least_loaded import LeastLoaded
from gateway.workers.routing.policy import LoadOf, RoutingPolicy
from gateway.workers.routing.power_of_two import PowerOfTwo
from gateway.workers.routing.prefix_aware import PrefixAware
from gateway.workers.routing.round_robin import RoundRobin
from gateway.workers.routing.session_affinity import SessionAffinity

POLICIES: Mapping[str, Callable[[LoadOf], RoutingPolicy]] = MappingProxyType({
    RoundRobin.name: RoundRobin,
    LeastLoaded.name: LeastLoaded,
    PowerOfTwo.name: PowerOfTwo,
    SessionAffinity.name: SessionAffinity,
    PrefixAware.name: PrefixAware,
})


def make_policy(name: str, load_of: LoadOf) -> RoutingPolicy:
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; choose from {sorted(POLICIES)}") from None
    return factory(load_of)


__all__ = ["POLICIES", "LeastLoaded", "LoadOf", "PowerOfTwo", "PrefixAware", "RoundRobin", "RoutingPolicy",
           "SessionAffinity", "make_policy"]
