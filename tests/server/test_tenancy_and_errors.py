"""Tenancy (project isolation, worker tokens, revoked keys) and malformed requests → documented 4xx."""
import socket
import time

import pytest
import requests

from lnserver import TRAIN_JSONL, TestWorker


def assert_openai_error(r, status, code=None, param=None):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if code:
        assert err["code"] == code, err
    if param:
        assert err["param"] == param, err
    return err


def test_project_isolation(server):
    ka, kb = server.create_key("proj-a"), server.create_key("proj-b")
    f = server.upload(ka, TRAIN_JSONL)
    job = server.create_job(ka, model="m", training_file=f["id"])
    a, b = server.client(ka), server.client(kb)
    u = server.url
    # B sees nothing of A's…
    assert b.get(u("/v1/files")).json()["data"] == []
    assert b.get(u("/v1/fine_tuning/jobs")).json()["data"] == []
    for path in (f"/v1/files/{f['id']}", f"/v1/files/{f['id']}/content", f"/v1/fine_tuning/jobs/{job['id']}",
                 f"/v1/fine_tuning/jobs/{job['id']}/events", f"/v1/fine_tuning/jobs/{job['id']}/checkpoints",
                 f"/v1/fine_tuning/jobs/{job['id']}/metrics"):
        assert_openai_error(b.get(u(path)), 404, "not_found")
    # …cannot act on it…
    for action in ("cancel", "pause", "resume"):
        assert_openai_error(b.post(u(f"/v1/fine_tuning/jobs/{job['id']}/{action}")), 404, "not_found")
    assert_openai_error(b.delete(u(f"/v1/files/{f['id']}")), 404, "not_found")
    # …nor use A's file in its own job.
    r = b.post(u("/v1/fine_tuning/jobs"), json={"model": "m", "training_file": f["id"]})
    assert_openai_error(r, 400, "file_not_found", "training_file")
    # A still has everything.
    assert a.get(u(f"/v1/fine_tuning/jobs/{job['id']}")).status_code == 200
    assert [x["id"] for x in a.get(u("/v1/files")).json()["data"]] == [f["id"]]


def test_keys_tokens_and_revocation(server):
    key = server.create_key("proj-a")
    tok = server.create_token("w1")
    u = server.url
    assert_openai_error(requests.get(u("/v1/fine_tuning/jobs")), 401, "missing_api_key")
    assert_openai_error(requests.get(u("/v1/fine_tuning/jobs"), headers={"Authorization": "Bearer nope"}), 401,
                        "invalid_api_key")
    # A worker token does not open /v1, a key does not open /internal.
    assert_openai_error(server.client(tok).get(u("/v1/fine_tuning/jobs")), 401)
    assert_openai_error(server.client(key).post(u("/internal/v1/lease"), json={"worker_id": "wrk_x"}), 401)
    w = TestWorker(server, tok)
    w.register()
    # Revoked key: refused at once.
    assert server.client(key).get(u("/v1/files")).status_code == 200
    server.revoke_key(key)
    assert_openai_error(server.client(key).get(u("/v1/files")), 401, "invalid_api_key")
    # Keys are stored hashed: the secret is nowhere in the database file.
    key2 = server.create_key("proj-c")
    db = (server.data_dir / "loranull.db").read_bytes() + (server.data_dir / "loranull.db-wal").read_bytes() \
        if (server.data_dir / "loranull.db-wal").exists() else (server.data_dir / "loranull.db").read_bytes()
    assert key2.encode() not in db and tok.encode() not in db


