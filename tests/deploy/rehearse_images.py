#!/usr/bin/env python3
"""Rehearses the Debian images of deploy/docker/server.Dockerfile without a Docker engine.

Not part of `make test` (it needs Debian's archive and ~3 minutes for debootstrap); run by hand:

    sudo .venv/bin/python tests/deploy/rehearse_images.py [--rootfs /var/tmp/bookworm-rootfs]

1. A minimal Debian bookworm root filesystem from debootstrap stands in for `debian:bookworm-slim`.
2. The `server` and `worker-cpu` stages are "built" by a small interpreter of exactly the
   instructions those stages use — RUN (in a chroot), COPY (from the context, or `--from=build`
   mapped to this checkout after `make`, which is what the build stage runs), ENV, USER,
   WORKDIR, ENTRYPOINT, HEALTHCHECK, and the rest recorded. The `build` stage itself is not
   replayed: its output is this checkout's `bin/`, built by the same `make`.
3. The two images then run as the pods run them: chroot into the image, root filesystem
   read-only, /tmp a tmpfs, volumes bound where the manifests mount them (data dir, secrets,
   models, work dir), uid 10001 with no capabilities, the image's ENV and ENTRYPOINT.
4. Checks: the server answers /healthz and /readyz, its HEALTHCHECK command passes, a key from
   the mounted Secret file works, the worker registers the mounted model, and a lora_null_v2
   job succeeds with downloadable artifacts; both stop with status 0 on SIGTERM.

What this does not cover: the GPU image (its base, nvidia/cuda, is not reachable here) and
the build stage run inside a container."""
import argparse
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import requests

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "docker" / "server.Dockerfile"
POD_UID = 10001
KEY = "sk-ln-" + "R" * 24
TOKEN = "wt-ln-" + "rehearsal" * 3


def log(msg):
    print(f"rehearse: {msg}", flush=True)


# ---- a Dockerfile interpreter for the instructions our Debian stages use ----

def parse(path):
    """{"args": {...}, "stages": [(name, base, [(INSTR, rest)])]} with continuations joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    args, stages = {}, []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "ARG" and not stages:
            k, _, v = rest.partition("=")
            args[k.strip()] = v.strip()
        elif instr == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?$", rest, re.I)
            base = re.sub(r"\$\{(\w+)\}", lambda g: args[g.group(1)], m.group(1))
            stages.append((m.group(2), base, []))
        else:
            stages[-1][2].append((instr, rest.strip()))
    return {"args": args, "stages": stages}


def split_env(rest):
    return dict(tok.split("=", 1) for tok in shlex.split(rest))


def build(df, target, rootfs, out):
    """Materialises stage `target` into directory `out`; returns its image config."""
    stages = {s[0]: s for s in df["stages"]}
    name, base, instrs = stages[target]
    if base in stages:
        config = build(df, base, rootfs, out)
    else:
        assert base == "debian:bookworm-slim", f"cannot rehearse base image {base}"
        log(f"{target}: base {base} <- {rootfs}")
        if out.exists():
            shutil.rmtree(out)
        subprocess.run(["cp", "-a", str(rootfs), str(out)], check=True)
        shutil.copy("/etc/resolv.conf", out / "etc" / "resolv.conf")
        config = {"env": {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
                  "user": "0", "workdir": "/", "shell": ["/bin/sh", "-c"]}
    for instr, rest in instrs:
        if instr == "RUN":
            log(f"{target}: RUN {rest[:90]}…")
            env = dict(config["env"])
            r = subprocess.run(["chroot", str(out)] + config["shell"] + [rest], env=env,
                               capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"rehearse: {target}: RUN failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        elif instr == "COPY":
            m = re.match(r"((?:--\S+\s+)*)(\S+)\s+(\S+)$", rest)
            flags, src, dst = m.group(1).split(), m.group(2), m.group(3)
            opts = dict(f[2:].split("=", 1) for f in flags)
            if "from" in opts:
                assert opts["from"] == "build" and src.startswith("/src/"), rest
                src_path = ROOT / src[len("/src/"):]  # the build stage's /src is this checkout after make
            else:
                src_path = ROOT / src
            assert src_path.exists(), f"COPY source {src_path} does not exist (run make?)"
            dest = out / dst.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            if src_path.is_dir():
                shutil.copytree(src_path, dest, dirs_exist_ok=True)
            else:
                shutil.copy2(src_path, dest)
            if "chmod" in opts:
                dest.chmod(int(opts["chmod"], 8))
            log(f"{target}: COPY {src} -> {dst}")
        elif instr == "ENV":
            config["env"].update(split_env(rest))
        elif instr == "USER":
            config["user"] = rest
        elif instr == "WORKDIR":
            config["workdir"] = rest
            (out / rest.lstrip("/")).mkdir(parents=True, exist_ok=True)
        elif instr == "SHELL":
            config["shell"] = json.loads(rest)
        elif instr == "ENTRYPOINT":
            config["entrypoint"] = json.loads(rest)
        elif instr == "HEALTHCHECK":
            config["healthcheck"] = json.loads(rest.split(" CMD ", 1)[1])
        elif instr in ("EXPOSE", "VOLUME", "STOPSIGNAL", "LABEL"):
            config.setdefault(instr.lower(), []).append(rest)
        else:
            sys.exit(f"rehearse: {target}: instruction {instr} is not supported by this rehearsal")
    return config


# ---- running an image as a pod runs it ----

RUN_IN_POD = r'''
set -eu
img=$1; shift
binds=$1; shift
workdir=$1; shift
mount --bind "$img" "$img"
old_ifs=$IFS; IFS=';'
for b in $binds; do
    src=${b%%=*}; rest=${b#*=}; dst=$img${rest%=*}; mode=${rest##*=}
    mkdir -p "$dst"
    mount --bind "$src" "$dst"
    [ "$mode" = rw ] || mount -o remount,bind,ro "$dst"
done
IFS=$old_ifs
mount -t proc proc "$img/proc"
mount -t tmpfs -o size=256m,mode=1777 tmpfs "$img/tmp"
mount -o remount,bind,ro "$img"
exec chroot --userspec=10001:10001 --groups=10001 "$img" \
    setpriv --no-new-privs --inh-caps=-all --bounding-set=-all env -C "$workdir" "$@"
'''


def run_image(img, config, volumes, args=(), logfile=None, wait=False):
    """Starts the image's ENTRYPOINT (+args) in a pod-like sandbox; volumes = {host: (path, rw|ro)}."""
    binds = ";".join(f"{h}={c}={m}" for h, (c, m) in volumes.items())
    env = {k: v for k, v in config["env"].items()}
    env["HOME"] = "/nonexistent"
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", RUN_IN_POD, "run-in-pod",
           str(img), binds, config["workdir"]] + config["entrypoint"] + list(args)
    if wait:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    return subprocess.Popen(cmd, env=env, stdout=open(logfile, "ab"), stderr=subprocess.STDOUT)


