"""Shared by the Kubernetes deployment tests: deploy/kubernetes rendered, with kustomize or without, and looked up."""

from __future__ import annotations

import copy
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.support import KUBERNETES_DIR

Manifest = dict[str, Any]


def load_kustomization(directory: Path, accumulated: list[Manifest] | None = None) -> list[Manifest]:
    """A reading of kustomization.yaml without kubectl: resources, components, namespace, image tags, JSON6902
    patches. A Component (kind: Component) acts, like kustomize's, on what its parent has accumulated."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs: list[Manifest] = [] if accumulated is None else accumulated
    for resource in kustomization.get("resources", []):
        path = directory / resource
        if path.is_dir():
            docs += load_kustomization(path)
        else:
            docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for component in kustomization.get("components", []):
        docs = load_kustomization(directory / component, docs)
    namespace = kustomization.get("namespace")
    for doc in docs:
        if namespace and doc["kind"] != "Namespace":
            doc["metadata"]["namespace"] = namespace
        for container in containers(doc):
            for image in kustomization.get("images", []):
                if container["image"] == image["name"]:
                    container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        for doc in docs:
            if doc["kind"] == target["kind"] and doc["metadata"]["name"] == target["name"]:
                for op in yaml.safe_load(patch["patch"]):
                    assert op["op"] in ("add", "replace"), op
                    *parents, last = [int(p) if p.isdigit() else p for p in op["path"].strip("/").split("/")]
                    node: Any = doc
                    for part in parents:
                        node = node[part]
                    if isinstance(node, list) and op["op"] == "add":
                        node.insert(len(node) if last == "-" else last, op["value"])
                    elif isinstance(node, list):
                        node[last] = op["value"]
                    else:
                        assert op["op"] == "add" or last in node, f"replace of a missing {op['path']}"
                        node[last] = op["value"]
    return docs


def _kustomize(directory: Path, manual: bool = False) -> list[Manifest]:
    kubectl = None if manual else shutil.which("kubectl")
    if kubectl is not None:
        result = subprocess.run(
            [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stderr
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return load_kustomization(directory)


@cache
def render_kustomization(name: str, components: tuple[str, ...] = (), manual: bool = False) -> tuple[Manifest, ...]:
    """The kustomization as shipped or, with components, as deploy/README.md says to opt in to them: a copy
    with `components:` added to its kustomization.yaml."""
    directory = KUBERNETES_DIR / name
    if not components:
        return tuple(_kustomize(directory, manual))
    with tempfile.TemporaryDirectory() as scratch:
        copy_dir = Path(scratch) / (name or "base")
        shutil.copytree(directory, copy_dir)
        kustomization = yaml.safe_load((copy_dir / "kustomization.yaml").read_text())
        assert not kustomization.get("components"), f"{name}: opt-in components are not listed by default"
        kustomization["components"] = list(components)
        (copy_dir / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
        return tuple(_kustomize(copy_dir, manual))


def manifests(name: str = "", components: tuple[str, ...] = ()) -> list[Manifest]:
    return copy.deepcopy(list(render_kustomization(name, components)))


def find_one(docs: list[Manifest], kind: str, name: str) -> Manifest:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def containers(doc: Manifest) -> list[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    containers: list[dict[str, Any]] = spec.get("containers", [])
    return containers


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container.get("env", [])}


def pod_labels(doc: Manifest) -> dict[str, str]:
    labels: dict[str, str] = doc["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In"
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True
