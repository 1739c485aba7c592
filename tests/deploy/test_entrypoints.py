"""The container entrypoints, run on this machine exactly as the images run them: the same
scripts, flags and environment variables, with only the image paths (binaries, data dir,
secret files) pointed elsewhere through the environment the scripts document.

What the images add around them (Debian slim / CUDA runtime, uid 10001, read-only root) is not
reproduced here: there is no Docker engine on this machine."""
import base64
import json
import os
import pathlib
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import pytest
import requests

from deploy_helpers import DOCKER, KUSTOMIZATIONS, ROOT, render

SERVER_SH = DOCKER / "server-entrypoint.sh"
WORKER_SH = DOCKER / "worker-entrypoint.sh"
BIN = pathlib.Path(os.environ.get("LORANULL_BIN", ROOT / "bin"))
SERVER_BIN = BIN / "loranull-server"
WORKER_BIN = BIN / "loranull-worker"

KEY_A = "sk-ln-" + "A" * 24
KEY_B = "sk-ln-" + "B" * 24
TOKEN = "wt-ln-" + "t0k3n" * 5


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, token=None, body=None, timeout=5):
    """(status, body text) of one request; never raises on an HTTP error status."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def sh(script, args=(), env=None, timeout=30):
    """Runs an entrypoint to completion with `sh` (dash on Debian, as in the images)."""
    return subprocess.run(["sh", str(script), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def secrets(tmp_path):
    d = tmp_path / "secrets"
    d.mkdir()
    (d / "api-keys").write_text(f"# project key\nteam-a {KEY_A}\n\nteam-b {KEY_B}\n")
    (d / "worker-token").write_text(TOKEN + "\n")
    return d


def server_env(tmp_path, secrets, port):
    env = dict(os.environ)
    env.update({
        "LORANULL_SERVER_BIN": str(SERVER_BIN),
        "LORANULL_LISTEN": f"127.0.0.1:{port}",
        "LORANULL_DATA_DIR": str(tmp_path / "data"),
        "LORANULL_API_KEYS_FILE": str(secrets / "api-keys"),
        "LORANULL_WORKER_TOKEN_FILE": str(secrets / "worker-token"),
        "LORANULL_MIGRATIONS_DIR": str(ROOT / "migrations"),
        "LORANULL_STATIC_DIR": str(ROOT / "server" / "static"),
    })
    return env


class EntrypointServer:
    """server-entrypoint.sh running in the background, as the image's ENTRYPOINT."""

    def __init__(self, env, log):
        self.env = env
        self.port = int(env["LORANULL_LISTEN"].rsplit(":", 1)[1])
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen(["sh", str(SERVER_SH)], env=env, stdout=open(log, "ab"),
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + 15
        while time.time() < deadline:
            assert self.proc.poll() is None, f"entrypoint exited {self.proc.returncode}:\n{log.read_text()}"
            try:
                if http("GET", self.base + "/healthz", timeout=1)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        pytest.fail(f"server did not answer /healthz within 15 s:\n{log.read_text()}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def server(tmp_path, secrets):
    assert SERVER_BIN.exists(), f"{SERVER_BIN} is not built: run `make`"
    s = EntrypointServer(server_env(tmp_path, secrets, free_port()), tmp_path / "server.log")
    yield s
    s.stop()


# ---- server ----

def test_server_entrypoint_serves_with_secrets_from_files(server, tmp_path):
    assert http("GET", server.base + "/healthz")[0] == 200
    assert http("GET", server.base + "/readyz")[0] == 200
    status, metrics = http("GET", server.base + "/metrics")
    assert status == 200 and "# TYPE" in metrics
    # the keys of the Secret file work, each for its own project; a made-up one does not
    status, body = http("GET", server.base + "/v1/files", KEY_A)
    assert status == 200 and json.loads(body)["object"] == "list"
    assert http("GET", server.base + "/v1/files", KEY_B)[0] == 200
    assert http("GET", server.base + "/v1/files", "sk-ln-" + "C" * 24)[0] == 401
    # the worker token of the Secret file reaches /internal, and only /internal
    status, body = http("POST", server.base + "/internal/v1/workers/register", TOKEN,
                        {"name": "deploy-test", "device_kind": "cpu", "devices": 1,
                         "memory_bytes": 1 << 30, "models": []})
    assert status == 201, body
    assert http("GET", server.base + "/v1/files", TOKEN)[0] == 401
    assert http("POST", server.base + "/internal/v1/workers/register", KEY_A, {"name": "x"})[0] == 401
    # secrets never travel on a command line
    cmdlines = ""
    for f in pathlib.Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmdlines += f.read_bytes().replace(b"\0", b" ").decode(errors="replace") + "\n"
        except OSError:
            pass  # the process ended meanwhile
    assert str(SERVER_BIN) in cmdlines, "could not read the server's command line"
    assert KEY_A not in cmdlines and TOKEN not in cmdlines
    # the image's HEALTHCHECK command
    r = sh(SERVER_SH, ["healthcheck"], env=server.env)
    assert r.returncode == 0, r.stderr
    # SIGTERM to the entrypoint reaches the server itself (exec): a graceful stop, status 0
    assert server.stop() == 0
    assert "stopped" in (tmp_path / "server.log").read_text()
    r = sh(SERVER_SH, ["healthcheck"], env=server.env)
    assert r.returncode != 0, "healthcheck passed with the server stopped"


def test_server_restart_reimports_idempotently_and_keeps_revocations(tmp_path, secrets):
    env = server_env(tmp_path, secrets, free_port())
    s = EntrypointServer(env, tmp_path / "server.log")
    s.stop()
    # revoke team-b's key with the admin subcommand through the entrypoint (as `docker exec` would)
    r = sh(SERVER_SH, ["keys", "revoke", KEY_B], env=env)
    assert r.returncode == 0, r.stderr
    s = EntrypointServer(env, tmp_path / "server.log")
    try:
        assert http("GET", s.base + "/v1/files", KEY_A)[0] == 200
        assert http("GET", s.base + "/v1/files", KEY_B)[0] == 401, "a revoked key came back from the Secret"
    finally:
        s.stop()
    r = sh(SERVER_SH, ["keys", "list"], env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("team-a") == 1 and r.stdout.count("team-b") == 1, r.stdout
    r = sh(SERVER_SH, ["tokens", "list"], env=env)
    assert r.returncode == 0 and len([ln for ln in r.stdout.splitlines() if "k8s-secret" in ln]) == 1, r.stdout


def test_server_admin_subcommand_creates_a_working_key(tmp_path, secrets):
    env = server_env(tmp_path, secrets, free_port())
    r = sh(SERVER_SH, ["keys", "create", "--project", "ops"], env=env)
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    s = EntrypointServer(env, tmp_path / "server.log")
    try:
        assert http("GET", s.base + "/v1/files", key)[0] == 200
    finally:
        s.stop()


@pytest.mark.parametrize("content,expect", [
    ("team-a\n", "stdin line 1: expected 'PROJECT KEY'"),
    ("# c\nteam-a sk-ln-short\n", "stdin line 2: project team-a: the key is not 20..128"),
    ("team/a " + KEY_A + "\n", "stdin line 1: project 'team/a': a project name is 1..64"),
    ("team-a " + KEY_A + "'; DROP TABLE api_keys; --\n", "stdin line 1: project team-a: the key is not"),
])
def test_server_entrypoint_names_the_bad_secret_line(tmp_path, secrets, content, expect):
    (secrets / "api-keys").write_text(content)
    r = sh(SERVER_SH, env=server_env(tmp_path, secrets, free_port()))
    assert r.returncode == 1
    assert f"{secrets / 'api-keys'}: not imported" in r.stderr and expect in r.stderr, r.stderr


def test_server_entrypoint_refuses_a_bad_token_file(tmp_path, secrets):
    (secrets / "worker-token").write_text("short\n")
    r = sh(SERVER_SH, env=server_env(tmp_path, secrets, free_port()))
    assert r.returncode == 1 and "the token is not 20..128" in r.stderr, r.stderr
    assert f"{secrets / 'worker-token'}: not imported" in r.stderr, r.stderr


def test_server_entrypoint_names_a_data_dir_it_cannot_use(tmp_path, secrets):
    env = server_env(tmp_path, secrets, free_port())
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env["LORANULL_DATA_DIR"] = str(blocker / "data")
    r = sh(SERVER_SH, env=env)
    assert r.returncode == 1 and f"data dir {blocker / 'data'} does not exist" in r.stderr, r.stderr


def test_server_entrypoint_refuses_a_bad_listen_for_healthcheck(tmp_path, secrets):
    env = server_env(tmp_path, secrets, free_port())
    env["LORANULL_LISTEN"] = "0.0.0.0"
    r = sh(SERVER_SH, ["healthcheck"], env=env)
    assert r.returncode == 1 and "LORANULL_LISTEN='0.0.0.0' is not HOST:PORT" in r.stderr, r.stderr


def test_server_entrypoint_passes_the_config_file(tmp_path, secrets):
    env = server_env(tmp_path, secrets, free_port())
    cfg = tmp_path / "server.json"
    cfg.write_text(json.dumps({"threads": 2, "max_body_bytes": 4096}))
    env["LORANULL_CONFIG"] = str(cfg)
    s = EntrypointServer(env, tmp_path / "server.log")
    try:
        # the config's body limit is in force: a 5 KiB JSON body is refused, a small one is not
        big = {"model": "m", "training_file": "file-x", "metadata": {"pad": "x" * 5000}}
        assert http("POST", s.base + "/v1/fine_tuning/jobs", KEY_A, big)[0] == 413
        assert http("POST", s.base + "/v1/fine_tuning/jobs", KEY_A, {"model": "m"})[0] == 400
    finally:
        s.stop()
    cfg.write_text(json.dumps({"threads": 2, "no_such_setting": 1}))
    r = sh(SERVER_SH, env=env)
    assert r.returncode == 1, r.stderr
    assert "no_such_setting" in r.stderr and "refused its settings" in r.stderr, r.stderr


# ---- worker: flags and refusals (a recording stand-in for the binary) ----

@pytest.fixture
def recorder(tmp_path):
    """An executable that writes its argv, one per line, and exits: checks env → flags exactly."""
    out = tmp_path / "argv"
    exe = tmp_path / "record-argv"
    exe.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {out}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe, out


def worker_env(tmp_path, worker_bin, server_url="http://127.0.0.1:9"):
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    token = tmp_path / "worker-token"
    token.write_text(TOKEN + "\n")
    env = dict(os.environ)
    env.update({
        "LORANULL_WORKER_BIN": str(worker_bin),
        "LORANULL_SERVER_URL": server_url,
        "LORANULL_TOKEN_FILE": str(token),
        "LORANULL_MODELS_DIR": str(models),
        "LORANULL_TOKEN_WAIT": "1",
    })
    return env


def test_worker_entrypoint_maps_env_to_flags(tmp_path, recorder):
    exe, out = recorder
    env = worker_env(tmp_path, exe)
    env.update({"LORANULL_DEVICE": "cuda:0", "LORANULL_RANKS": "8", "LORANULL_WORK_DIR": "/scratch",
                "LORANULL_WORKER_NAME": "loranull-worker-3", "LORANULL_GRACE_S": "570"})
    r = sh(WORKER_SH, env=env)
    assert r.returncode == 0, r.stderr
    assert out.read_text().splitlines() == [
        "--server", "http://127.0.0.1:9", "--token-file", env["LORANULL_TOKEN_FILE"],
        "--models", env["LORANULL_MODELS_DIR"], "--device", "cuda:0", "--ranks", "8",
        "--work-dir", "/scratch", "--name", "loranull-worker-3", "--grace-s", "570"]
    # defaults: cpu, no --ranks/--work-dir/--name/--grace-s; extra flags are passed on
    for k in ("LORANULL_DEVICE", "LORANULL_RANKS", "LORANULL_WORK_DIR", "LORANULL_WORKER_NAME", "LORANULL_GRACE_S"):
        del env[k]
    r = sh(WORKER_SH, ["--verbose"], env=env)
    assert r.returncode == 0, r.stderr
    assert out.read_text().splitlines()[-3:] == ["--device", "cpu", "--verbose"]


@pytest.mark.parametrize("change,expect", [
    ({"LORANULL_SERVER_URL": ""}, "LORANULL_SERVER_URL is not set"),
    ({"LORANULL_SERVER_URL": "loranull-server:8080"}, "is not an http:// or https:// URL"),
    ({"LORANULL_DEVICE": "gpu0"}, "LORANULL_DEVICE='gpu0' is not cpu or cuda:N"),
    ({"LORANULL_RANKS": "0"}, "LORANULL_RANKS='0' is not a positive integer"),
    ({"LORANULL_RANKS": "two"}, "LORANULL_RANKS='two' is not a positive integer"),
    ({"LORANULL_GRACE_S": "5m"}, "LORANULL_GRACE_S='5m' is not a whole number of seconds"),
    ({"LORANULL_MODELS_DIR": "/nonexistent/models"}, "models dir /nonexistent/models does not exist"),
    ({"LORANULL_TOKEN_FILE": "/nonexistent/token"}, "worker token file /nonexistent/token is missing"),
    ({"LORANULL_WORKER_BIN": "/nonexistent/loranull-worker"}, "/nonexistent/loranull-worker is not an executable"),
])
def test_worker_entrypoint_refuses_bad_settings(tmp_path, recorder, change, expect):
    exe, out = recorder
    env = worker_env(tmp_path, exe)
    env.update(change)
    r = sh(WORKER_SH, env=env)
    assert r.returncode == 1 and expect in r.stderr, r.stderr
    assert not out.exists(), "the worker was started despite a bad setting"


def test_worker_entrypoint_waits_for_a_late_token(tmp_path, recorder):
    # A Secret volume may be populated a moment after start: the entrypoint waits for it.
    exe, out = recorder
    env = worker_env(tmp_path, exe)
    token = pathlib.Path(env["LORANULL_TOKEN_FILE"])
    token.unlink()
    env["LORANULL_TOKEN_WAIT"] = "10"
    p = subprocess.Popen(["sh", str(WORKER_SH)], env=env, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    assert p.poll() is None and not out.exists()
    token.write_text(TOKEN)
    assert p.wait(timeout=10) == 0, p.stderr.read()
    assert "--token-file" in out.read_text()


def test_worker_healthcheck_follows_the_worker_process(tmp_path):
    env = worker_env(tmp_path, "/bin/true")
    p = subprocess.Popen(["sleep", "30"])
    try:
        env["LORANULL_HEALTH_PID"] = str(p.pid)
        assert sh(WORKER_SH, ["healthcheck"], env=env).returncode == 0
        p.send_signal(signal.SIGSTOP)  # a stopped worker is not healthy
        time.sleep(0.2)
        r = sh(WORKER_SH, ["healthcheck"], env=env)
        assert r.returncode == 1 and "state 'T'" in r.stderr, r.stderr
        p.send_signal(signal.SIGCONT)
    finally:
        p.kill()
        p.wait()
    r = sh(WORKER_SH, ["healthcheck"], env=env)
    assert r.returncode == 1 and "state 'gone'" in r.stderr, r.stderr


# ---- server + worker through both entrypoints: a job end to end ----

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2,
}


def make_models_dir(tmp_path):
    """A models volume with one tiny random LLaMA in HF layout, made by the project's CLI."""
    cli = BIN / "loranull"
    assert cli.exists(), f"{cli} is not built: run `make`"
    cfg = tmp_path / "tiny-config.json"
    cfg.write_text(json.dumps(TINY_CONFIG))
    models = tmp_path / "models"
    r = subprocess.run([str(cli), "model", "new", "--config", str(cfg), "--out",
                        str(models / "tiny-llama"), "--seed", "3"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return models


def start_worker(tmp_path, server, secrets, models, name, ranks=1):
    """loranull-worker through worker-entrypoint.sh, env as the StatefulSet sets it."""
    env = dict(os.environ)
    env.update({
        "LORANULL_WORKER_BIN": str(WORKER_BIN),
        "LORANULL_SERVER_URL": server.base,
        "LORANULL_TOKEN_FILE": str(secrets / "worker-token"),
        "LORANULL_MODELS_DIR": str(models),
        "LORANULL_DEVICE": "cpu",
        "LORANULL_RANKS": str(ranks),
        "LORANULL_WORK_DIR": str(tmp_path / name / "work"),
        "LORANULL_WORKER_NAME": name,
        "LORANULL_GRACE_S": "20",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
    })
    (tmp_path / name).mkdir()
    log = tmp_path / name / "worker.log"
    proc = subprocess.Popen(["sh", str(WORKER_SH)], env=env, stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT, cwd=tmp_path / name)
    proc.log = log
    return proc


def sigterm(proc, timeout=30):
    """SIGTERM as the kubelet sends it; (exit status, seconds until exit)."""
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    return rc, time.time() - t0


def tail(path, n=3000):
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def submit(api, base, file_id, n_epochs, save_interval=0, ranks=1):
    r = api.post(base + "/v1/fine_tuning/jobs", json={
        "model": "tiny-llama", "training_file": file_id, "seed": 7,
        "hyperparameters": {"n_epochs": n_epochs, "batch_size": 4, "max_seq_len": 32,
                            "save_interval": save_interval},
        "adapter": {"type": "lora_null_v2", "rank": 2,
                    "calibration": {"samples": 8, "max_length": 32}},
        "resources": {"ranks": ranks, "device": "cpu"}})
    assert r.status_code in (200, 201), r.text
    return r.json()["id"]


def wait_job(api, base, job_id, workers, until, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = api.get(f"{base}/v1/fine_tuning/jobs/{job_id}").json()
        if until(job):
            return job
        for w in workers:
            assert w.poll() is None, f"worker exited {w.returncode}:\n{tail(w.log)}"
        time.sleep(0.1)
    events = api.get(f"{base}/v1/fine_tuning/jobs/{job_id}/events?limit=100").json()
    pytest.fail(f"job {job_id} is {job['status']} after {timeout} s: {job.get('error')}\n"
                f"events: {[e['message'] for e in events['data']][:20]}\n"
                + "\n".join(tail(w.log) for w in workers))


def upload_training_file(api, base):
    lines = [json.dumps({"text": f"fact {i}: the value of item {i} is {i * 7 % 13}."}) for i in range(32)]
    r = api.post(base + "/v1/files", data={"purpose": "fine-tune"},
                 files={"file": ("train.jsonl", ("\n".join(lines) + "\n").encode())})
    assert r.status_code in (200, 201), r.text
    return r.json()["id"]


def test_job_runs_through_server_and_worker_entrypoints(tmp_path, secrets):
    assert SERVER_BIN.exists(), f"{SERVER_BIN} is not built: run `make`"
    assert WORKER_BIN.exists(), (f"{WORKER_BIN} is not built: the worker daemon (issue 6) has "
                                 "not landed, so no job can run through the worker entrypoint")
    models = make_models_dir(tmp_path)
    server = EntrypointServer(server_env(tmp_path, secrets, free_port()), tmp_path / "server.log")
    worker = start_worker(tmp_path, server, secrets, models, "loranull-worker-0")
    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {KEY_A}"
    try:
        job_id = submit(api, server.base, upload_training_file(api, server.base), n_epochs=1)
        job = wait_job(api, server.base, job_id, [worker],
                       lambda j: j["status"] in ("succeeded", "failed", "cancelled"))
        assert job["status"] == "succeeded", f"{job.get('error')}\n{tail(worker.log)}"
        assert job["result_files"], "a succeeded job lists its artifacts"
        for fid in job["result_files"]:
            r = api.get(f"{server.base}/v1/files/{fid}/content")
            assert r.status_code == 200 and len(r.content) > 0
        # the worker registered the model folder of the models volume, under the pod's name
        models_list = api.get(server.base + "/v1/models").json()
        assert "tiny-llama" in [m["id"] for m in models_list["data"]]
    finally:
        # SIGTERM to the entrypoint's process is SIGTERM to the worker (exec): a clean exit
        rc, _ = sigterm(worker)
        server.stop()
    assert rc == 0, f"worker exited {rc} on SIGTERM:\n{tail(worker.log)}"


def test_two_rank_job_on_one_cpu_worker_as_cpu_dev_runs_it(tmp_path, secrets):
    # The cpu-dev overlay's worker offers two ranks (LORANULL_RANKS=2): a job asking for two
    # runs tensor-parallel on it (deploy/README.md "Multi-rank and multi-node jobs").
    assert WORKER_BIN.exists(), f"{WORKER_BIN} is not built: run `make`"
    models = make_models_dir(tmp_path)
    server = EntrypointServer(server_env(tmp_path, secrets, free_port()), tmp_path / "server.log")
    worker = start_worker(tmp_path, server, secrets, models, "loranull-worker-0", ranks=2)
    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {KEY_A}"
    try:
        job_id = submit(api, server.base, upload_training_file(api, server.base), n_epochs=1, ranks=2)
        job = wait_job(api, server.base, job_id, [worker],
                       lambda j: j["status"] in ("succeeded", "failed", "cancelled"))
        assert job["status"] == "succeeded", f"{job.get('error')}\n{tail(worker.log)}"
    finally:
        sigterm(worker)
        server.stop()


def test_eviction_mid_job_checkpoints_and_another_pod_finishes(tmp_path, secrets):
    # What a rolling update or a node drain does to a StatefulSet pod: SIGTERM while training.
    # The worker must checkpoint, release the job and exit 0 within LORANULL_GRACE_S; the
    # next pod resumes the job from that checkpoint and finishes it.
    assert WORKER_BIN.exists(), f"{WORKER_BIN} is not built: run `make`"
    models = make_models_dir(tmp_path)
    server = EntrypointServer(server_env(tmp_path, secrets, free_port()), tmp_path / "server.log")
    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {KEY_A}"
    first = start_worker(tmp_path, server, secrets, models, "loranull-worker-0")
    second = None
    try:
        job_id = submit(api, server.base, upload_training_file(api, server.base), n_epochs=100, save_interval=50)

        def training(j):
            m = api.get(f"{server.base}/v1/fine_tuning/jobs/{job_id}/checkpoints").json()
            return j["status"] == "running" and len(m["data"]) >= 1
        wait_job(api, server.base, job_id, [first], training)
        n_before = len(api.get(f"{server.base}/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"])
        rc, took = sigterm(first)
        assert rc == 0, f"evicted worker exited {rc}:\n{tail(first.log)}"
        assert took < 20, f"the worker took {took:.1f} s, past its LORANULL_GRACE_S of 20"
        job = api.get(f"{server.base}/v1/fine_tuning/jobs/{job_id}").json()
        assert job["status"] in ("queued", "running"), f"evicted job is {job['status']}: {job.get('error')}"
        ckpts = api.get(f"{server.base}/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
        assert len(ckpts) > n_before, "the eviction wrote no checkpoint"
        evicted_at = max(c["step_number"] for c in ckpts)
        second = start_worker(tmp_path, server, secrets, models, "loranull-worker-1")
        job = wait_job(api, server.base, job_id, [second],
                       lambda j: j["status"] in ("succeeded", "failed", "cancelled"), timeout=90)
        assert job["status"] == "succeeded", f"{job.get('error')}\n{tail(second.log)}"
        events = api.get(f"{server.base}/v1/fine_tuning/jobs/{job_id}/events?limit=100").json()["data"]
        text = " ".join(e["message"] for e in events)
        assert "loranull-worker-1" in text, "the second pod did not report on the job"
        assert f"Resuming from the checkpoint at step {evicted_at}" in text, (
            f"the second pod did not resume from the eviction checkpoint (step {evicted_at}): {text[:2000]}")
    finally:
        for w in (first, second):
            if w is not None and w.poll() is None:
                sigterm(w)
        server.stop()


def test_online_backup_and_restore_as_the_readme_says(tmp_path, secrets):
    # deploy/README.md "Back up the database": sqlite3 .backup while the server runs, blobs
    # copied after; restore = the backup as loranull.db (no -wal/-shm) plus the blobs.
    env = server_env(tmp_path, secrets, free_port())
    s = EntrypointServer(env, tmp_path / "server.log")
    data = pathlib.Path(env["LORANULL_DATA_DIR"])
    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {KEY_A}"
    try:
        r = api.post(s.base + "/v1/files", data={"purpose": "fine-tune"},
                     files={"file": ("kept.jsonl", b'{"text": "kept"}\n')})
        assert r.status_code in (200, 201), r.text
        kept = r.json()["id"]
        backup = data / "backup.db"
        r = subprocess.run(["sqlite3", str(data / "loranull.db"), f".backup {backup}"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        # written after the backup: must not be in the restored server
        r = api.post(s.base + "/v1/files", data={"purpose": "fine-tune"},
                     files={"file": ("later.jsonl", b'{"text": "later"}\n')})
        later = r.json()["id"]
        restored = tmp_path / "restored"
        restored.mkdir()
        shutil.copy(backup, restored / "loranull.db")
        shutil.copytree(data / "blobs", restored / "blobs")
    finally:
        s.stop()
    env2 = server_env(tmp_path, secrets, free_port())
    env2["LORANULL_DATA_DIR"] = str(restored)
    s2 = EntrypointServer(env2, tmp_path / "restored.log")
    try:
        assert api.get(f"{s2.base}/v1/files/{kept}/content").content == b'{"text": "kept"}\n'
        assert api.get(f"{s2.base}/v1/files/{later}").status_code == 404
        r = subprocess.run(["sqlite3", str(restored / "loranull.db"), "PRAGMA integrity_check"],
                           capture_output=True, text=True, timeout=30)
        assert r.stdout.strip() == "ok", r.stdout + r.stderr
    finally:
        s2.stop()


def test_upgrade_applies_new_migrations_at_start(tmp_path, secrets):
    # deploy/README.md "Upgrade": a new image brings new migrations; the server applies them at
    # start, through the same entrypoint, and the data (keys, files) is still there.
    migrations = tmp_path / "migrations"
    shutil.copytree(ROOT / "migrations", migrations)
    env = server_env(tmp_path, secrets, free_port())
    env["LORANULL_MIGRATIONS_DIR"] = str(migrations)
    s = EntrypointServer(env, tmp_path / "server.log")
    try:
        r = requests.post(s.base + "/v1/files", headers={"Authorization": f"Bearer {KEY_A}"},
                          data={"purpose": "fine-tune"}, files={"file": ("a.jsonl", b'{"text": "a"}\n')})
        assert r.status_code in (200, 201), r.text
        file_id = r.json()["id"]
    finally:
        s.stop()
    (migrations / "999_deploy_upgrade_probe.sql").write_text(
        "CREATE TABLE deploy_upgrade_probe (x INTEGER);\n")
    s = EntrypointServer(env, tmp_path / "server.log")
    try:
        status, body = http("GET", f"{s.base}/v1/files/{file_id}", KEY_A)
        assert status == 200, body
    finally:
        s.stop()
    db = pathlib.Path(env["LORANULL_DATA_DIR"]) / "loranull.db"
    r = subprocess.run(["sqlite3", str(db), "SELECT name FROM schema_migrations ORDER BY version"],
                       capture_output=True, text=True, timeout=30)
    names = r.stdout.split()
    assert names[-1] == "999_deploy_upgrade_probe.sql", names
    assert len(names) == len(list(migrations.glob("[0-9][0-9][0-9]_*.sql")))
    r = subprocess.run(["sqlite3", str(db), "SELECT count(*) FROM deploy_upgrade_probe"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == "0", r.stderr


# ---- the same, under the pods' securityContext (emulated with tests/deploy/podlike.sh) ----

PODLIKE = pathlib.Path(__file__).resolve().parent / "podlike.sh"
POD_UID = 10001  # the images' user, and the manifests' runAsUser/runAsGroup/fsGroup


@pytest.fixture
def pod_volumes():
    """Volumes as the kubelet would present them to uid 10001: owned (fsGroup) or group-readable
    (defaultMode 0440), under a world-traversable root outside /tmp (the pods' /tmp is a tmpfs)."""
    if os.geteuid() != 0:
        pytest.skip("emulating the pod securityContext needs root (mount namespace, setpriv)")
    root = pathlib.Path(tempfile.mkdtemp(prefix="loranull-podlike-", dir="/var/tmp"))
    root.chmod(0o755)
    vols = {n: root / n for n in ("data", "work", "secrets", "models")}
    for n, d in vols.items():
        d.mkdir()
        os.chown(d, POD_UID if n in ("data", "work") else 0, POD_UID)
        d.chmod(0o750)
    (vols["secrets"] / "api-keys").write_text(f"team-a {KEY_A}\n")
    (vols["secrets"] / "worker-token").write_text(TOKEN + "\n")
    for f in vols["secrets"].iterdir():
        os.chown(f, 0, POD_UID)
        f.chmod(0o440)
    yield vols
    shutil.rmtree(root, ignore_errors=True)


def test_job_runs_under_the_pod_security_context(tmp_path, pod_volumes):
    # uid 10001, read-only root, /tmp a tmpfs, no capabilities, no_new_privs: the server and the
    # worker write only where the manifests mount volumes, and a job still runs end to end.
    assert WORKER_BIN.exists(), f"{WORKER_BIN} is not built: run `make`"
    v = pod_volumes
    made = make_models_dir(tmp_path)
    shutil.copytree(made / "tiny-llama", v["models"] / "tiny-llama")
    subprocess.run(["chmod", "-R", "g+rX", str(v["models"])], check=True)
    subprocess.run(["chgrp", "-R", str(POD_UID), str(v["models"])], check=True)
    port = free_port()
    env = dict(os.environ, HOME="/nonexistent")
    env.update({
        "LORANULL_SERVER_BIN": str(SERVER_BIN), "LORANULL_LISTEN": f"127.0.0.1:{port}",
        "LORANULL_DATA_DIR": str(v["data"]), "LORANULL_API_KEYS_FILE": str(v["secrets"] / "api-keys"),
        "LORANULL_WORKER_TOKEN_FILE": str(v["secrets"] / "worker-token"),
        "LORANULL_MIGRATIONS_DIR": str(ROOT / "migrations"), "LORANULL_STATIC_DIR": str(ROOT / "server" / "static"),
    })
    base = f"http://127.0.0.1:{port}"
    slog = tmp_path / "server.log"
    server = subprocess.Popen([str(PODLIKE), str(v["data"]), "--", "sh", str(SERVER_SH)], env=env,
                              stdout=open(slog, "ab"), stderr=subprocess.STDOUT)
    worker = None
    try:
        deadline = time.time() + 15
        while True:
            assert server.poll() is None, f"server exited {server.returncode}:\n{tail(slog)}"
            try:
                if http("GET", base + "/readyz", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, f"server not ready:\n{tail(slog)}"
            time.sleep(0.05)
        wenv = dict(os.environ, HOME="/nonexistent", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        wenv.update({
            "LORANULL_WORKER_BIN": str(WORKER_BIN), "LORANULL_SERVER_URL": base,
            "LORANULL_TOKEN_FILE": str(v["secrets"] / "worker-token"), "LORANULL_MODELS_DIR": str(v["models"]),
            "LORANULL_DEVICE": "cpu", "LORANULL_RANKS": "1", "LORANULL_WORK_DIR": str(v["work"]),
            "LORANULL_GRACE_S": "20",
        })
        wlog = tmp_path / "worker.log"
        worker = subprocess.Popen([str(PODLIKE), str(v["work"]), "--", "sh", str(WORKER_SH)], env=wenv,
                                  stdout=open(wlog, "ab"), stderr=subprocess.STDOUT, cwd=v["work"])
        worker.log = wlog
        api = requests.Session()
        api.headers["Authorization"] = f"Bearer {KEY_A}"
        job_id = submit(api, base, upload_training_file(api, base), n_epochs=1)
        job = wait_job(api, base, job_id, [worker], lambda j: j["status"] in ("succeeded", "failed", "cancelled"))
        assert job["status"] == "succeeded", f"{job.get('error')}\n{tail(wlog)}\n{tail(slog)}"
        # what the two wrote is theirs (uid 10001), and only inside their volumes
        owners = {p.stat().st_uid for d in (v["data"], v["work"]) for p in d.rglob("*")}
        assert owners == {POD_UID}, owners
        assert any(v["work"].rglob("*.safetensors")), "the worker wrote nothing in its work dir"
    finally:
        if worker is not None:
            rc, _ = sigterm(worker)
            assert rc == 0, f"worker exited {rc} on SIGTERM:\n{tail(worker.log)}"
        rc, _ = sigterm(server)
        assert rc == 0, f"server exited {rc} on SIGTERM:\n{tail(slog)}"


def test_podlike_sandbox_is_what_it_claims(pod_volumes):
    # The emulation must bite: uid 10001, no capabilities, root read-only, /tmp and the
    # volume writable — otherwise the test above proves nothing.
    data = pod_volumes["data"]
    script = ("id -u; grep -E '^(CapEff|NoNewPrivs)' /proc/self/status; "
              f"touch {ROOT}/podlike-probe 2>&1 || true; touch /tmp/ok && echo tmp-writable; "
              f"touch {data}/ok && echo volume-writable; touch {pod_volumes['secrets']}/x 2>&1 || true")
    r = subprocess.run([str(PODLIKE), str(data), "--", "sh", "-c", script],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.splitlines()[0] == str(POD_UID)
    assert "CapEff:\t0000000000000000" in out and "NoNewPrivs:\t1" in out
    assert f"touch: cannot touch '{ROOT}/podlike-probe': Read-only file system" in out
    assert "tmp-writable" in out and "volume-writable" in out
    assert "Read-only file system" in out.split("volume-writable")[1], "the secrets volume is writable"
    assert not (ROOT / "podlike-probe").exists()


def test_cpu_dev_secrets_work_with_the_server_entrypoint(tmp_path):
    # The Secrets the cpu-dev overlay generates, mounted as the Deployment mounts them (each
    # key's bytes in a file), pass the entrypoint's checks and authenticate.
    docs = render(KUSTOMIZATIONS["cpu-dev"])
    secret_dir = tmp_path / "secrets"
    secret_dir.mkdir()
    values = {}
    for d in docs:
        if d["kind"] == "Secret":
            for key, b64 in d["data"].items():
                values[key] = base64.b64decode(b64).decode()
    (secret_dir / "api-keys").write_text(values["api-keys"])
    (secret_dir / "worker-token").write_text(values["token"])
    s = EntrypointServer(server_env(tmp_path, secret_dir, free_port()), tmp_path / "server.log")
    try:
        _project, key = values["api-keys"].split()
        assert http("GET", s.base + "/v1/files", key)[0] == 200
        status, body = http("POST", s.base + "/internal/v1/workers/register", values["token"],
                            {"name": "dev", "device_kind": "cpu", "devices": 1, "memory_bytes": 1, "models": []})
        assert status == 201, body
    finally:
        s.stop()


# ---- the internal listener (LORANULL_INTERNAL_LISTEN, set by the k8s base) ----

def test_server_entrypoint_internal_listen_splits_the_ports(tmp_path, secrets):
    assert SERVER_BIN.exists(), f"{SERVER_BIN} is not built: run `make`"
    env = server_env(tmp_path, secrets, free_port())
    iport = free_port()
    env["LORANULL_INTERNAL_LISTEN"] = f"127.0.0.1:{iport}"
    s = EntrypointServer(env, tmp_path / "server.log")
    try:
        internal = f"http://127.0.0.1:{iport}"
        reg = {"name": "deploy-test", "device_kind": "cpu", "devices": 1, "memory_bytes": 1 << 30, "models": []}
        assert http("POST", internal + "/internal/v1/workers/register", TOKEN, reg)[0] == 201
        assert http("POST", s.base + "/internal/v1/workers/register", TOKEN, reg)[0] == 404
        assert http("GET", s.base + "/v1/files", KEY_A)[0] == 200
        assert http("GET", internal + "/v1/files", KEY_A)[0] == 404
        assert http("GET", internal + "/readyz")[0] == 200
    finally:
        s.stop()
    bad = dict(env, LORANULL_INTERNAL_LISTEN="8081")
    r = subprocess.run(["sh", str(SERVER_SH)], env=bad, capture_output=True, text=True, timeout=20)
    assert r.returncode == 1 and "LORANULL_INTERNAL_LISTEN='8081' is not HOST:PORT" in r.stderr, r.stderr
