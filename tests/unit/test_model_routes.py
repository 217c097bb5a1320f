"""The model routes table (gateway/model_routes/): parsing and its error messages, cycles, the sticky weighted
choice (determinism, distribution, rendezvous monotonicity), fallback chains, to_json and change descriptions."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from gateway.model_routes.changes import describe_change
from gateway.model_routes.choose import choose_target, shadow_sampled
from gateway.model_routes.config import RoutesError, load_routes_file, parse_routes, route_from_json
from gateway.model_routes.table import Route, Shadow, Target

SERVED = {"demo-v1", "demo-v2", "demo-v3", "demo-small", "chat"}
KEYS = 20_000


def _chat(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "targets": [{"model": "demo-v1", "weight": 90}, {"model": "demo-v2", "weight": 10}],
        "shadow": {"model": "demo-v3", "sample": 0.2},
        "fallbacks": ["demo-small"],
    }
    body.update(changes)
    return body


def _error(data: dict[str, Any], known: set[str] | frozenset[str] = frozenset(SERVED)) -> str:
    with pytest.raises(RoutesError) as caught:
        parse_routes(data, known)
    return str(caught.value)


def _route(name: str, *weights: tuple[str, float], fallbacks: tuple[str, ...] = ()) -> Route:
    return Route(name, tuple(Target(model, weight) for model, weight in weights), None, fallbacks)


def _keys(count: int = KEYS) -> list[str]:
    rng = random.Random(20240601)
    return [f"user-{rng.getrandbits(64):016x}" for _ in range(count)]


# Parsing


def test_a_valid_table_parses() -> None:
    table = parse_routes({"routes": {"chat": _chat()}}, SERVED)
    route = table.route("chat")
    assert route == Route("chat", (Target("demo-v1", 90.0), Target("demo-v2", 10.0)), Shadow("demo-v3", 0.2),
                          ("demo-small",))
    assert table.route("demo-v1") is None
    assert table.targets_of_routes() == {"demo-v1", "demo-v2", "demo-v3", "demo-small"}


def test_empty_and_optional_parts() -> None:
    assert parse_routes({}, SERVED).routes == {}
    assert parse_routes({"routes": None}, SERVED).routes == {}
    body = {"targets": [{"model": "demo-v1", "weight": 1}], "fallbacks": None}
    route = parse_routes({"routes": {"chat": body}}, SERVED).route("chat")
    assert route is not None and route.shadow is None and route.fallbacks == ()


@pytest.mark.parametrize(("body", "message"), [
    (_chat(targets=[{"model": "demo-v9", "weight": 1}]),
     "route 'chat': target 'demo-v9' is not a model any worker serves"),
    (_chat(targets=[{"model": "demo-v1", "weight": 0}, {"model": "demo-v2", "weight": 0}]),
     "route 'chat': weights are all zero"),
    (_chat(targets=[{"model": "demo-v1", "weight": -1}, {"model": "demo-v2", "weight": 1}]),
     "route 'chat': target weight -1 is negative"),
    (_chat(targets=[]), "route 'chat': has no targets"),
    (_chat(targets=[{"model": "demo-v1", "weight": 1}, {"model": "demo-v1", "weight": 2}]),
     "route 'chat': target 'demo-v1' is listed twice"),
    (_chat(targets=[{"model": "", "weight": 1}]), "route 'chat': a target's model name is empty"),
    (_chat(targets=[{"model": "demo-v1", "weight": float("nan")}]), "route 'chat': target weight nan is not a finite"),
    (_chat(shadow={"model": "demo-v3", "sample": 1.5}), "route 'chat': shadow sample 1.5 is not in [0, 1]"),
    (_chat(shadow={"model": "demo-v9", "sample": 0.5}),
     "route 'chat': shadow 'demo-v9' is not a model any worker serves"),
    (_chat(fallbacks=["nowhere"]), "route 'chat': fallback 'nowhere' is neither a route nor a model any worker"),
    (_chat(fallbacks=[""]), "route 'chat': a fallback name is empty"),
    (_chat(fallbacks=["demo-small", "demo-small"]), "route 'chat': fallback 'demo-small' is listed twice"),
    (_chat(targets=[{"model": "demo-v1", "weight": "90"}]), "route 'chat': targets[0].weight: Input should be"),
    (_chat(targets=[{"model": "demo-v1", "weight": True}]), "route 'chat': targets[0].weight: Input should be"),
    (_chat(targets=[{"model": "demo-v1", "weigth": 90}]), "route 'chat': targets[0].weigth: Extra inputs"),
    (_chat(canary=True), "route 'chat': canary: Extra inputs are not permitted"),
    ({k: v for k, v in _chat().items() if k != "targets"}, "route 'chat': targets: Field required"),
])
def test_each_problem_is_named(body: dict[str, Any], message: str) -> None:
    assert message in _error({"routes": {"chat": body}})


def test_every_problem_is_reported_and_bad_top_levels_too() -> None:
    text = _error({"routes": {"chat": _chat(targets=[{"model": "demo-v9", "weight": -1}]),
                              "other": _chat(shadow={"model": "demo-v3", "sample": -0.5})}})
    assert text.splitlines() == [
        "route 'chat': target 'demo-v9' is not a model any worker serves",
        "route 'chat': target weight -1 is negative (demo-v9)",
        "route 'other': shadow sample -0.5 is not in [0, 1]",
    ]
    assert "route name 1: Input should be a valid string" in _error({"routes": {1: _chat()}})
    assert "routes: Input should be a valid dictionary" in _error({"routes": ["chat"]})
    assert "extra: Extra inputs are not permitted" in _error({"routes": {}, "extra": 1})


def test_names_are_checked_against_served_models_only_when_some_are_known() -> None:
    unknown = {"routes": {"chat": _chat(targets=[{"model": "demo-v9", "weight": 1}],
                                        shadow={"model": "shadow-x", "sample": 0.1}, fallbacks=["later-x"])}}
    text = _error(unknown)
    assert "target 'demo-v9'" in text and "shadow 'shadow-x'" in text and "fallback 'later-x'" in text
    table = parse_routes(unknown, set())  # no worker answered yet: names are taken on trust
    assert table.targets_of_routes() == {"demo-v9", "shadow-x", "later-x"}
    # ... but every other rule still holds.
    assert "weights are all zero" in _error({"routes": {"chat": _chat(targets=[{"model": "x", "weight": 0}])}}, set())


def test_a_fallback_may_name_a_route_and_a_route_may_share_a_served_models_name() -> None:
    table = parse_routes({"routes": {
        "chat": _chat(fallbacks=["small"]),
        "small": {"targets": [{"model": "demo-small", "weight": 1}]},
        "demo-v1": {"targets": [{"model": "demo-v1", "weight": 1}, {"model": "demo-v3", "weight": 1}]},
    }}, SERVED)
    assert table.route("demo-v1") is not None and "small" not in table.targets_of_routes()


@pytest.mark.parametrize(("fallbacks", "cycle"), [
    ({"chat": ["small"], "small": ["chat"]}, "fallback cycle: chat -> small -> chat"),
    ({"chat": ["small"], "small": ["tiny"], "tiny": ["chat"]}, "fallback cycle: chat -> small -> tiny -> chat"),
    ({"chat": ["chat"]}, "fallback cycle: chat -> chat"),  # `chat` is a served model too: the route wins
    ({"chat": ["demo-small", "small"], "small": ["tiny"], "tiny": ["small"]}, "fallback cycle: small -> tiny -> small"),
])
def test_fallback_cycles_are_errors(fallbacks: dict[str, list[str]], cycle: str) -> None:
    routes = {name: {"targets": [{"model": "demo-v1", "weight": 1}], "fallbacks": names}
              for name, names in fallbacks.items()}
    assert cycle in _error({"routes": routes}).splitlines()
    assert cycle in _error({"routes": routes}, set()).splitlines()  # cycles are checked without served models too


def test_load_routes_file(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text("routes:\n  chat:\n    targets:\n      - {model: demo-v1, weight: 90}\n"
                    "      - {model: demo-v2, weight: 10}\n    fallbacks: [demo-small]\n")
    route = load_routes_file(path, SERVED).route("chat")
    assert route is not None and route.fallbacks == ("demo-small",)
    path.write_text("routes:\n  chat:\n    targets: [{model: demo-v1, weight: 1}]\n"
                    "  chat:\n    targets: [{model: demo-v2, weight: 1}]\n")
    with pytest.raises(RoutesError, match=f"^{re.escape(str(path))}: line 4: 'chat' is given twice$"):
        load_routes_file(path, SERVED)
    path.write_text("routes:\n  chat: [\n")
    with pytest.raises(RoutesError, match=f"^{re.escape(str(path))}: line "):
        load_routes_file(path, SERVED)
    path.write_text("- chat\n")
    with pytest.raises(RoutesError, match="must be a mapping"):
        load_routes_file(path, SERVED)
    path.write_text("routes:\n  chat:\n    targets: [{model: demo-v1, weight: 0}]\n")
    with pytest.raises(RoutesError, match=f"^{re.escape(str(path))}: route 'chat': weights are all zero$"):
        load_routes_file(path, SERVED)
    path.write_text("")
    assert load_routes_file(path, SERVED).routes == {}
    with pytest.raises(RoutesError, match="cannot read"):
        load_routes_file(tmp_path / "missing.yaml", SERVED)


# Editing one route


def test_with_route_returns_a_checked_copy() -> None:
    table = parse_routes({"routes": {"chat": _chat(), "small": {"targets": [{"model": "demo-small", "weight": 1}]}}},
                         SERVED)
    edited = table.with_route(_route("chat", ("demo-v1", 80), ("demo-v2", 20)), SERVED)
    assert edited.route("chat") == _route("chat", ("demo-v1", 80), ("demo-v2", 20))
    assert table.route("chat") == parse_routes({"routes": {"chat": _chat()}}, SERVED).route("chat")  # unchanged
    with pytest.raises(RoutesError, match=r"^fallback cycle: chat -> small -> chat$"):
        edited.with_route(_route("small", ("demo-small", 1), fallbacks=("chat",)), SERVED).with_route(
            _route("chat", ("demo-v1", 1), fallbacks=("small",)), SERVED)
    with pytest.raises(RoutesError, match="target 'demo-v9' is not a model any worker serves"):
        table.with_route(_route("chat", ("demo-v9", 1)), SERVED)
    with pytest.raises(RoutesError, match="weights are all zero"):
        table.with_route(_route("chat", ("demo-v1", 0)), set())
    # Another route naming a model workers no longer serve does not block this edit.
    assert table.with_route(_route("new", ("demo-v3", 1)), {"demo-v3"}).route("new") is not None


# Choosing a target


def test_a_sticky_key_always_gets_the_same_target() -> None:
    route = _route("chat", ("demo-v1", 50), ("demo-v2", 50))
    for key in _keys(200):
        picks = {choose_target(route, key, random.Random(seed)) for seed in range(5)}
        assert len(picks) == 1
    assert len({choose_target(route, key, random.Random(0)) for key in _keys(200)}) == 2


@pytest.mark.parametrize("weights", [(90, 10), (60, 30, 10), (1, 1, 1, 1)])
def test_sticky_and_random_picks_follow_the_weights(weights: tuple[float, ...]) -> None:
    route = _route("chat", *((f"m{index}", weight) for index, weight in enumerate(weights)))
    rng = random.Random(7)
    sticky = Counter(choose_target(route, key, rng) for key in _keys())
    drawn = Counter(choose_target(route, None, rng) for _ in range(KEYS))
    for index, weight in enumerate(weights):
        expected = weight / sum(weights)
        assert abs(sticky[f"m{index}"] / KEYS - expected) <= 0.015
        assert abs(drawn[f"m{index}"] / KEYS - expected) <= 0.015


def test_a_weight_0_target_is_never_chosen() -> None:
    route = _route("chat", ("off", 0), ("demo-v1", 1), ("also-off", 0))
    rng = random.Random(3)
    assert {choose_target(route, key, rng) for key in _keys(5_000)} == {"demo-v1"}
    assert {choose_target(route, None, rng) for _ in range(5_000)} == {"demo-v1"}
    assert {choose_target(route, "", rng) for _ in range(100)} == {"demo-v1"}  # an empty key is no key


def test_raising_one_weight_only_moves_users_to_that_target() -> None:
    before = _route("chat", ("demo-v1", 90), ("demo-v2", 10), ("demo-v3", 30))
    after = _route("chat", ("demo-v1", 90), ("demo-v2", 20), ("demo-v3", 30))
    rng = random.Random(0)
    moves = Counter((choose_target(before, key, rng), choose_target(after, key, rng)) for key in _keys())
    assert moves[("demo-v1", "demo-v2")] > 0 and moves[("demo-v3", "demo-v2")] > 0
    assert moves[("demo-v2", "demo-v2")] == sum(count for (old, _), count in moves.items() if old == "demo-v2")
    assert {(old, new) for old, new in moves if old != new} <= {("demo-v1", "demo-v2"), ("demo-v3", "demo-v2")}


def test_shadow_sampling() -> None:
    rng = random.Random(11)
    route = Route("chat", (Target("demo-v1", 1),), Shadow("demo-v3", 0.2), ())
    share = sum(shadow_sampled(route, rng) for _ in range(KEYS)) / KEYS
    assert abs(share - 0.2) <= 0.015
    assert not any(shadow_sampled(Route("chat", route.targets, Shadow("demo-v3", 0), ()), rng) for _ in range(500))
    assert all(shadow_sampled(Route("chat", route.targets, Shadow("demo-v3", 1), ()), rng) for _ in range(500))
    assert not shadow_sampled(_route("chat", ("demo-v1", 1)), rng)


# Fallbacks, JSON, change descriptions


def test_fallback_chain_expands_routes_without_repeats() -> None:
    table = parse_routes({"routes": {
        "chat": _chat(fallbacks=["small", "demo-v1", "tiny"]),
        "small": {"targets": [{"model": "demo-v3", "weight": 1}, {"model": "demo-small", "weight": 5}],
                  "fallbacks": ["tiny", "demo-v2"]},
        "tiny": {"targets": [{"model": "demo-v1", "weight": 1}, {"model": "demo-v2", "weight": 1}],
                 "fallbacks": ["demo-v3"]},
    }}, SERVED)
    # small -> its main target demo-small, then its own fallbacks: tiny (main target demo-v1 on a tie: the first
    # listed; then demo-v3), demo-v2; then chat's demo-v1 (already there) and tiny (already expanded).
    assert table.fallback_chain("chat") == ["demo-small", "demo-v1", "demo-v3", "demo-v2"]
    assert table.fallback_chain("tiny") == ["demo-v3"]
    assert table.fallback_chain("nowhere") == []


def test_to_json_round_trips() -> None:
    data = {"routes": {"chat": _chat(fallbacks=["small"]),
                       "small": {"targets": [{"model": "demo-small", "weight": 1.5}]}}}
    table = parse_routes(data, SERVED)
    text = json.dumps(table.to_json())
    assert parse_routes(json.loads(text), SERVED) == table
    route = table.route("chat")
    assert route is not None and route_from_json("chat", route.to_json()) == route
    assert route.to_json() == {**_chat(fallbacks=["small"]),
                               "targets": [{"model": "demo-v1", "weight": 90.0}, {"model": "demo-v2", "weight": 10.0}]}
    assert table.route("small") == route_from_json("small", {"targets": [{"model": "demo-small", "weight": 1.5}]})
    with pytest.raises(RoutesError, match=r"^route 'chat': targets\[0\].model: Field required$"):
        route_from_json("chat", {"targets": [{"weight": 1}]})


def test_describe_change() -> None:
    old = Route("chat", (Target("demo-v1", 90), Target("demo-v2", 10)), None, ("demo-small",))
    new = Route("chat", (Target("demo-v1", 80), Target("demo-v2", 20)), Shadow("demo-v3", 0.2), ("demo-small",))
    assert describe_change(old, new) == ("route chat: weights demo-v1 90->80, demo-v2 10->20; "
                                         "shadow none->demo-v3@0.2; fallbacks [demo-small] unchanged")
    moved = Route("chat", (Target("demo-v2", 20), Target("demo-v3", 0.5)), Shadow("demo-v3", 0.2), ())
    assert describe_change(new, moved) == ("route chat: weights demo-v3 none->0.5, demo-v1 80->none; "
                                           "shadow demo-v3@0.2 unchanged; fallbacks [demo-small]->[]")
    assert describe_change(moved, moved) == ("route chat: weights demo-v2 20, demo-v3 0.5 unchanged; "
                                             "shadow demo-v3@0.2 unchanged; fallbacks [] unchanged")
    assert describe_change(None, old) == ("route chat (new): weights demo-v1 90, demo-v2 10; shadow none; "
                                          "fallbacks [demo-small]")


def test_the_example_routes_file_loads() -> None:
    example = Path(__file__).resolve().parents[2] / "configs" / "routes" / "routes.example.yaml"
    table = load_routes_file(example, known_models=())
    route = table.route("chat")
    assert route is not None and [t.weight for t in route.targets] == [90.0, 10.0]
    assert route.shadow is not None and route.shadow.sample == 0.1 and route.fallbacks == ("demo",)
