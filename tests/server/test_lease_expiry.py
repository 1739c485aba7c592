"""A lease past its expiry time is expired when a report checks it, not only at the once-a-second
sweep: a late heartbeat must not revive it, and the job is requeued at that moment."""
import time

from lnserver import TRAIN_JSONL, TestWorker

TTL = 1.0


def test_late_heartbeat_or_report_after_expiry_is_refused_before_the_sweep(server_factory):
    # A long retry backoff keeps each requeued job out of the next trial's lease.
    server = server_factory("--lease-ttl-s", str(TTL), "--retry-backoff-s", "60", "--max-attempts", "5")
    key, tok = server.create_key("proj-a"), server.create_token("w1")
    f = server.upload(key, TRAIN_JSONL)
    w = TestWorker(server, tok)
    w.register()
    trials = 5
    jobs = [server.create_job(key, model="tiny-llama", training_file=f["id"])["id"] for _ in range(trials)]
    for j in jobs:
        server.wait_status(key, j, "queued")
    # The sweep runs once a second at a phase the test cannot see; a report TTL + 0.3 s after the
    # last heartbeat lands before it most of the time, so five trials catch a lease revived late
    # (the old behaviour) with probability > 0.99.
    caught_by_check = 0
    for i in range(trials):
        lease = w.lease(wait_s=5)
        assert lease and lease["job_id"] in jobs
        job, gen = lease["job_id"], lease["lease_generation"]
        t0 = time.time()
        hb = w.heartbeat(job, gen)
        assert hb.status_code == 200, hb.text  # alive: the heartbeat extends it
        time.sleep(max(0.0, t0 + TTL + 0.3 - time.time()))
        late = w.heartbeat(job, gen) if i % 2 == 0 else \
            w.events(job, gen, events=[{"level": "info", "message": "late"}])
        assert late.status_code == 409, late.text
        err = late.json()["error"]
        assert err["code"] == "lease_lost" and err["param"] == "lease_generation"
        assert job in err["message"]
        # Refused by the check itself ("expired"), or by the sweep when it ran first ("is queued").
        caught_by_check += "expired" in err["message"]
        # Requeued at that moment, with the reason in its events.
        assert server.get_job(key, job)["status"] == "queued"
        events = server.client(key).get(server.url(f"/v1/fine_tuning/jobs/{job}/events"),
                                        params={"limit": 100}).json()["data"]
        assert any("Lease expired" in e["message"] for e in events)
        assert not any(e["message"] == "late" for e in events)
        # The worker's later reports stay refused (the generation is no longer running).
        again = w.heartbeat(job, gen)
        assert again.status_code == 409 and again.json()["error"]["code"] == "lease_lost"
    assert caught_by_check >= 1  # the path this test is for was taken
    metrics = server.client(key).get(server.url("/metrics")).text
    line = [x for x in metrics.splitlines() if x.startswith("loranull_lease_expirations_total ")][0]
    assert int(float(line.split()[1])) == trials
