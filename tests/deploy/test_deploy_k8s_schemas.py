"""deploy/kubernetes against Kubernetes' JSON schemas, offline, and kustomize's output against the manual reading."""

from __future__ import annotations

import shutil

import pytest

from tests.deploy.k8s_support import Manifest, find_one, load_kustomization, manifests, render_kustomization
from tests.deploy.support import KUBERNETES_DIR

KUSTOMIZATIONS = ("", "multinode", "monitoring")
# Kinds from CRDs, which Kubernetes' own schemas do not cover; checked structurally below.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "PodMonitor")}


def _validate(doc: Manifest) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate (ships the schemas, works offline)"
    )
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_manifests_match_the_kubernetes_schemas(name: str) -> None:
    docs = manifests(name)
    assert docs
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue
        _validate(doc)


def test_schema_validation_rejects_a_misspelled_field() -> None:
    import kubernetes_validate

    deployment = find_one(manifests(), "Deployment", "specgate-gateway")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/ready"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(deployment)


def test_kustomize_renders_the_same_objects_as_the_manual_reading() -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl missing: the manifests are read without kustomize")
    for name in KUSTOMIZATIONS:
        rendered = {(d["kind"], d["metadata"]["name"]) for d in render_kustomization(name)}
        manual = {(d["kind"], d["metadata"]["name"]) for d in load_kustomization(KUBERNETES_DIR / name)}
        assert rendered == manual, name
