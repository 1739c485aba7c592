"""deploy/: every Kubernetes manifest and overlay renders, validates against the Kubernetes
schemas (kubernetes-validate, strict: unknown fields are errors), passes yamllint, and has the
properties deploy/README.md promises; the Dockerfiles pass hadolint and the entrypoints
shellcheck; the images install every shared library the binaries link.

No Docker engine runs here, so the images themselves are not built by these tests."""
import pathlib
import re
import subprocess

import kubernetes_validate
import pytest
import yaml

from deploy_helpers import (DEPLOY, DOCKER, K8S, KUSTOMIZATIONS, ROOT, by_kind, container, env_of, one,
                            render, tool)

# The oldest Kubernetes minor still commonly run, and the newest kubernetes-validate knows.
K8S_VERSIONS = ["1.28.0", kubernetes_validate.latest_version()]


def validate_all(docs, where):
    errors = []
    for doc in docs:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                errors.append(f"{where}: {doc['kind']}/{doc['metadata']['name']} "
                              f"(k8s {version}): {e.message} at {'/'.join(map(str, e.path))}")
    assert not errors, "\n".join(errors)


@pytest.fixture(scope="module")
def rendered():
    """Every kustomization, rendered once for this module."""
    return {name: render(path) for name, path in KUSTOMIZATIONS.items()}


# ---- render + schema ----

@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_kustomization_renders_and_validates(name, rendered):
    validate_all(rendered[name], name)


def resource_files():
    """Every file a kustomization lists under `resources:` (the plain manifests)."""
    out = []
    for path in KUSTOMIZATIONS.values():
        k = yaml.safe_load((path / "kustomization.yaml").read_text())
        out += [path / r for r in k.get("resources", [])]
    return out