def test_malformed_requests(server):
    key = server.create_key("proj-a")
    c = server.client(key)
    u = server.url
    f = server.upload(key, TRAIN_JSONL)
    jobs = u("/v1/fine_tuning/jobs")
    assert_openai_error(c.post(jobs, data="{not json", headers={"Content-Type": "application/json"}), 400,
                        "invalid_json")
    assert_openai_error(c.post(jobs, data="[1,2]"), 400, "invalid_json")
    assert_openai_error(c.post(jobs, data=""), 400, "invalid_json")
    assert_openai_error(c.post(jobs, json={"training_file": f["id"]}), 400, param="model")
    assert_openai_error(c.post(jobs, json={"model": 5, "training_file": f["id"]}), 400, param="model")
    assert_openai_error(c.post(jobs, json={"model": "m", "training_file": "../../etc/passwd"}), 400,
                        param="training_file")
    assert_openai_error(c.post(jobs, json={"model": "m", "training_file": f["id"], "adapter": {"rank": 0}}), 400,
                        param="adapter.rank")
    assert_openai_error(c.post(jobs, json={"model": "m", "training_file": f["id"], "adapter": {"type": "dora"}}), 400,
                        param="adapter.type")
    assert_openai_error(c.post(jobs, json={"model": "m", "training_file": f["id"],
                                           "adapter": {"target_modules": ["lm_head"]}}), 400,
                        param="adapter.target_modules[0]")
    assert_openai_error(c.post(jobs, json={"model": "m", "training_file": f["id"], "bogus": 1}), 400, param="bogus")
    assert_openai_error(c.post(jobs, json={"model": "m", "training_file": f["id"],
                                           "method": {"type": "dpo"}}), 400, param="method.type")
    assert_openai_error(c.post(jobs, json={"model": "m", "training_file": f["id"],
                                           "hyperparameters": {"n_epochs": "many"}}), 400,
                        param="hyperparameters.n_epochs")
    assert_openai_error(c.post(jobs, json={"model": "m", "training_file": f["id"], "resources": {"ranks": 65}}), 400,
                        param="resources.ranks")
    # Huge body: refused with 413 before it is read.
    assert_openai_error(c.post(jobs, data=b"{" + b" " * (2 << 20) + b"}"), 413, "request_too_large")
    # Unknown and malformed ids; path tricks.
    for bad in ("ftjob-doesnotexist", "ftjob-..%2f..%2fetc", "file-x", "ftjob-%00", "x" * 150):
        assert c.get(u(f"/v1/fine_tuning/jobs/{bad}")).status_code == 404
    assert_openai_error(c.get(u("/v1/files/file-nope/content")), 404, "not_found")
    assert_openai_error(c.get(u("/v1/fine_tuning/jobs"), params={"limit": "0"}), 400, param="limit")
    assert_openai_error(c.get(u("/v1/fine_tuning/jobs"), params={"limit": "abc"}), 400, param="limit")
    assert_openai_error(c.get(u("/v1/fine_tuning/jobs"), params={"after": "ftjob-unknown"}), 400, param="after")
    assert_openai_error(c.get(u("/v1/nothing")), 404, "unknown_url")
    assert_openai_error(c.put(jobs, json={}), 405, "method_not_allowed")
    # Uploads: missing purpose, wrong purpose, missing file, not multipart.
    assert_openai_error(c.post(u("/v1/files"), files={"file": ("a.jsonl", b"x")}), 400, param="purpose")
    assert_openai_error(c.post(u("/v1/files"), data={"purpose": "batch"}, files={"file": ("a", b"x")}), 400,
                        param="purpose")
    assert_openai_error(c.post(u("/v1/files"), data={"purpose": "fine-tune"}), 400)
    assert_openai_error(c.post(u("/v1/files"), json={"purpose": "fine-tune"}), 400, "invalid_content_type")
    # Static files: no traversal out of the static dir.
    for p in ("/static/../migrations/001_init.sql", "/static/..%2f..%2fMakefile", "/static/.hidden",
              "/static//etc/passwd"):
        assert requests.get(u(p)).status_code == 404


def test_raw_path_traversal_over_socket(server):
    """requests normalises '..'; send the raw request line ourselves."""
    for target in (b"/static/../../../../etc/passwd", b"/static/%2e%2e/%2e%2e/etc/passwd"):
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 404"), data[:200]
        assert b"root:" not in data


def test_delete_file_in_use_refused(server):
    key = server.create_key("proj-a")
    c = server.client(key)
    f = server.upload(key, TRAIN_JSONL)
    job = server.create_job(key, model="m", training_file=f["id"])
    assert_openai_error(c.delete(server.url(f"/v1/files/{f['id']}")), 409, "file_in_use")
    c.post(server.url(f"/v1/fine_tuning/jobs/{job['id']}/cancel"))
    r = c.delete(server.url(f"/v1/files/{f['id']}"))
    assert r.status_code == 200 and r.json() == {"object": "file", "id": f["id"], "deleted": True}
    assert c.get(server.url(f"/v1/files/{f['id']}")).status_code == 404


def test_upload_limit_and_content_addressing(server_factory):
    srv = server_factory("--max-upload-bytes", "1000")
    key = srv.create_key("p")
    c = srv.client(key)
    r = c.post(srv.url("/v1/files"), data={"purpose": "fine-tune"}, files={"file": ("big.jsonl", b"x" * 5000)})
    assert_openai_error(r, 413, "request_too_large")
    a = srv.upload(key, b'{"text":"same"}\n', "a.jsonl")
    b = srv.upload(key, b'{"text":"same"}\n', "b.jsonl")
    assert a["id"] != b["id"] and a["sha256"] == b["sha256"]
    blobs = [p for p in (srv.data_dir / "blobs").rglob("*") if p.is_file()]
    assert len(blobs) == 1 and blobs[0].name == a["sha256"]
    # Temp files go when the request completes, just after the reply was sent.
    deadline = time.time() + 5
    while [p for p in (srv.data_dir / "tmp").iterdir()] and time.time() < deadline:
        time.sleep(0.02)
    assert not [p for p in (srv.data_dir / "tmp").iterdir()], "temp files left behind"
    # Deleting one of two files with the same bytes keeps the blob for the other; the last one frees it.
    assert c.delete(srv.url(f"/v1/files/{a['id']}")).status_code == 200
    assert c.get(srv.url(f"/v1/files/{b['id']}/content")).content == b'{"text":"same"}\n'
    assert c.delete(srv.url(f"/v1/files/{b['id']}")).status_code == 200
    assert not [p for p in (srv.data_dir / "blobs").rglob("*") if p.is_file()]


@pytest.mark.parametrize("n", [45])
def test_pagination(server, n):
    key = server.create_key("p")
    c = server.client(key)
    f = server.upload(key, TRAIN_JSONL)
    ids = [server.create_job(key, model="m", training_file=f["id"])["id"] for _ in range(n)]
    seen, after = [], None
    while True:
        params = {"limit": 20}
        if after:
            params["after"] = after
        page = c.get(server.url("/v1/fine_tuning/jobs"), params=params).json()
        seen += [j["id"] for j in page["data"]]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert seen == list(reversed(ids))
