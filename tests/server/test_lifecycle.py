"""The whole job lifecycle over real sockets: a test worker speaking /internal/v1 to the real binary."""
import threading
import time

import requests

from lnserver import TRAIN_JSONL, TestWorker, sse_events


def setup(server, models=("tiny-llama",)):
    key = server.create_key("proj-a")
    tok = server.create_token("w1")
    f = server.upload(key, TRAIN_JSONL)
    return key, tok, f


def test_full_lifecycle_with_sse_checkpoint_artifact_download(steady_server):
    server = steady_server
    key, tok, f = setup(server)
    job = server.create_job(key, model="tiny-llama", training_file=f["id"], suffix="demo",
                            adapter={"type": "lora_null_v2", "rank": 4})
    assert job["status"] == "validating_files"
    assert job["adapter"]["rank"] == 4 and job["adapter"]["type"] == "lora_null_v2"
    server.wait_status(key, job["id"], "queued")

    w = TestWorker(server, tok)
    w.register()
    lease = w.lease(wait_s=5)
    assert lease["job_id"] == job["id"] and lease["ranks"] == [0] and lease["world_size"] == 1
    gen = lease["lease_generation"]
    assert lease["spec"]["training_file"] == f["id"] and lease["resume_from"] is None
    assert server.get_job(key, job["id"])["status"] == "running"

    # The worker downloads the training file through the internal API.
    r = w.s.get(server.url(f"/internal/v1/files/{f['id']}/content"))
    assert r.status_code == 200 and r.content == TRAIN_JSONL

    # A live SSE reader sees events as they are posted.
    api = server.client(key)
    stream = api.get(server.url(f"/v1/fine_tuning/jobs/{job['id']}/events"), params={"stream": "true"},
                     stream=True, timeout=20)
    assert stream.status_code == 200 and stream.headers["Content-Type"].startswith("text/event-stream")
    got = []
    reader = threading.Thread(target=lambda: got.extend(sse_events(stream, timeout=20)))
    reader.start()

    r = w.events(job["id"], gen, events=[{"level": "info", "message": "step 1: loss 2.5"}],
                 metrics=[{"step": 1, "values": {"train_loss": 2.5, "lr": 1e-4}},
                          {"step": 2, "values": {"train_loss": 2.0}}])
    assert r.status_code == 200, r.text
    assert r.json()["metric_points"] == 3
    assert w.heartbeat(job["id"], gen).status_code == 200

    ck_file = w.upload(job["id"], gen, "adapter_model.safetensors", b"\x00" * 100, kind="checkpoint")
    assert ck_file.status_code == 201, ck_file.text
    ck = w.checkpoint(job["id"], gen, 2, [ck_file.json()["id"]], {"train_loss": 2.0})
    assert ck.status_code == 201, ck.text
    result = w.upload(job["id"], gen, "adapter_model.safetensors", b"ADAPTER-BYTES", kind="result")
    assert result.status_code == 201, result.text
    done = w.complete(job["id"], gen, trained_tokens=1234)
    assert done.status_code == 200, done.text

    reader.join(20)
    messages = [d["message"] for i, d in got if i not in ("comment",) and d != "[DONE]"]
    assert "step 1: loss 2.5" in messages
    assert got[-1][1] == "[DONE]", got[-3:]
    ids = [int(i.split("-")[1]) for i, d in got if i not in ("comment", None) and d != "[DONE]"]
    assert ids == sorted(ids) and len(ids) == len(set(ids))

    job = server.get_job(key, job["id"])
    assert job["status"] == "succeeded" and job["trained_tokens"] == 1234
    assert job["fine_tuned_model"].startswith("ft:tiny-llama:proj-a:demo:")
    assert job["result_files"] == [result.json()["id"]]
    content = api.get(server.url(f"/v1/files/{job['result_files'][0]}/content"))
    assert content.status_code == 200 and content.content == b"ADAPTER-BYTES"

    cks = api.get(server.url(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints")).json()
    assert cks["data"][0]["step_number"] == 2 and cks["data"][0]["metrics"]["train_loss"] == 2.0
    met = api.get(server.url(f"/v1/fine_tuning/jobs/{job['id']}/metrics")).json()
    series = {s["name"]: s for s in met["data"]}
    assert series["train_loss"]["steps"] == [1, 2] and series["train_loss"]["values"] == [2.5, 2.0]

    # After the end, a report is refused: the lease is gone.
    assert w.events(job["id"], gen, events=[{"message": "late"}]).status_code == 409
    models = {m["id"] for m in api.get(server.url("/v1/models")).json()["data"]}
    assert "tiny-llama" in models and job["fine_tuned_model"] in models


def test_sse_resume_with_last_event_id(steady_server):
    server = steady_server
    key, tok, f = setup(server)
    job = server.create_job(key, model="tiny-llama", training_file=f["id"])
    server.wait_status(key, job["id"], "queued")
    w = TestWorker(server, tok)
    w.register()
    lease = w.lease()
    gen = lease["lease_generation"]
    for i in range(5):
        assert w.events(job["id"], gen, events=[{"message": f"m{i}"}]).status_code == 200
    api = server.client(key)
    url = server.url(f"/v1/fine_tuning/jobs/{job['id']}/events")
    first = sse_events(api.get(url, params={"stream": "true"}, stream=True, timeout=10), stop_after=4, timeout=5)
    first = [(i, d) for i, d in first if i != "comment"]
    assert len(first) == 4
    last_id = first[-1][0]
    # Resume: everything after last_id, then the job ends and the stream says [DONE].
    resumed = api.get(url, params={"stream": "true"}, headers={"Last-Event-ID": last_id}, stream=True, timeout=10)
    t = threading.Thread(target=lambda: (time.sleep(0.3), w.complete(job["id"], gen)))
    t.start()
    rest = [(i, d) for i, d in sse_events(resumed, timeout=10) if i != "comment"]
    t.join()
    all_msgs = [d["message"] for _, d in first] + [d["message"] for _, d in rest if d != "[DONE]"]
    assert all_msgs[:4] == [d["message"] for _, d in first]
    assert len(all_msgs) == len(set(all_msgs)), "an event was delivered twice"
    assert {"m0", "m1", "m2", "m3", "m4"} <= set(all_msgs)
    assert int(rest[0][0].split("-")[1]) == int(last_id.split("-")[1]) + 1
    assert rest[-1][1] == "[DONE]"
    # Keep-alive comments on an idle stream (keep-alive is 1 s in this fixture).
    job2 = server.create_job(key, model="tiny-llama", training_file=f["id"])
    idle = api.get(server.url(f"/v1/fine_tuning/jobs/{job2['id']}/events"), params={"stream": "true"},
                   stream=True, timeout=10)
    start = time.time()
    seen_comment = False
    for line in idle.iter_lines(decode_unicode=True):
        if line and line.startswith(": keep-alive"):
            seen_comment = True
            break
        if time.time() - start > 5:
            break
    idle.close()
    assert seen_comment


def test_cancel_pause_resume(steady_server):
    server = steady_server
    key, tok, f = setup(server)
    api = server.client(key)
    job = server.create_job(key, model="tiny-llama", training_file=f["id"])
    server.wait_status(key, job["id"], "queued")
    # Pause a queued job: no worker may lease it.
    r = api.post(server.url(f"/v1/fine_tuning/jobs/{job['id']}/pause"))
    assert r.status_code == 200 and r.json()["status"] == "paused"
    w = TestWorker(server, tok)
    w.register()
    assert w.lease(wait_s=0.5) is None
    # Resume → leased; checkpoint; pause while running → the worker's lease is lost.
    assert api.post(server.url(f"/v1/fine_tuning/jobs/{job['id']}/resume")).json()["status"] == "queued"
    lease = w.lease(wait_s=5)
    gen = lease["lease_generation"]
    fid = w.upload(job["id"], gen, "ckpt.bin", b"state", kind="checkpoint").json()["id"]
    assert w.checkpoint(job["id"], gen, 10, [fid]).status_code == 201
    assert api.post(server.url(f"/v1/fine_tuning/jobs/{job['id']}/pause")).json()["status"] == "paused"
    hb = w.heartbeat(job["id"], gen)
    assert hb.status_code == 409 and hb.json()["error"]["code"] == "lease_lost"
    assert "paused" in hb.json()["error"]["message"]
    # Within the pause grace the worker saves a last checkpoint (files, checkpoint, event) — but
    # nothing else: no heartbeat, no completion.
    fid2 = w.upload(job["id"], gen, "ckpt-last.bin", b"state-12", kind="checkpoint")
    assert fid2.status_code == 201, fid2.text
    assert w.checkpoint(job["id"], gen, 12, [fid2.json()["id"]]).status_code == 201
    assert w.events(job["id"], gen, events=[{"message": "saved on pause"}]).status_code == 200
    assert w.complete(job["id"], gen).status_code == 409
    # Resume → a new lease, higher generation, resuming from the last checkpoint.
    api.post(server.url(f"/v1/fine_tuning/jobs/{job['id']}/resume"))
    assert w.upload(job["id"], gen, "late.bin", b"x", kind="checkpoint").status_code == 409
    lease2 = w.lease(wait_s=5)
    assert lease2["lease_generation"] > gen
    assert lease2["attempt"] == 1, "a pause is not a failed attempt"
    assert lease2["resume_from"]["step_number"] == 12 and lease2["resume_from"]["files"] == [fid2.json()["id"]]
    # Cancel a running job; later reports refused; cancel again → 409.
    r = api.post(server.url(f"/v1/fine_tuning/jobs/{job['id']}/cancel"))
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert w.complete(job["id"], lease2["lease_generation"]).status_code == 409
    again = api.post(server.url(f"/v1/fine_tuning/jobs/{job['id']}/cancel"))
    assert again.status_code == 409 and again.json()["error"]["code"] == "invalid_job_state"
    assert api.post(server.url(f"/v1/fine_tuning/jobs/{job['id']}/resume")).status_code == 409


def test_lease_expiry_requeue_other_worker_and_stale_generation(server):
    key, tok, f = setup(server)
    job = server.create_job(key, model="tiny-llama", training_file=f["id"])
    server.wait_status(key, job["id"], "queued")
    w1, w2 = TestWorker(server, tok, "w1"), TestWorker(server, tok, "w2")
    w1.register()
    w2.register()
    l1 = w1.lease()
    # w1 goes silent; the lease (1.5 s) expires, the job is requeued with backoff, w2 gets it.
    l2 = w2.lease(wait_s=10)
    assert l2 and l2["job_id"] == job["id"]
    assert l2["lease_generation"] > l1["lease_generation"] and l2["attempt"] == 2
    # w1 comes back late: refused.
    late = w1.complete(job["id"], l1["lease_generation"])
    assert late.status_code == 409 and late.json()["error"]["code"] == "lease_lost"
    assert "stale" in late.json()["error"]["message"]
    assert w2.complete(job["id"], l2["lease_generation"]).status_code == 200
    events = server.client(key).get(server.url(f"/v1/fine_tuning/jobs/{job['id']}/events"),
                                    params={"limit": 100}).json()["data"]
    assert any("Lease expired" in e["message"] for e in events)
    assert server.get_job(key, job["id"])["status"] == "succeeded"


def test_retry_limit_fails_with_reason(server):
    key, tok, f = setup(server)
    job = server.create_job(key, model="tiny-llama", training_file=f["id"])
    server.wait_status(key, job["id"], "queued")
    w = TestWorker(server, tok)
    w.register()
    for attempt in (1, 2):
        lease = w.lease(wait_s=5)
        assert lease["attempt"] == attempt
        r = w.fail(job["id"], lease["lease_generation"], "oom", "out of memory", retryable=True)
        assert r.status_code == 200 and r.json()["status"] == "queued"
    # Third attempt: let the lease expire instead; max_attempts=3 → failed with the reason.
    lease = w.lease(wait_s=5)
    assert lease["attempt"] == 3
    job = server.wait_status(key, job["id"], "failed", timeout=10)
    assert job["error"]["code"] == "lease_expired"
    assert "gave up after 3 attempts" in job["error"]["message"]


def test_worker_final_failure_and_bad_training_file(steady_server):
    server = steady_server
    key, tok, f = setup(server)
    job = server.create_job(key, model="tiny-llama", training_file=f["id"])
    server.wait_status(key, job["id"], "queued")
    w = TestWorker(server, tok)
    w.register()
    lease = w.lease()
    r = w.fail(job["id"], lease["lease_generation"], "bad_model", "config.json: missing hidden_size")
    assert r.status_code == 200
    j = server.get_job(key, job["id"])
    assert j["status"] == "failed" and j["error"] == {"code": "bad_model", "message": "config.json: missing hidden_size",
                                                      "param": None}
    bad = server.upload(key, b'{"text":"ok"}\n{"nope": 1}\n')
    job = server.create_job(key, model="tiny-llama", training_file=bad["id"])
    j = server.wait_status(key, job["id"], "failed")
    assert j["error"]["code"] == "invalid_training_file" and "line 2" in j["error"]["message"]


def test_lease_only_to_worker_with_model_and_devices_and_gang(steady_server):
    server = steady_server
    key, tok, f = setup(server)
    job = server.create_job(key, model="big-llama", training_file=f["id"], resources={"ranks": 2, "device": "cpu"})
    server.wait_status(key, job["id"], "queued")
    wrong_model = TestWorker(server, tok, "wm", models=("tiny-llama",), devices=4)
    wrong_model.register()
    assert wrong_model.lease(wait_s=0.3) is None
    gpu = TestWorker(server, tok, "gpu", models=("big-llama",), devices=4, kind="cuda")
    gpu.register()
    assert gpu.lease(wait_s=0.3) is None  # device kind cpu wanted
    # Two one-device cpu workers: neither alone fits 2 ranks; together they form the gang.
    a = TestWorker(server, tok, "a", models=("big-llama",), devices=1)
    b = TestWorker(server, tok, "b", models=("big-llama",), devices=1)
    a.register()
    b.register()
    res = {}
    ta = threading.Thread(target=lambda: res.__setitem__("a", a.lease(wait_s=5)))
    ta.start()
    time.sleep(0.3)
    assert server.get_job(key, job["id"])["status"] == "queued", "a lone rank must not be leased"
    res["b"] = b.lease(wait_s=5)
    ta.join()
    la, lb = res["a"], res["b"]
    assert la and lb and la["job_id"] == lb["job_id"] == job["id"]
    assert la["lease_generation"] == lb["lease_generation"] and la["world_size"] == 2
    assert sorted(la["ranks"] + lb["ranks"]) == [0, 1]
    gen = la["lease_generation"]
    rank0, rank1 = (a, b) if la["ranks"] == [0] else (b, a)
    # Rendezvous: rank 1 waits for the NCCL id that rank 0 posts.
    got = {}
    waiter = threading.Thread(target=lambda: got.__setitem__("r", rank1.s.get(
        server.url(f"/internal/v1/jobs/{job['id']}/rendezvous/nccl_unique_id"),
        params={"lease_generation": gen, "wait_s": 5})))
    waiter.start()
    time.sleep(0.2)
    put = rank0.s.put(server.url(f"/internal/v1/jobs/{job['id']}/rendezvous/nccl_unique_id"),
                      json={"lease_generation": gen, "value": "AAECAwQ="})
    assert put.status_code == 200, put.text
    waiter.join()
    assert got["r"].status_code == 200 and got["r"].json()["value"] == "AAECAwQ="
    # A stale generation cannot read it.
    stale = rank1.s.get(server.url(f"/internal/v1/jobs/{job['id']}/rendezvous/nccl_unique_id"),
                        params={"lease_generation": gen - 1 if gen > 1 else gen + 5})
    assert stale.status_code == 409
    # One worker with 2 devices takes both ranks of a second job alone.
    job2 = server.create_job(key, model="big-llama", training_file=f["id"], resources={"ranks": 2})
    server.wait_status(key, job2["id"], "queued")
    two = TestWorker(server, tok, "two", models=("big-llama",), devices=2)
    two.register()
    l2 = two.lease(wait_s=5)
    assert l2["job_id"] == job2["id"] and l2["ranks"] == [0, 1]


def test_pause_grace_ends(server_factory):
    srv = server_factory("--pause-grace-s", "0.5", "--lease-ttl-s", "60")
    key, tok, f = setup(srv)
    job = srv.create_job(key, model="tiny-llama", training_file=f["id"])
    srv.wait_status(key, job["id"], "queued")
    w = TestWorker(srv, tok)
    w.register()
    gen = w.lease()["lease_generation"]
    srv.client(key).post(srv.url(f"/v1/fine_tuning/jobs/{job['id']}/pause"))
    time.sleep(0.8)
    r = w.upload(job["id"], gen, "too-late.bin", b"x", kind="checkpoint")
    assert r.status_code == 409 and r.json()["error"]["code"] == "lease_lost"
