"""Holds N concurrent SSE streams of one running job and measures the delay from an event being
posted (internal API) to its arrival on every stream. Used by bench_server.sh; prints one JSON line.

usage: sse_bench.py BASE_URL API_KEY WORKER_TOKEN [--streams 1000] [--events 20]"""
import argparse
import asyncio
import json
import statistics
import time
import urllib.request


def http(base, method, path, token, body=None):
    req = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def setup(base, key, tok):
    boundary = "b0undary"
    payload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
               f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"t.jsonl\"\r\n"
               f"Content-Type: application/octet-stream\r\n\r\n{{\"text\":\"x\"}}\n\r\n--{boundary}--\r\n").encode()
    req = urllib.request.Request(base + "/v1/files", data=payload, method="POST", headers={
        "Authorization": f"Bearer {key}", "Content-Type": f"multipart/form-data; boundary={boundary}"})
    f = json.loads(urllib.request.urlopen(req).read())
    job = http(base, "POST", "/v1/fine_tuning/jobs", key, {"model": "bench-model", "training_file": f["id"]})
    w = http(base, "POST", "/internal/v1/workers/register", tok,
             {"name": "bench", "device_kind": "cpu", "devices": 1, "models": ["bench-model"]})
    for _ in range(100):
        lease = http(base, "POST", "/internal/v1/lease", tok, {"worker_id": w["worker_id"], "wait_s": 5})
        if lease:
            return job["id"], lease["lease_generation"]
    raise SystemExit("no lease")


async def stream(host, port, path, key, arrivals, ready, idx):
    reader, writer = await asyncio.open_connection(host, port)
    writer.write((f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                  "Accept: text/event-stream\r\n\r\n").encode())
    await writer.drain()
    first = True
    while True:
        line = await reader.readline()
        if not line:
            break
        if first and line.startswith(b"retry:"):
            first = False
            ready.release()
        if line.startswith(b"data: {"):
            # Chunked framing may split lines only at chunk borders; events are small, so one line = one event.
            try:
                ev = json.loads(line[6:])
            except ValueError:
                continue
            msg = ev.get("message", "")
            if msg.startswith("bench "):
                arrivals.setdefault(msg, []).append(time.time())
        elif line.startswith(b"data: [DONE]"):
            break
    writer.close()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("key")
    ap.add_argument("token")
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--events", type=int, default=20)
    a = ap.parse_args()
    host, port = a.base.split("//")[1].split(":")
    job, gen = setup(a.base, a.key, a.token)
    path = f"/v1/fine_tuning/jobs/{job}/events?stream=true"
    arrivals, ready = {}, asyncio.Semaphore(0)
    t0 = time.time()
    tasks = [asyncio.create_task(stream(host, int(port), path, a.key, arrivals, ready, i)) for i in range(a.streams)]
    for _ in range(a.streams):
        await asyncio.wait_for(ready.acquire(), 60)
    t_open = time.time() - t0
    sent = {}
    loop = asyncio.get_running_loop()
    for i in range(a.events):
        msg = f"bench {i}"
        sent[msg] = time.time()
        await loop.run_in_executor(None, http, a.base, "POST", f"/internal/v1/jobs/{job}/events", a.token,
                                   {"lease_generation": gen, "events": [{"message": msg}]})
        await asyncio.sleep(0.25)
    await asyncio.sleep(2)
    delays = [t - sent[m] for m, ts in arrivals.items() for t in ts]
    received = sum(len(ts) for ts in arrivals.values())
    await loop.run_in_executor(None, http, a.base, "POST", f"/internal/v1/jobs/{job}/complete", a.token,
                               {"lease_generation": gen})
    await asyncio.wait(tasks, timeout=30)
    delays.sort()
    print(json.dumps({"streams": a.streams, "open_all_s": round(t_open, 3), "events_posted": a.events,
                      "deliveries_expected": a.streams * a.events, "deliveries": received,
                      "delay_p50_ms": round(1e3 * statistics.median(delays), 2) if delays else None,
                      "delay_p99_ms": round(1e3 * delays[int(0.99 * (len(delays) - 1))], 2) if delays else None,
                      "delay_max_ms": round(1e3 * delays[-1], 2) if delays else None}))


asyncio.run(main())
