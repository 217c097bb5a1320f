"""Picking a route's target for one request, and whether the request is also copied to the shadow.

Contract: `choose_target` returns one of the route's targets with a weight above zero (never a weight-0 one), in
proportion to the weights. With a sticky key (a user or session id) the pick is deterministic: the same key on the
same route always gets the same target, on every gateway replica and across restarts, and changing one target's
weight only moves keys to or from that target (rendezvous hashing); without one (None or "") it is `rng`'s
weighted draw. A route with no positive weight raises ValueError (a checked table has none).
"""

from __future__ import annotations

import hashlib
import math
import random

from gateway.model_routes.table import Route, Target

# 52 bits of the hash: an odd numerator below 2**53 over 2**53 is an exact float, strictly inside (0, 1).
_BITS = 52
_DENOMINATOR = 1 << (_BITS + 1)


def _unit(route: str, model: str, sticky_key: str) -> float:
    """A uniform draw in (0, 1), fixed by (route, model, key): Python's hash() is salted per process, blake2b not."""
    material = f"{route}\0{model}\0{sticky_key}".encode("utf-8", "surrogatepass")
    value = int.from_bytes(hashlib.blake2b(material, digest_size=8).digest(), "big") >> (64 - _BITS)
    return (2 * value + 1) / _DENOMINATOR


def _score(route: str, target: Target, sticky_key: str) -> float:
    # -w / ln(u): the largest wins with probability w_i / sum(w) (it is an exponential race: -ln(u) / w is
    # Exp(w)-distributed). Each target's score depends on its own weight only, so raising one target's weight
    # can only make that target win more keys; the order of the others among themselves stays as it was.
    return -target.weight / math.log(_unit(route, target.model, sticky_key))


def choose_target(route: Route, sticky_key: str | None, rng: random.Random) -> str:
    candidates = [target for target in route.targets if target.weight > 0]
    if not candidates:
        raise ValueError(f"route '{route.name}' has no target with a weight above zero")
    if not sticky_key:
        # Weight-0 targets are left out rather than trusted to a zero-width slot of the draw.
        return rng.choices([t.model for t in candidates], weights=[t.weight for t in candidates])[0]
    return max(candidates, key=lambda target: _score(route.name, target, sticky_key)).model


def shadow_sampled(route: Route, rng: random.Random) -> bool:
    """Whether this request is also sent to the route's shadow (sample 1: always; 0 or no shadow: never)."""
    shadow = route.shadow
    return shadow is not None and shadow.sample > 0 and rng.random() < shadow.sample