def exec_in(img, config, volumes, argv):
    """Runs argv in the image like `docker exec` (for the HEALTHCHECK command)."""
    c = dict(config, entrypoint=argv)
    return run_image(img, c, volumes, wait=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rootfs", default="/var/tmp/bookworm-rootfs")
    ap.add_argument("--work", default=None, help="scratch dir (default: a new one under /var/tmp)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("rehearse: needs root (debootstrap, chroot, mount namespaces)")
    for b in ("loranull-server", "loranull-worker", "loranull"):
        if not (ROOT / "bin" / b).exists():
            sys.exit(f"rehearse: bin/{b} missing: run make")
    rootfs = pathlib.Path(a.rootfs)
    if not (rootfs / "etc" / "debian_version").exists():
        log(f"debootstrap bookworm -> {rootfs} (a few minutes)")
        subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs),
                        "http://deb.debian.org/debian"], check=True, stdout=subprocess.DEVNULL)
    work = pathlib.Path(a.work or tempfile.mkdtemp(prefix="loranull-rehearse-", dir="/var/tmp"))
    work.chmod(0o755)
    df = parse(DOCKERFILE)
    t0 = time.time()
    server_img, worker_img = work / "img-server", work / "img-worker-cpu"
    server_cfg = build(df, "server", rootfs, server_img)
    worker_cfg = build(df, "worker-cpu", rootfs, worker_img)
    log(f"both images built in {time.time() - t0:.0f} s; "
        f"server image {subprocess.run(['du', '-sh', str(server_img)], capture_output=True, text=True).stdout.split()[0]}")
    assert server_cfg["user"] == worker_cfg["user"] == "10001:10001", "images must run as 10001"

    # volumes as the kubelet presents them
    vol = {n: work / "vol" / n for n in ("data", "secrets", "models", "work")}
    for n, d in vol.items():
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, POD_UID if n in ("data", "work") else 0, POD_UID)
        d.chmod(0o750)
    (vol["secrets"] / "api-keys").write_text(f"rehearsal {KEY}\n")
    (vol["secrets"] / "worker-token").write_text(TOKEN + "\n")
    for f in vol["secrets"].iterdir():
        os.chown(f, 0, POD_UID)
        f.chmod(0o440)
    cfg = work / "tiny.json"
    cfg.write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2}))
    subprocess.run([str(ROOT / "bin" / "loranull"), "model", "new", "--config", str(cfg), "--out",
                    str(vol["models"] / "tiny-llama")], check=True, capture_output=True)
    subprocess.run(["chgrp", "-R", str(POD_UID), str(vol["models"])], check=True)
    subprocess.run(["chmod", "-R", "g+rX", str(vol["models"])], check=True)

    port = free_port()
    server_cfg["env"]["LORANULL_LISTEN"] = f"127.0.0.1:{port}"  # the pod's 0.0.0.0, kept to loopback here
    iport = free_port()  # the workers' port (the k8s base sets LORANULL_INTERNAL_LISTEN)
    server_cfg["env"]["LORANULL_INTERNAL_LISTEN"] = f"127.0.0.1:{iport}"
    base = f"http://127.0.0.1:{port}"
    server_vols = {vol["data"]: ("/var/lib/loranull", "rw"), vol["secrets"]: ("/run/secrets/loranull", "ro")}
    slog, wlog = work / "server.log", work / "worker.log"
    server = run_image(server_img, server_cfg, server_vols, logfile=slog)
    worker = None
    ok = False
    try:
        deadline = time.time() + 20
        while True:
            if server.poll() is not None:
                sys.exit(f"rehearse: server exited {server.returncode}:\n{slog.read_text()[-3000:]}")
            try:
                if requests.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                sys.exit(f"rehearse: server not ready:\n{slog.read_text()[-3000:]}")
            time.sleep(0.1)
        assert requests.get(base + "/healthz").status_code == 200
        hc = exec_in(server_img, server_cfg, server_vols, server_cfg["healthcheck"])
        assert hc.returncode == 0, f"server HEALTHCHECK failed: {hc.stderr}"
        log("server image: /healthz, /readyz and its HEALTHCHECK pass")
        api = requests.Session()
        api.headers["Authorization"] = f"Bearer {KEY}"
        assert api.get(base + "/v1/files").status_code == 200, "the key from the Secret file is refused"
        log("server image: the API key from the mounted Secret file works")

        worker_cfg["env"]["LORANULL_SERVER_URL"] = f"http://127.0.0.1:{iport}"
        worker_cfg["env"]["LORANULL_GRACE_S"] = "20"
        worker_vols = {vol["models"]: ("/models", "ro"), vol["work"]: ("/var/lib/loranull-worker", "rw"),
                       vol["secrets"]: ("/run/secrets/loranull", "ro")}
        worker = run_image(worker_img, worker_cfg, worker_vols, logfile=wlog)
        lines = [json.dumps({"text": f"fact {i}: item {i} is {i * 7 % 13}."}) for i in range(32)]
        fid = api.post(base + "/v1/files", data={"purpose": "fine-tune"},
                       files={"file": ("t.jsonl", ("\n".join(lines) + "\n").encode())}).json()["id"]
        r = api.post(base + "/v1/fine_tuning/jobs", json={
            "model": "tiny-llama", "training_file": fid, "seed": 1,
            "hyperparameters": {"n_epochs": 1, "batch_size": 4, "max_seq_len": 32},
            "adapter": {"type": "lora_null_v2", "rank": 2, "calibration": {"samples": 8, "max_length": 32}},
            "resources": {"ranks": 1, "device": "cpu"}})
        assert r.status_code in (200, 201), r.text
        job_id = r.json()["id"]
        deadline = time.time() + 120
        while True:
            job = api.get(f"{base}/v1/fine_tuning/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            if worker.poll() is not None:
                sys.exit(f"rehearse: worker exited {worker.returncode}:\n{wlog.read_text()[-3000:]}")
            if time.time() > deadline:
                sys.exit(f"rehearse: job still {job['status']}:\n{wlog.read_text()[-3000:]}")
            time.sleep(0.2)
        assert job["status"] == "succeeded", f"job {job['status']}: {job.get('error')}\n{wlog.read_text()[-3000:]}"
        sizes = [len(api.get(f"{base}/v1/files/{f}/content").content) for f in job["result_files"]]
        assert sizes and all(sizes), sizes
        log(f"worker-cpu image: job {job_id} succeeded, {len(sizes)} artifact(s) of {sizes} bytes")
        ok = True
    finally:
        for name, p in (("worker", worker), ("server", server)):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    rc = p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    rc = p.wait()
                log(f"{name} stopped on SIGTERM with status {rc}")
                ok = ok and rc == 0
    log("PASS" if ok else "FAIL")
    log(f"logs and images under {work}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
