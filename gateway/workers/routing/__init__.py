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
from gateway.workers.routing.spec_aware import SpecAware
from gateway.workers.serving_stats import ServingStats

POLICIES: Mapping[str, Callable[[LoadOf], RoutingPolicy]] = MappingProxyType({
    RoundRobin.name: RoundRobin,
    LeastLoaded.name: LeastLoaded,
    PowerOfTwo.name: PowerOfTwo,
    SessionAffinity.name: SessionAffinity,
    PrefixAware.name: PrefixAware,
})
# Policies that learn from the gateway's own finished requests.
LEARNING_POLICIES = (SpecAware.name,)


def make_policy(name: str, load_of: LoadOf, stats: ServingStats | None = None) -> RoutingPolicy:
    if name == SpecAware.name:
        return SpecAware(load_of, stats if stats is not None else ServingStats())
    try:
        factory = POLICIES[name]
    except KeyError:
        known = sorted([*POLICIES, *LEARNING_POLICIES])
        raise ValueError(f"unknown routing policy {name!r}; choose from {known}") from None
    return factory(load_of)


__all__ = ["LEARNING_POLICIES", "POLICIES", "LeastLoaded", "LoadOf", "PowerOfTwo", "PrefixAware", "RoundRobin",
           "RoutingPolicy", "SessionAffinity", "SpecAware", "make_policy"]
