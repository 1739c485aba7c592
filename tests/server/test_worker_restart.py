"""A worker daemon that restarts (crash, OOM kill, pod restart) re-registers under its kept worker id
with a new `instance`: the leases its old process held end at once — exactly as an expiry would end
them (attempt counted, backoff, max attempts), every rank of a gang — instead of after the lease TTL.
The same instance (the same process registering again) or none (older daemons) ends nothing.

The servers here run with a lease TTL of 600 s, so nothing in these tests can be an expiry."""
from gang_helpers import MODEL, create, form_gang, messages, setup
from lnserver import TRAIN_JSONL, TestWorker

LONG_TTL = ("--lease-ttl-s", "600", "--retry-backoff-s", "0.2", "--sse-keepalive-s", "1")


def register(w, instance=None):
    """Registers w (again, under its id once it has one) with this process instance; returns the reply."""
    body = {"name": w.name, "device_kind": w.kind, "devices": w.devices, "models": w.models}
    if w.worker_id:
        body["worker_id"] = w.worker_id
    if instance is not None:
        body["instance"] = instance
    r = w.post("/workers/register", body)
    assert r.status_code == 201, r.text
    assert w.worker_id in (None, r.json()["worker_id"])
    w.worker_id = r.json()["worker_id"]
    return r


def lost(resp):
    return resp.status_code == 409 and resp.json()["error"]["code"] == "lease_lost"


def expirations(server, key):
    text = server.client(key).get(server.url("/metrics")).text
    line = [x for x in text.splitlines() if x.startswith("loranull_lease_expirations_total ")][0]
    return int(float(line.split()[1]))


def one_job_leased(server_factory, max_attempts="3"):
    """A server, a job, and a worker (instance "aaaa") holding its lease: (server, key, job, worker, gen)."""
    server = server_factory(*LONG_TTL, "--max-attempts", max_attempts)
    key, tok = server.create_key("proj-a"), server.create_token("w1")
    f = server.upload(key, TRAIN_JSONL)
    job = server.create_job(key, model="tiny-llama", training_file=f["id"])["id"]
    server.wait_status(key, job, "queued")
    w = TestWorker(server, tok)
    register(w, "aaaa")
    lease = w.lease(wait_s=5)
    assert lease and lease["job_id"] == job and lease["attempt"] == 1
    return server, key, job, w, lease["lease_generation"]


def test_a_new_instance_requeues_the_old_processes_job_at_once(server_factory):
    server, key, job, w, gen = one_job_leased(server_factory)
    assert server.get_job(key, job)["status"] == "running"
    register(w, "bbbb")  # the daemon restarted: same work dir, same id, a new process
    j = server.get_job(key, job)
    assert j["status"] == "queued" and j["attempts"] == 1, j
    msgs = messages(server, key, job)
    ended = [m for m in msgs if m.startswith(f"Worker {w.worker_id} restarted (new process)")]
    assert len(ended) == 1, msgs
    assert f"Worker {w.worker_id} restarted (new process): its lease of rank 0 ended; requeued (attempt 1 of 3 used" \
        in ended[0]
    assert not any("Lease expired" in m for m in msgs)
    assert expirations(server, key) == 1  # counted as the expiry it stands for
    server_log = server.log_path.read_text(errors="replace")
    assert f"lease of {job} ended (Worker {w.worker_id} restarted (new process)" in server_log
    # The old process's reports are refused; the new one leases the job again (after the backoff).
    assert lost(w.heartbeat(job, gen))
    again = w.lease(wait_s=10)
    assert again and again["job_id"] == job and again["attempt"] == 2 and again["lease_generation"] > gen
    assert w.heartbeat(job, again["lease_generation"]).status_code == 200


def test_the_same_instance_or_none_ends_nothing(server_factory):
    server, key, job, w, gen = one_job_leased(server_factory)
    # The same live process registering again (e.g. the server forgot it): its lease stands.
    register(w, "aaaa")
    assert server.get_job(key, job)["status"] == "running"
    assert w.heartbeat(job, gen).status_code == 200
    # A daemon that sends no instance (older versions): today's behaviour, nothing ends.
    register(w)
    assert server.get_job(key, job)["status"] == "running"
    assert w.heartbeat(job, gen).status_code == 200
    assert not any("restarted" in m for m in messages(server, key, job))
    assert expirations(server, key) == 0
    # The registration before came from a daemon that sends none: one that sends an instance is
    # another process, so the lease ends.
    register(w, "cccc")
    assert server.get_job(key, job)["status"] == "queued"
    assert lost(w.heartbeat(job, gen))


def test_out_of_attempts_the_restart_fails_the_job_as_an_expiry_would(server_factory):
    server, key, job, w, gen = one_job_leased(server_factory, max_attempts="1")
    register(w, "bbbb")
    j = server.get_job(key, job)
    assert j["status"] == "failed", j
    assert j["error"]["code"] == "lease_expired"
    assert f"Worker {w.worker_id} restarted (new process)" in j["error"]["message"]
    assert "gave up after 1 attempt" in j["error"]["message"]


def test_a_restarted_worker_of_a_gang_ends_every_ranks_lease(server_factory):
    server = server_factory(*LONG_TTL, "--max-attempts", "5")
    key, tok, f = setup(server)
    job = create(server, key, f, 2, wait_queued=True)
    a, b = (TestWorker(server, tok, f"w{i}", models=(MODEL,), devices=1) for i in range(2))
    register(a, "a-1")
    register(b, "b-1")
    r0, r1, gen = form_gang(job, a, b)
    assert r0.heartbeat(job, gen, as_me=True).status_code == 200
    register(r1, "r1-restarted")  # rank 1's worker restarted
    assert server.get_job(key, job)["status"] == "queued"
    msgs = messages(server, key, job)
    ended = [m for m in msgs if "restarted (new process)" in m]
    assert len(ended) == 1 and ended[0].startswith(
        f"Worker {r1.worker_id} restarted (new process): its lease of rank 1 of 2 ended; every rank of the gang "
        "(2 workers) is released; requeued (attempt 1 of 5 used"), msgs
    # Rank 0's worker, alive, learns that the gang's lease is over at its next report.
    assert lost(r0.heartbeat(job, gen, as_me=True))
    assert lost(r1.heartbeat(job, gen, as_me=True))
    # Both devices are free at once: the gang is leased anew, the restart counted as an attempt.
    n0, n1, gen2 = form_gang(job, a, b)
    assert gen2 > gen
    assert n0.heartbeat(job, gen2, as_me=True).status_code == 200
    assert server.get_job(key, job)["attempts"] == 2


def test_instance_must_be_a_short_token(server_factory):
    server = server_factory(*LONG_TTL)
    w = TestWorker(server, server.create_token("w1"))
    for bad in ("", "has space", "x" * 65, 7):
        r = w.post("/workers/register", {"name": "w", "device_kind": "cpu", "devices": 1, "models": ["m"],
                                         "instance": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "instance", (bad, r.text)
    assert register(w, None).status_code == 201
