"""Helpers shared by tests/deploy/*: rendering kustomizations and finding the linters.

(Not a conftest.py: tests/conftest.py already owns that module name.)

Renderer: `kustomize build` if a standalone kustomize is on PATH, else `kubectl kustomize`
(Debian's kubernetes-client ships kubectl with kustomize v2.0.3 built in; `make deps` installs
it where no kubectl exists). LORANULL_KUSTOMIZE="kubectl kustomize" (a command line) overrides.
A missing renderer or linter fails the test with what to install; nothing is skipped."""
import os
import pathlib
import shlex
import shutil
import subprocess

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKER = DEPLOY / "docker"
KUSTOMIZATIONS = {
    "base": K8S / "base",
    "cpu-dev": K8S / "overlays" / "cpu-dev",
    "gpu": K8S / "overlays" / "gpu",
}


def kustomize_command():
    """The command line that renders a kustomization directory given as its last argument."""
    env = os.environ.get("LORANULL_KUSTOMIZE")
    if env:
        return shlex.split(env)
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    pytest.fail("no kustomize renderer: install Debian's kubernetes-client (make deps) "
                "or put kustomize on PATH")


def render(directory):
    """Renders a kustomization; returns the list of resources (dicts) it produces."""
    cmd = kustomize_command() + [str(directory)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stderr}"
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    assert docs, f"{' '.join(cmd)} rendered nothing"
    return docs


def tool(name):
    """A linter from .venv/bin (PyPI) or PATH (Debian); fails the test if neither has it."""
    venv = ROOT / ".venv" / "bin" / name
    if venv.exists():
        return str(venv)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: run `make deps`")
    return found


def by_kind(docs, kind, name=None):
    """The resources of one kind (and name); asserts that at least one exists."""
    out = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert out, f"no {kind} {name or ''} in the rendered manifests"
    return out


def one(docs, kind, name):
    found = by_kind(docs, kind, name)
    assert len(found) == 1, f"{len(found)} {kind}/{name} rendered, expected one"
    return found[0]


def container(pod_spec, name):
    for c in pod_spec["containers"]:
        if c["name"] == name:
            return c
    pytest.fail(f"no container {name} in the pod spec")


def env_of(c):
    return {e["name"]: e.get("value") for e in c.get("env", [])}
