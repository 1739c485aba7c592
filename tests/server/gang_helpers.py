"""Helpers of the gang tests (test_gangs.py, test_gang_reservation.py): one-device test workers of one
model, jobs of N ranks, a gang formed by two long-polling workers, a job's event messages."""
import threading

from lnserver import TRAIN_JSONL, TestWorker

MODEL = "big-llama"


def setup(server):
    """A project key, a worker token and an uploaded training file."""
    key, tok = server.create_key("proj-a"), server.create_token("w1")
    return key, tok, server.upload(key, TRAIN_JSONL)


def create(server, key, f, ranks=1, wait_queued=False):
    job = server.create_job(key, model=MODEL, training_file=f["id"], resources={"ranks": ranks})["id"]
    if wait_queued:
        server.wait_status(key, job, "queued")
    return job


def one_device_workers(server, tok, n=2):
    out = []
    for i in range(n):
        w = TestWorker(server, tok, f"w{i}", models=(MODEL,), devices=1)
        w.register()
        out.append(w)
    return out


def gang_of_two(server):
    """setup, a queued 2-rank job and two registered one-device workers: (key, tok, f, job, a, b)."""
    key, tok, f = setup(server)
    job = create(server, key, f, 2, wait_queued=True)
    a, b = one_device_workers(server, tok)
    return key, tok, f, job, a, b


def form_gang(job_id, a, b):
    """a long-polls first (a lone rank is not leased), b's lease completes the gang. Returns
    (rank 0's worker, rank 1's worker, lease generation)."""
    got = {}
    t = threading.Thread(target=lambda: got.__setitem__("a", a.lease(wait_s=20)))
    t.start()
    got["b"] = b.lease(wait_s=20)
    t.join()
    la, lb = got["a"], got["b"]
    assert la and lb and la["job_id"] == lb["job_id"] == job_id, (la, lb)
    assert la["lease_generation"] == lb["lease_generation"] and la["world_size"] == 2
    assert sorted(la["ranks"] + lb["ranks"]) == [0, 1]
    return (a, b, la["lease_generation"]) if la["ranks"] == [0] else (b, a, la["lease_generation"])


def events(server, key, job_id):
    """[(sequence number, message)] of the job's events, oldest first."""
    r = server.client(key).get(server.url(f"/v1/fine_tuning/jobs/{job_id}/events"), params={"limit": 100})
    assert r.status_code == 200, r.text
    return sorted((int(e["id"].split("-")[1]), e["message"]) for e in r.json()["data"])


def messages(server, key, job_id):
    return [m for _, m in events(server, key, job_id)]
