"""Helpers to run the real loranull-server in tests, and a test worker speaking /internal/v1.

Reusable from any test folder:

    import sys, pathlib
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "server"))
    from lnserver import Server, TestWorker

    with Server.start(tmp_path) as srv:          # free loopback port, temp data dir
        key = srv.create_key("proj-a")            # `loranull-server keys create --project`
        tok = srv.create_token("w1")              # `loranull-server tokens create --name`
        api = srv.client(key)                     # requests.Session with the bearer key
        api.get(srv.url("/v1/fine_tuning/jobs"))

The pytest fixtures `server` (function scope) and `server_factory` are in tests/server/conftest.py;
other folders import them into their conftest.py: `from lnserver_fixtures import server, server_factory`.
"""
import json
import os
import pathlib
import signal
import socket
import subprocess
import time

import requests

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(os.environ.get("LORANULL_BIN", ROOT / "bin"))
SERVER_BIN = BIN / "loranull-server"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One loranull-server process on 127.0.0.1:<free port> with its own data dir."""

    def __init__(self, data_dir, args=(), port=None, log_path=None):
        self.data_dir = pathlib.Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.args = list(args)
        self.port = port or free_port()
        self.log_path = pathlib.Path(log_path or self.data_dir / "server.log")
        self.proc = None
        self._log = None

    # ---- lifecycle
    @classmethod
    def start(cls, data_dir, args=(), **kw):
        s = cls(data_dir, args, **kw)
        s.launch()
        return s

    def launch(self, timeout=10.0):
        self._log = open(self.log_path, "ab")
        cmd = [str(SERVER_BIN), "--listen", f"127.0.0.1:{self.port}", "--data-dir", str(self.data_dir),
               "--migrations-dir", str(ROOT / "migrations"), *self.args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=self._log)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"loranull-server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url("/healthz"), timeout=0.5).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"loranull-server did not come up on port {self.port}:\n{self.log()}")

    def stop(self, timeout=10.0):
        """Graceful stop (SIGTERM); returns the exit code."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log:
            self._log.close()
            self._log = None
        return self.proc.returncode if self.proc else None

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        if self._log:
            self._log.close()
            self._log = None

    def restart(self):
        self.stop()
        return self.launch()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except OSError:
            return ""

    # ---- admin subcommands (run against the same data dir)
    def _admin(self, *argv):
        r = subprocess.run([str(SERVER_BIN), *argv, "--data-dir", str(self.data_dir),
                            "--migrations-dir", str(ROOT / "migrations")],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"loranull-server {' '.join(argv)} failed: {r.stderr}")
        return r.stdout.strip()

    def create_key(self, project):
        return self._admin("keys", "create", "--project", project)

    def revoke_key(self, key_or_id):
        return self._admin("keys", "revoke", key_or_id)

    def create_token(self, name):
        return self._admin("tokens", "create", "--name", name)

    # ---- HTTP
    @property
    def base(self):
        return f"http://127.0.0.1:{self.port}"

    def url(self, path):
        return self.base + path

    def client(self, key):
        s = requests.Session()
        s.headers["Authorization"] = f"Bearer {key}"
        return s

    # ---- conveniences for tests
    def upload(self, key, content, filename="train.jsonl"):
        r = self.client(key).post(self.url("/v1/files"), data={"purpose": "fine-tune"},
                                  files={"file": (filename, content)})
        assert r.status_code == 200, r.text
        return r.json()

    def create_job(self, key, **spec):
        r = self.client(key).post(self.url("/v1/fine_tuning/jobs"), json=spec)
        assert r.status_code == 201, r.text
        return r.json()

    def get_job(self, key, job_id):
        r = self.client(key).get(self.url(f"/v1/fine_tuning/jobs/{job_id}"))
        assert r.status_code == 200, r.text
        return r.json()

    def wait_status(self, key, job_id, statuses, timeout=15.0):
        if isinstance(statuses, str):
            statuses = {statuses}
        deadline = time.time() + timeout
        job = None
        while time.time() < deadline:
            job = self.get_job(key, job_id)
            if job["status"] in statuses:
                return job
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} is {job and job['status']}, not {statuses} after {timeout}s")


