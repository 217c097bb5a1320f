"""The locally built models by name, and which of them a profile needs.

Names: `demo` (the tiny stdlib-trained target and draft, for fast tests), `smollm2` (SmolLM2-135M-Instruct,
the default model) and `smollm2-eagle3` (its distilled EAGLE-3 draft). A profile needs a build when its
model or draft path names one of their directories under `{models_dir}`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from engine.demo_models import DRAFT_DIR as DEMO_DRAFT_DIR
from engine.demo_models import TARGET_DIR as DEMO_TARGET_DIR
from engine.demo_models import build_demo_models
from engine.profiles import MODELS_DIR_PLACEHOLDER, EngineProfile
from engine.smollm2.target import DRAFT_DIR, TARGET_DIR, build_draft, build_target

BUILDS = ("demo", "smollm2", "smollm2-eagle3")
DIRECTORIES = {DEMO_TARGET_DIR: "demo", DEMO_DRAFT_DIR: "demo", TARGET_DIR: "smollm2", DRAFT_DIR: "smollm2-eagle3"}


def say(message: str) -> None:
    print(f"[models] {message}", file=sys.stderr, flush=True)


def builds_for(profile: EngineProfile) -> list[str]:
    """The builds a profile's model and draft paths refer to, in build order."""
    paths = [profile.model] + ([profile.speculative.model] if profile.speculative and profile.speculative.model
                               else [])
    wanted = set()
    for path in paths:
        if path.startswith(MODELS_DIR_PLACEHOLDER):
            name = path[len(MODELS_DIR_PLACEHOLDER):].strip("/").split("/")[0]
            if name in DIRECTORIES:
                wanted.add(DIRECTORIES[name])
    return [name for name in BUILDS if name in wanted]


def build(names: Iterable[str], models_dir: Path, force: bool = False, report: Callable[[str], None] = say) -> None:
    """Build each named model unless it is already built with the same recipe."""
    for name in names:
        if name == "demo":
            build_demo_models(models_dir, force=force)
        elif name == "smollm2":
            build_target(models_dir, report, force=force)
        elif name == "smollm2-eagle3":
            build_draft(models_dir, report, force=force)
        else:
            raise ValueError(f"unknown model build '{name}'; choose from {', '.join(BUILDS)}")
