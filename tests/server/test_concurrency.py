"""Many suspended connections at once: 300 SSE streams and waiting workers all get the event, and
SIGTERM with all of them open still stops cleanly and quickly (exit 0)."""
import socket
import threading
import time

from lnserver import TRAIN_JSONL, TestWorker

STREAMS = 300


def open_stream(port, key, job_id):
    s = socket.create_connection(("127.0.0.1", port), timeout=15)
    s.sendall((f"GET /v1/fine_tuning/jobs/{job_id}/events?stream=true HTTP/1.1\r\nHost: x\r\n"
               f"Authorization: Bearer {key}\r\n\r\n").encode())
    return s


def read_until(s, needle, timeout=15):
    s.settimeout(timeout)
    data = b""
    deadline = time.time() + timeout
    while needle not in data and time.time() < deadline:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_many_streams_and_waiters_then_sigterm(steady_server):
    server = steady_server
    key = server.create_key("p")
    tok = server.create_token("w")
    f = server.upload(key, TRAIN_JSONL)
    job = server.create_job(key, model="tiny-llama", training_file=f["id"])
    server.wait_status(key, job["id"], "queued")
    w = TestWorker(server, tok)
    w.register()
    lease = w.lease()
    socks = [open_stream(server.port, key, job["id"]) for _ in range(STREAMS)]
    for s in socks:
        assert b"retry:" in read_until(s, b"retry:")
    # Workers long-polling with nothing to do (suspended as well).
    idle = [TestWorker(server, tok, f"idle{i}", models=("other",)) for i in range(5)]
    for iw in idle:
        iw.register()
    waits = [threading.Thread(target=iw.lease, kwargs={"wait_s": 30}) for iw in idle]
    for t in waits:
        t.start()
    time.sleep(0.3)
    metrics = server.client(key).get(server.url("/metrics")).text
    assert f"loranull_sse_streams {STREAMS}" in metrics
    t0 = time.time()
    w.events(job["id"], lease["lease_generation"], events=[{"message": "fan-out"}])
    got = [b"fan-out" in read_until(s, b"fan-out", timeout=10) for s in socks]
    assert all(got), f"{got.count(False)} of {STREAMS} streams missed the event"
    fan_out_s = time.time() - t0
    # SIGTERM with 300 streams and 5 long-polls suspended: clean exit, promptly.
    t0 = time.time()
    assert server.stop(timeout=20) == 0
    stop_s = time.time() - t0
    for t in waits:
        t.join(10)
    for s in socks:
        s.close()
    assert stop_s < 10, f"stopping took {stop_s:.1f}s"
    print(f"fan-out to {STREAMS} streams: {fan_out_s * 1e3:.0f} ms; stop: {stop_s * 1e3:.0f} ms")