TRAIN_JSONL = (b'{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"hello"}]}\n'
               b'{"prompt":"2+2=","completion":"4"}\n'
               b'{"text":"plain text"}\n')


class TestWorker:
    """A worker that speaks the internal protocol over HTTP, driven step by step by a test."""

    __test__ = False  # not a pytest class

    def __init__(self, server, token, name="test-worker", models=("tiny-llama",), devices=1, kind="cpu"):
        self.srv = server
        self.s = requests.Session()
        self.s.headers["Authorization"] = f"Bearer {token}"
        self.name, self.models, self.devices, self.kind = name, list(models), devices, kind
        self.worker_id = None

    def post(self, path, body=None, **kw):
        return self.s.post(self.srv.url("/internal/v1" + path), json=body, **kw)

    def register(self):
        r = self.post("/workers/register", {"name": self.name, "device_kind": self.kind, "devices": self.devices,
                                            "memory_bytes": 1 << 30, "models": self.models})
        assert r.status_code == 201, r.text
        self.worker_id = r.json()["worker_id"]
        return r.json()

    def lease(self, wait_s=5.0, free_devices=None):
        body = {"worker_id": self.worker_id, "wait_s": wait_s}
        if free_devices is not None:
            body["free_devices"] = free_devices
        r = self.post("/lease", body, timeout=wait_s + 10)
        if r.status_code == 204:
            return None
        assert r.status_code == 200, r.text
        return r.json()

    def _report(self, gen, as_me, **body):
        """A job report's body; as_me adds this worker's id (which worker of a gang speaks)."""
        if as_me:
            body["worker_id"] = self.worker_id
        return {"lease_generation": gen, **body}

    def heartbeat(self, job_id, gen, as_me=False):
        return self.post(f"/jobs/{job_id}/heartbeat", self._report(gen, as_me))

    def events(self, job_id, gen, events=(), metrics=()):
        return self.post(f"/jobs/{job_id}/events", {"lease_generation": gen, "events": list(events),
                                                    "metrics": list(metrics)})

    def upload(self, job_id, gen, filename, data, kind="result"):
        return self.s.post(self.srv.url(f"/internal/v1/jobs/{job_id}/files"),
                           params={"lease_generation": gen, "filename": filename, "kind": kind}, data=data)

    def checkpoint(self, job_id, gen, step, files, metrics=None):
        return self.post(f"/jobs/{job_id}/checkpoints", {"lease_generation": gen, "step": step, "files": files,
                                                         "metrics": metrics or {}})

    def complete(self, job_id, gen, trained_tokens=0, as_me=False):
        return self.post(f"/jobs/{job_id}/complete", self._report(gen, as_me, trained_tokens=trained_tokens))

    def fail(self, job_id, gen, code, message, retryable=False, as_me=False):
        return self.post(f"/jobs/{job_id}/fail", self._report(gen, as_me, retryable=retryable,
                                                              error={"code": code, "message": message}))

    def release(self, job_id, gen, reason="shutting down", as_me=False):
        return self.post(f"/jobs/{job_id}/release", self._report(gen, as_me, reason=reason))


def sse_events(resp, stop_after=None, timeout=10.0):
    """Parses an SSE response (requests, stream=True) into [(id, data)] until [DONE] or stop_after events."""
    out = []
    cur_id, data = None, []
    deadline = time.time() + timeout
    for raw in resp.iter_lines(decode_unicode=True):
        if time.time() > deadline:
            break
        line = raw if raw is not None else ""
        if line.startswith(":"):
            out.append(("comment", line))
            continue
        if line.startswith("id: "):
            cur_id = line[4:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif line == "":
            if data:
                payload = "\n".join(data)
                out.append((cur_id, payload if payload == "[DONE]" else json.loads(payload)))
                data = []
                if payload == "[DONE]":
                    break
                if stop_after and sum(1 for i, _ in out if i != "comment") >= stop_after:
                    break
    return out
