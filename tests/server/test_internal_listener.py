"""--internal-listen: the workers' /internal/v1 on its own listener (so a NetworkPolicy, L3/L4
only, can keep it from users), /v1 and the dashboard only on the public one, health on both."""
import json
import socket
import subprocess

import requests

from lnserver import SERVER_BIN, TRAIN_JSONL, TestWorker, free_port


class Listener:
    """What TestWorker needs of a server: url() — here the internal listener's."""

    def __init__(self, port):
        self.port = port

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"


def split_server(server_factory, use_config=False, tmp_path=None):
    iport = free_port()
    if use_config:
        cfg = tmp_path / "server.json"
        cfg.write_text(json.dumps({"internal_listen": f"127.0.0.1:{iport}"}))
        return server_factory("--config", str(cfg), "--lease-ttl-s", "60"), Listener(iport)
    return server_factory("--internal-listen", f"127.0.0.1:{iport}", "--lease-ttl-s", "60"), Listener(iport)


def test_split_listeners_serve_each_side_only(server_factory):
    server, internal = split_server(server_factory)
    key, tok = server.create_key("proj-a"), server.create_token("w1")
    user, wk = server.client(key), {"Authorization": f"Bearer {tok}"}
    # Public: /v1, dashboard, metrics and health; /internal is unknown there, even with a token.
    assert user.get(server.url("/v1/files")).status_code == 200
    assert requests.get(server.url("/metrics")).status_code == 200
    assert requests.get(server.url("/")).status_code == 200  # the dashboard
    for path in ("/healthz", "/readyz"):
        assert requests.get(server.url(path)).status_code == 200
        assert requests.get(internal.url(path)).status_code == 200
    r = requests.post(server.url("/internal/v1/workers/register"), headers=wk,
                      json={"name": "w", "device_kind": "cpu", "devices": 1, "memory_bytes": 1, "models": ["m"]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
    assert requests.post(server.url("/internal/v1/lease"), headers=wk, json={}).status_code == 404
    # Internal: nothing of the user's side, even with a valid key.
    for path in ("/v1/files", "/v1/fine_tuning/jobs", "/v1/models", "/", "/metrics"):
        r = requests.get(internal.url(path), headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 404, (path, r.status_code)
    # A whole job: created on the public side, run by a worker on the internal one.
    f = server.upload(key, TRAIN_JSONL)
    job = server.create_job(key, model="tiny-llama", training_file=f["id"])
    server.wait_status(key, job["id"], "queued")
    w = TestWorker(internal, tok)
    w.register()
    lease = w.lease(wait_s=5)
    assert lease["job_id"] == job["id"]
    got = w.s.get(internal.url(f"/internal/v1/files/{f['id']}/content"))
    assert got.status_code == 200 and got.content == TRAIN_JSONL
    gen = lease["lease_generation"]
    assert w.events(job["id"], gen, events=[{"level": "info", "message": "step 1"}]).status_code == 200
    assert w.upload(job["id"], gen, "adapter_model.safetensors", b"A", kind="result").status_code == 201
    assert w.complete(job["id"], gen, trained_tokens=5).status_code == 200
    done = server.get_job(key, job["id"])
    assert done["status"] == "succeeded" and len(done["result_files"]) == 1
    # Worker tokens are still refused on /v1 (auth unchanged), now simply not routed.
    assert requests.get(server.url("/v1/files"), headers=wk).status_code == 401


def test_internal_listen_from_config_file(server_factory, tmp_path):
    server, internal = split_server(server_factory, use_config=True, tmp_path=tmp_path)
    tok = server.create_token("w1")
    w = TestWorker(internal, tok)
    w.register()
    assert requests.post(server.url("/internal/v1/workers/register"),
                         headers={"Authorization": f"Bearer {tok}"}, json={}).status_code == 404


def test_default_single_listener_serves_everything(server_factory):
    server = server_factory("--lease-ttl-s", "60")
    key, tok = server.create_key("proj-a"), server.create_token("w1")
    assert server.client(key).get(server.url("/v1/files")).status_code == 200
    w = TestWorker(server, tok)
    assert w.register()["worker_id"]


def test_bad_internal_listen_is_a_clear_error(tmp_path):
    for value, words in (("nonsense", "expected HOST:PORT"), ("127.0.0.1:99999", "bad port")):
        p = subprocess.run([str(SERVER_BIN), "--listen", "127.0.0.1:0", "--internal-listen", value,
                            "--data-dir", str(tmp_path / "d")], capture_output=True, text=True, timeout=10)
        assert p.returncode == 2 and "--internal-listen" in p.stderr and words in p.stderr, p.stderr
    # The port is taken: the server says which listener could not start.
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen(1)
        p = subprocess.run([str(SERVER_BIN), "--listen", "127.0.0.1:0", "--internal-listen", f"127.0.0.1:{port}",
                            "--data-dir", str(tmp_path / "d")], capture_output=True, text=True, timeout=10)
    assert p.returncode != 0 and "--internal-listen" in (p.stderr + p.stdout)