@pytest.mark.parametrize("path", resource_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_each_manifest_file_validates(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs, f"{path} holds no resource"
    validate_all(docs, str(path.relative_to(ROOT)))


def test_validator_rejects_a_broken_manifest():
    # The schema check must be able to fail: a typo'd field and a wrong type are errors.
    doc = yaml.safe_load((K8S / "base" / "server-deployment.yaml").read_text())
    doc["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
    doc["spec"]["replicas"] = 1
    doc["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


def test_every_deploy_file_is_listed_by_a_kustomization():
    # A manifest that no kustomization lists is never applied: catch the forgotten file.
    listed = set()
    for path in KUSTOMIZATIONS.values():
        k = yaml.safe_load((path / "kustomization.yaml").read_text())
        for key in ("resources", "patchesStrategicMerge", "bases"):
            listed |= {(path / r).resolve() for r in k.get(key, [])}
    for f in K8S.rglob("*.yaml"):
        if f.name != "kustomization.yaml":
            assert f.resolve() in listed, f"{f.relative_to(ROOT)} is in no kustomization"


def test_yamllint_clean():
    r = subprocess.run([tool("yamllint"), "-s", "-f", "parsable", "-c", str(DEPLOY / "yamllint.yaml"),
                        str(DEPLOY)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"yamllint:\n{r.stdout}{r.stderr}"


# ---- what the README promises, checked on the rendered output ----

@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_server_deployment(name, rendered):
    docs = rendered[name]
    d = one(docs, "Deployment", "loranull-server")
    assert d["spec"]["replicas"] == 1, "SQLite has one writer: one server replica"
    assert d["spec"]["strategy"]["type"] == "Recreate", "no two servers on one database, ever"
    pod = d["spec"]["template"]
    spec = pod["spec"]
    c = container(spec, "server")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert set(ports) >= {"http"}
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["port"] in ports, f"{probe} names an unknown port"
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
    assert int(ann["prometheus.io/port"]) == ports["http"]
    env = env_of(c)
    assert env["LORANULL_LISTEN"].endswith(f":{ports['http']}"), "listen port != containerPort"
    for res in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][res])
    assert_locked_down(spec, c)
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    data = volumes[mounts[env["LORANULL_DATA_DIR"]]["name"]]
    claim = data["persistentVolumeClaim"]["claimName"]
    pvc = one(docs, "PersistentVolumeClaim", claim)
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    # secrets arrive as files, in the directory the entrypoint reads them from
    secret_dir = pathlib.PurePosixPath(env["LORANULL_WORKER_TOKEN_FILE"]).parent
    assert str(pathlib.PurePosixPath(env["LORANULL_API_KEYS_FILE"]).parent) == str(secret_dir)
    assert mounts[str(secret_dir)].get("readOnly") is True
    paths = {item["path"]: src["secret"]["name"]
             for src in volumes[mounts[str(secret_dir)]["name"]]["projected"]["sources"]
             for item in src["secret"]["items"]}
    assert set(paths) == {"api-keys", "worker-token"}
    assert_secrets_resolve(name, docs, paths.values())
    # the Service reaches the pod
    svc = one(docs, "Service", "loranull-server")
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports)


def assert_locked_down(spec, c):
    """Non-root, read-only root filesystem, no privilege escalation, no capabilities, writable /tmp."""
    psc = spec["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert spec["automountServiceAccountToken"] is False
    tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert tmp, "read-only root needs a writable /tmp"
    vol = {v["name"]: v for v in spec["volumes"]}[tmp[0]["name"]]
    assert "emptyDir" in vol


def assert_secrets_resolve(overlay, docs, names):
    """cpu-dev generates its Secrets (kustomize renames them with a hash suffix and rewrites
    every reference, so a reference must match a rendered Secret); base and gpu leave them to
    the operator, under the names deploy/README.md documents."""
    rendered_secrets = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
    for n in names:
        if overlay == "cpu-dev":
            assert n in rendered_secrets, f"reference to Secret {n} that cpu-dev does not render"
        else:
            assert n in ("loranull-api-keys", "loranull-worker-token"), n


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_worker_statefulset(name, rendered):
    docs = rendered[name]
    s = one(docs, "StatefulSet", "loranull-worker")
    spec = s["spec"]["template"]["spec"]
    c = container(spec, "worker")
    env = env_of(c)
    # a stable network identity: the headless Service the StatefulSet names exists
    headless = one(docs, "Service", s["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"].items() <= s["spec"]["template"]["metadata"]["labels"].items()
    assert s["spec"]["selector"]["matchLabels"].items() <= s["spec"]["template"]["metadata"]["labels"].items()
    # long enough to write and upload a checkpoint after SIGTERM, and the worker's own deadline
    # (--grace-s) ends before Kubernetes' SIGKILL, with time to report
    grace = spec["terminationGracePeriodSeconds"]
    assert grace >= 120
    assert 0 < int(env["LORANULL_GRACE_S"]) <= grace - 10, "worker grace must end before the pod's"
    assert_locked_down(spec, c)
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    work = mounts[env["LORANULL_WORK_DIR"]]
    assert "emptyDir" in {v["name"]: v for v in spec["volumes"]}[work["name"]], "work dir must be writable"
    models = mounts[env["LORANULL_MODELS_DIR"]]
    assert models.get("readOnly") is True
    vol = {v["name"]: v for v in spec["volumes"]}[models["name"]]
    assert vol["persistentVolumeClaim"]["readOnly"] is True
    one(docs, "PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"])
    token_dir = str(pathlib.PurePosixPath(env["LORANULL_TOKEN_FILE"]).parent)
    secret_vol = {v["name"]: v for v in spec["volumes"]}[mounts[token_dir]["name"]]
    assert_secrets_resolve(name, docs, [secret_vol["secret"]["secretName"]])
    # the worker and server agree on the token: the same Secret
    server = one(docs, "Deployment", "loranull-server")["spec"]["template"]["spec"]
    server_token_secrets = {src["secret"]["name"] for v in server["volumes"] if "projected" in v
                            for src in v["projected"]["sources"]
                            if any(i["path"] == "worker-token" for i in src["secret"]["items"])}
    assert server_token_secrets == {secret_vol["secret"]["secretName"]}
    # the worker talks to the server's Service on its port
    svc = one(docs, "Service", "loranull-server")
    m = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", env["LORANULL_SERVER_URL"])
    assert m and m.group(1) == svc["metadata"]["name"]
    assert int(m.group(2)) in {p["port"] for p in svc["spec"]["ports"]}
    gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
    if name == "gpu":
        assert env["LORANULL_DEVICE"].startswith("cuda:")
        assert int(gpus) == int(env["LORANULL_RANKS"]), "one rank per GPU of the pod"
        # a GPU worker drives one GPU (it refuses --ranks > 1): a GPU gang spreads over pods, NCCL
        # between them over the pod network, rank 0's address in the id, not the advertise host
        assert int(gpus) == 1 and env["LORANULL_DEVICE"] == "cuda:0"
        assert env.get("NCCL_SOCKET_IFNAME") and "valueFrom" in next(
            e for e in c["env"] if e["name"] == "LORANULL_ADVERTISE_HOST")
        assert c["resources"]["requests"]["nvidia.com/gpu"] == gpus
        assert spec["terminationGracePeriodSeconds"] >= 600
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    else:
        assert env["LORANULL_DEVICE"] == "cpu" and gpus is None


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_policies_select_the_pods(name, rendered):
    docs = rendered[name]
    server_labels = one(docs, "Deployment", "loranull-server")["spec"]["template"]["metadata"]["labels"]
    worker_labels = one(docs, "StatefulSet", "loranull-worker")["spec"]["template"]["metadata"]["labels"]
    pdb = one(docs, "PodDisruptionBudget", "loranull-worker")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= worker_labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1
    pols = {p["metadata"]["name"]: p["spec"] for p in by_kind(docs, "NetworkPolicy")}
    assert pols["loranull-server"]["podSelector"]["matchLabels"].items() <= server_labels.items()
    w = pols["loranull-worker"]
    assert w["podSelector"]["matchLabels"].items() <= worker_labels.items()
    # workers accept connections only from workers (NCCL); nothing else reaches them
    for rule in w["ingress"]:
        for peer in rule["from"]:
            assert peer["podSelector"]["matchLabels"].items() <= worker_labels.items()
    # workers may reach the server
    assert any(peer.get("podSelector", {}).get("matchLabels", {}).items() <= server_labels.items()
               and "namespaceSelector" not in peer
               for rule in w["egress"] for peer in rule.get("to", []))
    # the server's internal port (/internal/v1 only, --internal-listen) admits worker pods alone;
    # every rule that opens it names only worker pods, and workers reach the server only there
    server = one(docs, "Deployment", "loranull-server")["spec"]["template"]["spec"]
    c = container(server, "server")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert env_of(c)["LORANULL_INTERNAL_LISTEN"].endswith(f":{ports['internal']}")
    assert ports["internal"] != ports["http"]
    svc = one(docs, "Service", "loranull-server")
    assert {p["name"]: p["targetPort"] for p in svc["spec"]["ports"]}["internal"] == "internal"
    opening = [r for r in pols["loranull-server"]["ingress"]
               if any(p["port"] in ("internal", ports["internal"]) for p in r.get("ports", []))]
    assert opening, "no rule admits workers to the internal port"
    for rule in opening:
        assert rule.get("from"), "the internal port is open to everyone"
        for peer in rule["from"]:
            assert "namespaceSelector" not in peer and "ipBlock" not in peer
            assert peer["podSelector"]["matchLabels"].items() <= worker_labels.items()
    # and no other rule opens every port (a rule without ports would)
    assert all(r.get("ports") for r in pols["loranull-server"]["ingress"])
    to_server = [r for r in w["egress"] for peer in r.get("to", [])
                 if peer.get("podSelector", {}).get("matchLabels", {}).items() <= server_labels.items()]
    assert all({p["port"] for p in r["ports"]} == {"internal"} for r in to_server)
    worker = one(docs, "StatefulSet", "loranull-worker")["spec"]["template"]["spec"]
    url = env_of(container(worker, "worker"))["LORANULL_SERVER_URL"]
    internal_svc_port = {p["name"]: p["port"] for p in svc["spec"]["ports"]}["internal"]
    assert url.rstrip("/").endswith(f":{internal_svc_port}"), "workers must use the internal port"


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_manifest_env_is_what_the_entrypoints_read(name, rendered):
    # A typo in an env name would be silently ignored by the entrypoint: every LORANULL_* a
    # pod sets must be one the image's entrypoint script reads.
    docs = rendered[name]
    pairs = [(one(docs, "Deployment", "loranull-server"), "server", "server-entrypoint.sh"),
             (one(docs, "StatefulSet", "loranull-worker"), "worker", "worker-entrypoint.sh")]
    for obj, cname, script in pairs:
        text = (DOCKER / script).read_text()
        for var in env_of(container(obj["spec"]["template"]["spec"], cname)):
            if var.startswith("LORANULL_"):
                assert re.search(r"\$\{?" + var + r"\b", text), f"{script} never reads {var}"


def test_overlays_pick_images_and_namespaces(rendered):
    images = {n: {c["image"] for d in docs if d["kind"] in ("Deployment", "StatefulSet")
                  for c in d["spec"]["template"]["spec"]["containers"]}
              for n, docs in rendered.items()}
    assert images["cpu-dev"] == {"loranull/server:dev", "loranull/worker-cpu:dev"}
    assert all(":" in i for i in images["gpu"]), "gpu images are pinned to a tag"
    for overlay, ns in (("cpu-dev", "loranull-dev"), ("gpu", "loranull")):
        one(rendered[overlay], "Namespace", ns)
        for d in rendered[overlay]:
            if d["kind"] != "Namespace":
                assert d["metadata"].get("namespace") == ns, f"{d['kind']}/{d['metadata']['name']}"


# ---- Dockerfiles and entrypoints ----

DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))


def test_hadolint_clean():
    assert len(DOCKERFILES) == 2
    r = subprocess.run([tool("hadolint"), "--config", str(DOCKER / "hadolint.yaml"), "--no-color"]
                       + [str(f) for f in DOCKERFILES], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"hadolint:\n{r.stdout}{r.stderr}"


def test_shellcheck_entrypoints():
    scripts = sorted(DOCKER.glob("*.sh"))
    assert len(scripts) == 2
    r = subprocess.run([tool("shellcheck"), "-s", "sh"] + [str(s) for s in scripts],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"shellcheck:\n{r.stdout}{r.stderr}"


def dockerfile_stages(path):
    """[(from_line, [instruction lines])] with continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append((line, []))
        elif stages:
            stages[-1][1].append(line)
    return stages


def apt_installs(lines):
    pkgs = set()
    for line in lines:
        for m in re.finditer(r"apt-get install ([^&]*)", line):
            pkgs |= {w for w in m.group(1).split() if not w.startswith("-")}
    return pkgs


def copied_paths(lines):
    """Sources of COPY --from=build, relative to the build stage's /src."""
    out = []
    for line in lines:
        m = re.match(r"COPY\s+(?:--chmod=\S+\s+)?--from=build\s+/src/(\S+)\s", line)
        if m:
            out.append(m.group(1))
    return out


def test_dockerfiles_copy_what_exists():
    for f in DOCKERFILES:
        for _, lines in dockerfile_stages(f):
            for line in lines:
                m = re.match(r"COPY\s+(?:--chmod=\S+\s+)?(?!--from)(\S+)\s+\S+$", line)
                if m and m.group(1) != ".":
                    assert (ROOT / m.group(1)).exists(), f"{f.name}: COPY {m.group(1)}: no such file"
            makefile = (ROOT / "Makefile").read_text()
            for src in copied_paths(lines):
                # a program `make` builds: bin/<prog> (PROGS) or a target with its own rule
                assert src.startswith("bin/") or re.search(rf"^{re.escape(src)}:", makefile, re.M), \
                    f"{f.name}: copies {src}, which no Makefile rule builds"


# The dynamic libraries every image gets from its base; not listed in the Dockerfiles.
BASE_PACKAGES = {"libc6", "libgcc-s1", "libstdc++6", "zlib1g"}


def direct_packages_of(binary):
    """Packages of the libraries the binary itself NEEDs (not their own dependencies, which
    apt pulls in): the list a Dockerfile must name. One `dpkg -S` for all paths (it is slow)."""
    r = subprocess.run(["objdump", "-p", str(binary)], capture_output=True, text=True, check=True)
    needed = re.findall(r"NEEDED\s+(\S+)", r.stdout)
    ldd = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    where = dict(re.findall(r"^\s*(\S+)\s+=>\s+(/\S+)", ldd, re.M))
    candidates = {}
    for lib in needed:
        assert lib in where, f"{binary} needs {lib}, which ldd cannot find"
        candidates[lib] = [where[lib], str(pathlib.Path(where[lib]).resolve())]
    q = subprocess.run(["dpkg", "-S"] + sorted({p for c in candidates.values() for p in c}),
                       capture_output=True, text=True)
    owner = {}
    for line in q.stdout.splitlines():
        pkgs, _, path = line.partition(": ")
        owner[path.strip()] = pkgs.split(",")[0].strip()
    pkgs = {}
    for lib, paths in candidates.items():
        found = [owner[p] for p in paths if p in owner]
        if not found and re.match(r"lib(cu|nccl|nvrtc|nvJitLink)", lib):
            pkgs[lib] = "CUDA"  # from the CUDA toolkit, not Debian: the nvidia/cuda base provides it
            continue
        if not found:
            pytest.fail(f"{binary} needs {lib} ({where[lib]}), which no Debian package owns")
        pkgs[lib] = found[0]
    return pkgs


# -dev packages on this build machine map to their runtime package in the image:
# liblapack.so.3 / libblas.so.3 come through the alternatives of OpenBLAS or reference LAPACK.
EQUIVALENT = {
    "libopenblas0-pthread": "libopenblas0", "libopenblas0-openmp": "libopenblas0",
    "libopenblas0-serial": "libopenblas0", "liblapack3": "liblapacke", "libblas3": "libopenblas0",
    "libcurl4-openssl-dev": "libcurl4", "libcurl3-gnutls": "libcurl4",
}


@pytest.mark.parametrize("binary,dockerfile", [
    ("bin/loranull-server", "server.Dockerfile"),
    ("build/cuda/bin/loranull-worker", "worker.Dockerfile"),
    ("bin/loranull-worker", "server.Dockerfile"),  # the worker-cpu target
])
def test_image_installs_every_linked_library(binary, dockerfile):
    exe = ROOT / binary
    if binary.startswith("build/cuda/") and not exe.exists():
        # `make cuda-bin` was not run here (or nvcc is absent): the CPU build's libraries are the
        # CUDA build's minus the CUDA ones, so they are checked instead
        exe = ROOT / "bin" / exe.name
    assert exe.exists(), f"{exe} is not built: run `make`"
    copies = [src for _, lines in dockerfile_stages(DOCKER / dockerfile) for src in copied_paths(lines)]
    assert binary in copies, f"{dockerfile} does not copy {binary} (it copies {copies})"
    stages = dockerfile_stages(DOCKER / dockerfile)
    runtime = set()
    for from_line, lines in stages:
        if " AS build" not in from_line:
            runtime |= apt_installs(lines)
    needed = direct_packages_of(exe)
    cuda = sorted(lib for lib, pkg in needed.items() if pkg == "CUDA")
    if dockerfile == "worker.Dockerfile":
        # the CUDA libraries come with the nvidia/cuda runtime base; the image checks at build
        # time that its base has each one the backend links
        checked = (DOCKER / dockerfile).read_text()
        for lib in cuda:
            assert lib.split(".so")[0] + ".so" in checked, f"{dockerfile} does not check its base has {lib}"
    else:
        assert not cuda, (f"{binary} links CUDA ({cuda}); the Debian worker-cpu image needs a "
                          "CPU-only build of the worker")
    missing = {lib: pkg for lib, pkg in needed.items()
               if pkg != "CUDA" and pkg.split(":")[0] not in BASE_PACKAGES
               and EQUIVALENT.get(pkg.split(":")[0], pkg.split(":")[0]) not in runtime}
    assert not missing, f"{dockerfile} does not install the packages of {binary}'s libraries: {missing}"


def test_images_install_the_makefile_link_libraries(tmp_path):
    # Independent of which binaries exist yet: link an empty program with exactly the Makefile's
    # LDLIBS (every library kept, --no-as-needed) and check both images install their packages.
    m = re.search(r"^LDLIBS\s*:=\s*(.*)$", (ROOT / "Makefile").read_text(), re.M)
    assert m, "Makefile has no LDLIBS line"
    src = tmp_path / "probe.c"
    src.write_text("int main(void) { return 0; }\n")
    exe = tmp_path / "probe"
    subprocess.run(["gcc", "-fopenmp", "-o", str(exe), str(src), "-Wl,--no-as-needed"]
                   + m.group(1).split(), check=True, capture_output=True)
    needed = direct_packages_of(exe)
    assert len(needed) >= 8, f"the probe links too few libraries to mean anything: {needed}"
    for dockerfile in ("server.Dockerfile", "worker.Dockerfile"):
        runtime = set()
        for from_line, lines in dockerfile_stages(DOCKER / dockerfile):
            if " AS build" not in from_line:
                runtime |= apt_installs(lines)
        missing = {lib: pkg for lib, pkg in needed.items()
                   if pkg.split(":")[0] not in BASE_PACKAGES
                   and EQUIVALENT.get(pkg.split(":")[0], pkg.split(":")[0]) not in runtime}
        assert not missing, f"{dockerfile} lacks the packages of the Makefile's libraries: {missing}"


def ingress_matches(rule_path, path_type, request_path):
    """Kubernetes Ingress path matching: Exact is string equality; Prefix compares whole
    '/'-separated elements ("/v1" matches "/v1" and "/v1/files", not "/v10")."""
    if path_type == "Exact":
        return request_path == rule_path
    want = [p for p in rule_path.split("/") if p]
    have = [p for p in request_path.split("/") if p]
    return have[:len(want)] == want


def test_ingress_exposes_public_paths_only(rendered):
    ing = one(rendered["gpu"], "Ingress", "loranull")
    rules = [(p["path"], p["pathType"]) for r in ing["spec"]["rules"] for p in r["http"]["paths"]]
    assert all(t in ("Exact", "Prefix") for _, t in rules), "ImplementationSpecific is not portable"

    def routed(path):
        return any(ingress_matches(p, t, path) for p, t in rules)
    for public in ("/v1/files", "/v1/fine_tuning/jobs/ftjob-1/events", "/", "/vendor/chart.js"):
        assert routed(public), f"{public} is not routed"
    for private in ("/internal/v1/lease", "/internal/v1/workers/register", "/metrics", "/healthz"):
        assert not routed(private), f"{private} must not be reachable from outside"


def test_readme_documents_every_entrypoint_setting():
    readme = (DEPLOY / "README.md").read_text()
    for script in sorted(DOCKER.glob("*.sh")):
        names = set(re.findall(r"\$\{?(LORANULL_[A-Z_]+)", script.read_text()))
        assert names, f"{script.name} reads no LORANULL_* setting?"
        undocumented = sorted(n for n in names if f"`{n}`" not in readme)
        assert not undocumented, f"deploy/README.md does not document {undocumented} ({script.name})"


def test_image_env_is_what_the_entrypoints_read():
    # ENV lines of each image stage that runs an entrypoint name settings that script reads.
    for f in DOCKERFILES:
        for _, lines in dockerfile_stages(f):
            entry = [ln for ln in lines if ln.startswith("ENTRYPOINT")]
            if not entry:
                continue
            script = re.search(r"/([a-z-]+-entrypoint\.sh)", entry[0]).group(1)
            text = (DOCKER / script).read_text()
            for ln in lines:
                if ln.startswith("ENV "):
                    for var in re.findall(r"(LORANULL_[A-Z_]+)=", ln):
                        assert re.search(r"\$\{?" + var + r"\b", text), f"{f.name}: {script} never reads {var}"
