"""POST /internal/v1/jobs/{id}/release: a worker going away hands its job back without using an attempt."""
import time

from lnserver import TRAIN_JSONL, TestWorker


def setup(server):
    key = server.create_key("proj-r")
    tok = server.create_token("w1")
    f = server.upload(key, TRAIN_JSONL)
    job = server.create_job(key, model="tiny-llama", training_file=f["id"])
    server.wait_status(key, job["id"], "queued")
    return key, tok, job


def events_of(server, key, job_id):
    return server.client(key).get(server.url(f"/v1/fine_tuning/jobs/{job_id}/events"),
                                  params={"limit": 100}).json()["data"]


def test_release_requeues_at_once_without_using_an_attempt(server_factory):
    # Two attempts and a long retry backoff: a release that counted an attempt, or that backed off,
    # would show as a failed job or a lease that does not come within the test's few seconds.
    server = server_factory("--lease-ttl-s", "60", "--retry-backoff-s", "30", "--max-attempts", "2")
    key, tok, job = setup(server)
    w1, w2 = TestWorker(server, tok, name="w1"), TestWorker(server, tok, name="w2")
    w1.register()
    w2.register()
    gens = []
    for i in range(4):  # more releases than max_attempts
        w = (w1, w2)[i % 2]
        t0 = time.monotonic()
        lease = w.lease(wait_s=5)
        assert lease is not None and lease["job_id"] == job["id"], f"release {i}: job not leased again"
        assert time.monotonic() - t0 < 4.0, "a released job must not wait out the retry backoff"
        assert lease["attempt"] == 1 and lease["max_attempts"] == 2
        gens.append(lease["lease_generation"])
        r = w.release(job["id"], lease["lease_generation"])
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "queued"
    assert gens == sorted(set(gens)), "every grant bumps the generation"
    msgs = [e["message"] for e in events_of(server, key, job["id"])]
    released = [m for m in msgs if "released the job (shutting down); requeued without using an attempt" in m]
    assert len(released) == 4
    assert any(w1.worker_id in m for m in released) and any(w2.worker_id in m for m in released)
    # The job still runs to completion on its first attempt's count.
    lease = w1.lease(wait_s=5)
    assert lease["attempt"] == 1
    assert w1.complete(job["id"], lease["lease_generation"]).status_code == 200
    assert server.get_job(key, job["id"])["status"] == "succeeded"


def test_release_after_a_failure_gives_back_only_its_own_attempt(steady_server):
    server = steady_server
    key, tok, job = setup(server)
    w = TestWorker(server, tok)
    w.register()
    lease = w.lease(wait_s=5)
    assert w.fail(job["id"], lease["lease_generation"], "oom", "out of memory", retryable=True).status_code == 200
    lease = w.lease(wait_s=5)
    assert lease["attempt"] == 2
    assert w.release(job["id"], lease["lease_generation"]).status_code == 200
    lease = w.lease(wait_s=5)
    assert lease["attempt"] == 2, "the failure's attempt stays used; the release's is given back"


def test_release_with_a_stale_or_lost_lease_is_refused(steady_server):
    server = steady_server
    key, tok, job = setup(server)
    w = TestWorker(server, tok)
    w.register()
    l1 = w.lease(wait_s=5)
    assert w.release(job["id"], l1["lease_generation"]).status_code == 200
    # Released twice: the job is queued, the lease no longer valid.
    again = w.release(job["id"], l1["lease_generation"])
    assert again.status_code == 409 and again.json()["error"]["code"] == "lease_lost"
    l2 = w.lease(wait_s=5)
    stale = w.release(job["id"], l1["lease_generation"])
    assert stale.status_code == 409 and stale.json()["error"]["code"] == "lease_lost"
    assert "stale" in stale.json()["error"]["message"]
    j = server.get_job(key, job["id"])
    assert j["status"] == "running", "a refused release leaves the current lease alone"
    # Other reports of the released generation are refused too.
    assert w.heartbeat(job["id"], l1["lease_generation"]).status_code == 409
    # Bad bodies name the field.
    r = w.post(f"/jobs/{job['id']}/release", {"lease_generation": l2["lease_generation"], "reason": 7})
    assert r.status_code == 400 and r.json()["error"]["param"] == "reason"
    r = w.post(f"/jobs/{job['id']}/release", {"reason": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lease_generation"
    r = w.post("/jobs/ftjob-doesnotexist0000000000/release", {"lease_generation": 1})
    assert r.status_code == 404
    assert server.get_job(key, job["id"])["status"] == "running"


def test_release_of_an_expired_lease_is_refused_and_uses_the_attempt(server_factory):
    server = server_factory("--lease-ttl-s", "1", "--retry-backoff-s", "0.1", "--max-attempts", "3")
    key, tok, job = setup(server)
    w = TestWorker(server, tok)
    w.register()
    lease = w.lease(wait_s=5)
    time.sleep(1.3)
    r = w.release(job["id"], lease["lease_generation"])
    assert r.status_code == 409 and r.json()["error"]["code"] == "lease_lost"
    assert "expired" in r.json()["error"]["message"]
    lease = w.lease(wait_s=5)
    assert lease["attempt"] == 2, "an expired lease counts its attempt even if the worker tries to release it"
