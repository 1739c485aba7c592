"""No starvation of large gangs: when the oldest queued job of a pool cannot be placed, the devices that
free up are held for it instead of going to younger jobs (strict first in, first out per pool), unless
the live workers could never hold it."""
import threading

from gang_helpers import MODEL, create, events, form_gang, messages, one_device_workers, setup
from lnserver import TestWorker


def lease_seq(server, key, job_id):
    """The global order of the job's (first) lease: its 'Job leased' event's sequence number."""
    return min(s for s, m in events(server, key, job_id) if m.startswith("Job leased"))


def gang_waits(server, key):
    """loranull_gang_waits{reason=…} from /metrics."""
    text = server.client(key).get(server.url("/metrics")).text
    return {line.split('"')[1]: int(float(line.split()[-1])) for line in text.splitlines()
            if line.startswith("loranull_gang_waits{")}


def test_a_freed_device_is_held_for_the_older_gang_not_given_to_a_younger_job(steady_server):
    server = steady_server
    key, tok, f = setup(server)
    a, b = one_device_workers(server, tok, 2)
    j1, j2 = create(server, key, f, 1, wait_queued=True), create(server, key, f, 1, wait_queued=True)
    la, lb = a.lease(wait_s=5), b.lease(wait_s=5)
    assert {la["job_id"], lb["job_id"]} == {j1, j2}
    gang = create(server, key, f, 2, wait_queued=True)
    younger = [create(server, key, f, 1, wait_queued=True) for _ in range(2)]
    # a's job ends; a's device is held for the gang, not given to the younger single-rank jobs.
    assert a.complete(la["job_id"], la["lease_generation"]).status_code == 200
    assert a.lease(wait_s=0.5) is None
    assert all(server.get_job(key, j)["status"] == "queued" for j in younger + [gang])
    held = [m for m in messages(server, key, gang) if m.startswith("Waiting for 2 devices")]
    assert len(held) == 1 and a.worker_id in held[0] and "younger jobs" in held[0], held
    assert gang_waits(server, key) == {"holding": 1, "capacity": 0}
    # b's job ends: with a still polling, the two free devices form the gang at once.
    assert b.complete(lb["job_id"], lb["lease_generation"]).status_code == 200
    rank0, _, gen = form_gang(gang, a, b)
    assert gang_waits(server, key) == {"holding": 0, "capacity": 0}
    # Then the younger jobs, in their order.
    assert rank0.complete(gang, gen, as_me=True).status_code == 200
    first = a.lease(wait_s=5)
    assert first["job_id"] == younger[0]


def test_a_gang_among_a_stream_of_single_rank_jobs_is_leased_in_its_turn(steady_server):
    """Two one-device workers serve 3 single-rank jobs, a 2-rank job, then 6 more single-rank jobs, each
    worker leasing again as soon as its job ends: every job is leased in creation order, so the gang
    waits for exactly the jobs before it (without the hold it would wait forever: the two devices are
    never free at the same moment)."""
    server = steady_server
    key, tok, f = setup(server)
    ranks = [1, 1, 1, 2, 1, 1, 1, 1, 1, 1]
    jobs = [create(server, key, f, n) for n in ranks]
    for j in jobs:
        server.wait_status(key, j, "queued")
    gang = jobs[3]
    errors = []

    def serve(w):
        try:
            while True:
                lease = w.lease(wait_s=3)
                if lease is None:
                    if all(server.get_job(key, j)["status"] == "succeeded" for j in jobs):
                        return
                    continue
                job, gen = lease["job_id"], lease["lease_generation"]
                if lease["ranks"] == [0]:
                    r = w.complete(job, gen, as_me=True)
                    assert r.status_code == 200, r.text
                # a rank != 0 just ends: rank 0's complete frees it
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(repr(e))

    threads = [threading.Thread(target=serve, args=(w,)) for w in one_device_workers(server, tok, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and not any(t.is_alive() for t in threads), errors
    order = sorted(jobs, key=lambda j: lease_seq(server, key, j))
    assert order == jobs, [ranks[jobs.index(j)] for j in order]
    assert server.get_job(key, gang)["status"] == "succeeded"


def test_a_gang_the_live_workers_cannot_hold_blocks_nobody(steady_server):
    server = steady_server
    key, tok, f = setup(server)
    a, b = one_device_workers(server, tok, 2)
    big = create(server, key, f, 3, wait_queued=True)
    small = create(server, key, f, 1, wait_queued=True)
    lease = a.lease(wait_s=5)
    assert lease and lease["job_id"] == small
    msgs = messages(server, key, big)
    assert any(m.startswith("Cannot be placed yet") and "2 devices in all" in m and "needs 3" in m for m in msgs), msgs
    assert server.get_job(key, big)["status"] == "queued"
    assert gang_waits(server, key) == {"holding": 0, "capacity": 1}
    # A third worker makes it placeable: from then on free devices are held for it.
    a.complete(small, lease["lease_generation"])
    c = one_device_workers(server, tok, 1)[0]
    create(server, key, f, 1, wait_queued=True)  # younger: must not take c's device
    assert c.lease(wait_s=0.5) is None
    msgs = messages(server, key, big)
    assert any(m.startswith("Waiting for 3 devices") for m in msgs), msgs
    got = {}
    ts = [threading.Thread(target=lambda w=w: got.__setitem__(w.worker_id, w.lease(wait_s=10))) for w in (a, b)]
    for t in ts:
        t.start()
    got[c.worker_id] = c.lease(wait_s=10)
    for t in ts:
        t.join()
    assert {g["job_id"] for g in got.values()} == {big}
    assert sorted(r for g in got.values() for r in g["ranks"]) == [0, 1, 2]


def test_a_gang_of_device_any_is_never_split_over_cpu_and_gpu_workers(steady_server):
    """Ranks on different workers talk over TCP (CPU) or NCCL (GPU), never both: a 2-rank job with
    device "any" waits while the free devices are one CPU and one GPU worker, and is leased to two
    workers of one kind once there are."""
    server = steady_server
    key, tok, f = setup(server)
    job = server.create_job(key, model=MODEL, training_file=f["id"], resources={"ranks": 2, "device": "any"})["id"]
    server.wait_status(key, job, "queued")
    cpu = TestWorker(server, tok, "cpu-a", models=(MODEL,), devices=1, kind="cpu")
    gpu = TestWorker(server, tok, "gpu-a", models=(MODEL,), devices=1, kind="cuda")
    cpu.register()
    gpu.register()
    got = {}
    t = threading.Thread(target=lambda: got.__setitem__("cpu", cpu.lease(wait_s=2)))
    t.start()
    got["gpu"] = gpu.lease(wait_s=2)
    t.join()
    assert got == {"cpu": None, "gpu": None}, got
    assert server.get_job(key, job)["status"] == "queued"
    cpu2 = TestWorker(server, tok, "cpu-b", models=(MODEL,), devices=1, kind="cpu")
    cpu2.register()
    t = threading.Thread(target=lambda: got.__setitem__("cpu", cpu.lease(wait_s=10)))
    t.start()
    got["cpu2"] = cpu2.lease(wait_s=10)
    t.join()
    assert got["cpu"] and got["cpu2"], got
    assert got["cpu"]["job_id"] == got["cpu2"]["job_id"] == job
    assert {p["worker_id"] for p in got["cpu"]["peers"]} == {cpu.worker_id, cpu2.worker_id}
    assert gpu.lease(wait_s=0.5) is None
