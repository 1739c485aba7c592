"""Where a job runs, over real HTTP: GET job's `placement` names each rank's worker while the job runs
(null before and after), and GET /v1/workers tells each worker's ranks — of the caller's jobs only."""
from gang_helpers import MODEL, create, form_gang, gang_of_two, setup
from lnserver import TestWorker


def placement(server, key, job):
    return server.get_job(key, job)["placement"]


def workers_by_id(server, key):
    r = server.client(key).get(server.url("/v1/workers"))
    assert r.status_code == 200, r.text
    return {w["id"]: w for w in r.json()["data"]}


def test_a_gang_spread_over_two_workers_shows_each_rank_on_its_worker(steady_server):
    server = steady_server
    key, tok, f, job, a, b = gang_of_two(server)
    assert placement(server, key, job) is None  # queued: nowhere yet
    r0, r1, gen = form_gang(job, a, b)
    p = placement(server, key, job)
    assert p == {"world_size": 2, "lease_generation": gen,
                 "ranks": [{"rank": 0, "worker_id": r0.worker_id, "worker_name": r0.name},
                           {"rank": 1, "worker_id": r1.worker_id, "worker_name": r1.name}]}, p
    ws = workers_by_id(server, key)
    assert ws[r0.worker_id]["ranks"] == [{"job_id": job, "world_size": 2, "ranks": [0]}]
    assert ws[r1.worker_id]["ranks"] == [{"job_id": job, "world_size": 2, "ranks": [1]}]
    assert ws[r0.worker_id]["current_jobs"] == [job]

    # Another project sees the workers busy, but neither the job nor its ranks.
    other = server.create_key("proj-b")
    theirs = workers_by_id(server, other)
    assert theirs[r0.worker_id]["busy"] and theirs[r0.worker_id]["ranks"] == [] == theirs[r0.worker_id]["current_jobs"]

    done = r0.complete(job, gen, as_me=True)
    assert done.status_code == 200, done.text
    assert server.get_job(key, job)["status"] == "succeeded"
    assert placement(server, key, job) is None
    ws = workers_by_id(server, key)
    assert ws[r0.worker_id]["ranks"] == [] and not ws[r1.worker_id]["busy"]


def test_one_worker_with_two_devices_holds_both_ranks(steady_server):
    server = steady_server
    key, tok, f = setup(server)
    job = create(server, key, f, 2, wait_queued=True)
    w = TestWorker(server, tok, "twin", models=(MODEL,), devices=2)
    w.register()
    lease = w.lease(wait_s=10)
    assert lease and lease["job_id"] == job and lease["ranks"] == [0, 1], lease
    p = placement(server, key, job)
    assert [(r["rank"], r["worker_id"], r["worker_name"]) for r in p["ranks"]] == [(0, w.worker_id, "twin"),
                                                                                   (1, w.worker_id, "twin")]
    assert p["world_size"] == 2
    assert workers_by_id(server, key)[w.worker_id]["ranks"] == [{"job_id": job, "world_size": 2, "ranks": [0, 1]}]
    # The list and the other replies leave placement out (it is read per job).
    listed = server.client(key).get(server.url("/v1/fine_tuning/jobs")).json()["data"]
    assert [j["id"] for j in listed] == [job] and "placement" not in listed[0]
    # A lease that ends (released) takes the placement with it.
    rel = w.release(job, lease["lease_generation"])
    assert rel.status_code == 200, rel.text
    assert server.get_job(key, job)["status"] == "queued"
    assert placement(server, key, job) is None
