"""What changed in a route, as one line of text for the audit log ("who changed what"; the caller adds who).

Contract: `describe_change(old, new)` names the route and always has three parts, weights, shadow and fallbacks,
each either "<before>-><after>" or "<value> unchanged", e.g.
"route chat: weights demo-v1 90->80, demo-v2 10->20; shadow none->demo-v3@0.2; fallbacks [demo-small] unchanged".
Only the targets whose weight changed are listed; a target added or removed shows "none" on its missing side. A
new route (old None) reads "route chat (new): weights demo-v1 90, demo-v2 10; shadow none; fallbacks []".
"""

from __future__ import annotations

from gateway.model_routes.checks import number_text
from gateway.model_routes.table import Route, Shadow


def _weights_text(route: Route) -> str:
    return ", ".join(f"{target.model} {number_text(target.weight)}" for target in route.targets)


def _shadow_text(shadow: Shadow | None) -> str:
    return "none" if shadow is None else f"{shadow.model}@{number_text(shadow.sample)}"


def _fallbacks_text(route: Route) -> str:
    return "[" + ", ".join(route.fallbacks) + "]"


def _weights_change(old: Route, new: Route) -> str:
    before = {target.model: target.weight for target in old.targets}
    after = {target.model: target.weight for target in new.targets}
    changes: list[str] = []
    # The new order first, then what was removed: the line reads like the route as it now is.
    for model in [*after, *(model for model in before if model not in after)]:
        was, now = before.get(model), after.get(model)
        if was != now:
            was_text = "none" if was is None else number_text(was)
            now_text = "none" if now is None else number_text(now)
            changes.append(f"{model} {was_text}->{now_text}")
    return "weights " + ", ".join(changes) if changes else f"weights {_weights_text(new)} unchanged"


def _change(part: str, before: str, after: str) -> str:
    return f"{part} {after} unchanged" if before == after else f"{part} {before}->{after}"


def describe_change(old: Route | None, new: Route) -> str:
    if old is None:
        return (f"route {new.name} (new): weights {_weights_text(new)}; shadow {_shadow_text(new.shadow)}; "
                f"fallbacks {_fallbacks_text(new)}")
    return "; ".join([
        f"route {new.name}: {_weights_change(old, new)}",
        _change("shadow", _shadow_text(old.shadow), _shadow_text(new.shadow)),
        _change("fallbacks", _fallbacks_text(old), _fallbacks_text(new)),
    ])
