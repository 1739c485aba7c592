"""Gangs spread over workers, over real HTTP: one lease for all ranks — any rank's heartbeat is taken,
one silent worker requeues every rank, fail or release from any rank ends every rank's lease, only
rank 0 completes, and the devices of every rank are free again once the lease ends."""
import time

from gang_helpers import create, form_gang, gang_of_two, messages, one_device_workers


def lost(resp):
    return resp.status_code == 409 and resp.json()["error"]["code"] == "lease_lost"


def test_any_rank_heartbeats_and_the_gang_lives_only_while_every_worker_does(steady_server):
    server = steady_server
    key, tok, f, job, a, b = gang_of_two(server)
    c = one_device_workers(server, tok, 1)[0]
    r0, r1, gen = form_gang(job, a, b)
    # Both ranks' heartbeats are taken.
    h1 = r1.heartbeat(job, gen, as_me=True)
    assert h1.status_code == 200, h1.text
    first = r0.heartbeat(job, gen, as_me=True)
    assert first.status_code == 200, first.text
    # Rank 0 alone cannot carry the gang past rank 1's last heartbeat: the lease ends at the earliest
    # of its workers' expiries.
    again = r0.heartbeat(job, gen, as_me=True)
    assert again.json()["expires_at"] == first.json()["expires_at"]
    # Once rank 1 is heard from again, the lease moves on.
    later = r1.heartbeat(job, gen, as_me=True)
    assert later.json()["expires_at"] > first.json()["expires_at"]
    # A heartbeat that names no worker speaks for every rank (the protocol before split gangs).
    legacy = r1.heartbeat(job, gen)
    assert legacy.status_code == 200 and legacy.json()["expires_at"] >= later.json()["expires_at"]
    # A worker holding no rank of this gang is refused, and so is a malformed id.
    stranger = c.heartbeat(job, gen, as_me=True)
    assert lost(stranger) and stranger.json()["error"]["param"] == "worker_id", stranger.text
    assert c.worker_id in stranger.json()["error"]["message"]
    bad = r0.post(f"/jobs/{job}/heartbeat", {"lease_generation": gen, "worker_id": 7})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "worker_id"
    assert server.get_job(key, job)["status"] == "running"


def test_a_silent_worker_requeues_the_whole_gang_and_frees_every_device(server_factory):
    server = server_factory("--lease-ttl-s", "3", "--retry-backoff-s", "0.2", "--max-attempts", "5")
    key, tok, f, job, a, b = gang_of_two(server)
    r0, r1, gen = form_gang(job, a, b)
    # Rank 0 keeps heartbeating; rank 1's worker has gone silent.
    deadline = time.time() + 60
    while time.time() < deadline:
        hb = r0.heartbeat(job, gen, as_me=True)
        if hb.status_code != 200:
            break
        time.sleep(0.2)
    assert lost(hb), hb.text  # rank 0 learns it has lost the lease, and stops
    assert server.get_job(key, job)["status"] == "queued"
    msgs = messages(server, key, job)
    expired = [m for m in msgs if m.startswith("Lease expired")]
    assert expired and f"worker {r1.worker_id} (rank 1 of 2)" in expired[0], msgs
    assert "every rank of the gang (2 workers) is released" in expired[0]
    # Every rank's lease is over: the silent rank's reports are refused too.
    assert lost(r1.heartbeat(job, gen, as_me=True))
    # Both devices are free again at once (neither worker said so): the gang is leased anew.
    r0b, r1b, gen2 = form_gang(job, a, b)
    assert gen2 > gen
    assert r0b.heartbeat(job, gen2, as_me=True).status_code == 200


def test_only_rank_zero_completes_and_its_complete_frees_every_rank(steady_server):
    server = steady_server
    key, tok, f, job, a, b = gang_of_two(server)
    r0, r1, gen = form_gang(job, a, b)
    single = create(server, key, f, 1, wait_queued=True)
    # Rank 1 finished its part; its device still belongs to the running gang.
    assert r1.lease(wait_s=0.5) is None
    no = r1.complete(job, gen, trained_tokens=5, as_me=True)
    assert no.status_code == 409, no.text
    err = no.json()["error"]
    assert err["code"] == "not_rank_zero" and err["param"] == "worker_id"
    assert r1.worker_id in err["message"] and r0.worker_id in err["message"]
    assert server.get_job(key, job)["status"] == "running"
    done = r0.complete(job, gen, trained_tokens=5, as_me=True)
    assert done.status_code == 200, done.text
    assert server.get_job(key, job)["status"] == "succeeded"
    # Rank 0's complete ended rank 1's lease and freed its worker.
    assert lost(r1.heartbeat(job, gen, as_me=True))
    nxt = r1.lease(wait_s=5)
    assert nxt and nxt["job_id"] == single and nxt["ranks"] == [0]


def test_fail_from_any_rank_ends_every_ranks_lease(server_factory):
    server = server_factory("--lease-ttl-s", "60", "--retry-backoff-s", "0.2", "--max-attempts", "5")
    key, tok, f, job, a, b = gang_of_two(server)
    # Retryable from rank 1: requeued; rank 0's next heartbeat says the lease is lost.
    r0, r1, gen = form_gang(job, a, b)
    rf = r1.fail(job, gen, "comm_peer_lost", "rank 0 closed the connection", retryable=True, as_me=True)
    assert rf.status_code == 200, rf.text
    assert server.get_job(key, job)["status"] == "queued"
    hb = r0.heartbeat(job, gen, as_me=True)
    assert lost(hb) and "queued" in hb.json()["error"]["message"]
    assert any(f"Worker {r1.worker_id} reported a retryable failure" in m for m in messages(server, key, job))
    # Release from a non-zero rank also hands back the whole gang.
    r0, r1, gen = form_gang(job, a, b)
    rel = r1.release(job, gen, as_me=True)
    assert rel.status_code == 200, rel.text
    assert lost(r0.heartbeat(job, gen, as_me=True))
    # Not retryable, from rank 1: the job fails; rank 0 is told, and both devices are free.
    r0, r1, gen = form_gang(job, a, b)
    nf = r1.fail(job, gen, "out_of_memory", "rank 1 ran out of memory", as_me=True)
    assert nf.status_code == 200, nf.text
    j = server.get_job(key, job)
    assert j["status"] == "failed" and j["error"]["code"] == "out_of_memory"
    hb = r0.heartbeat(job, gen, as_me=True)
    assert lost(hb) and "failed" in hb.json()["error"]["message"]
    # A fail naming a worker outside the gang changes nothing.
    job2 = create(server, key, f, 2, wait_queued=True)
    r0, r1, gen = form_gang(job2, a, b)
    c = one_device_workers(server, tok, 1)[0]
    assert lost(c.fail(job2, gen, "x", "not mine", as_me=True))
    assert server.get_job(key, job2)["status"] == "running"
