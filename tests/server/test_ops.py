"""Operations: health, readiness, Prometheus metrics, request ids and JSON logs, static files and
Chart.js, graceful SIGTERM, restart keeps state; the scheduler is not blocked by unrunnable jobs."""
import json
import pathlib
import re

import requests

from lnserver import TRAIN_JSONL, TestWorker


def test_health_ready_metrics_and_logs(server):
    assert requests.get(server.url("/healthz")).json() == {"status": "ok"}
    assert requests.get(server.url("/readyz")).status_code == 200
    key = server.create_key("p")
    f = server.upload(key, TRAIN_JSONL)
    server.create_job(key, model="m", training_file=f["id"])
    r = server.client(key).get(server.url("/v1/fine_tuning/jobs"), headers={"X-Request-Id": "trace-123"})
    assert r.headers["X-Request-Id"] == "trace-123"
    assert re.fullmatch(r"req_[A-Za-z0-9]{24}", requests.get(server.url("/healthz")).headers["X-Request-Id"])
    text = requests.get(server.url("/metrics")).text
    # Prometheus text format: each sample line is `name{labels} value`
    for line in text.splitlines():
        if line and not line.startswith("#"):
            assert re.fullmatch(r'[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? [0-9.e+-]+', line), line
    assert 'loranull_jobs{status="validating_files"}' in text or 'loranull_jobs{status="queued"} 1' in text
    assert "loranull_queue_depth" in text and "loranull_workers_alive 0" in text
    assert "loranull_jobs_created_total 1" in text and "loranull_leases_granted_total 0" in text
    assert 'loranull_http_requests_total{route="jobs_list",code="2xx"} 1' in text
    assert 'loranull_http_request_duration_seconds_bucket{route="jobs_list",le="+Inf"} 1' in text
    # One JSON object per log line, with the request id.
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert any(entry.get("request_id") == "trace-123" and entry.get("status") == 200 for entry in lines)


def test_static_dashboard_and_chartjs(server_factory, tmp_path):
    static = tmp_path / "static"
    (static / "js").mkdir(parents=True)
    (static / "index.html").write_text("<!doctype html><title>loranull</title>")
    (static / "js" / "app.js").write_text("console.log(1)")
    (tmp_path / "secret.txt").write_text("secret")
    (static / "link").symlink_to(tmp_path / "secret.txt")
    srv = server_factory("--static-dir", str(static))
    r = requests.get(srv.url("/"))
    assert r.status_code == 200 and "loranull" in r.text and r.headers["Content-Type"].startswith("text/html")
    r = requests.get(srv.url("/static/js/app.js"))
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/javascript")
    assert requests.get(srv.url("/static/link")).status_code == 404  # a symlink out of the dir
    assert requests.get(srv.url("/static/missing.js")).status_code == 404
    chart = requests.get(srv.url("/vendor/chart.js"))
    if pathlib.Path("/usr/share/javascript/chart.js").exists():
        assert chart.status_code == 200 and "Chart" in chart.text[:5000]
    else:
        assert chart.status_code == 404


def test_restart_keeps_everything_and_sigterm_is_clean(steady_server):
    server = steady_server
    key = server.create_key("p")
    tok = server.create_token("w")
    f = server.upload(key, TRAIN_JSONL)
    job = server.create_job(key, model="tiny-llama", training_file=f["id"])
    server.wait_status(key, job["id"], "queued")
    w = TestWorker(server, tok)
    w.register()
    lease = w.lease()
    w.events(job["id"], lease["lease_generation"], events=[{"message": "before restart"}])
    assert server.stop() == 0  # SIGTERM: graceful, exit code 0
    server.launch()
    j = server.get_job(key, job["id"])
    assert j["status"] == "running"
    ev = server.client(key).get(server.url(f"/v1/fine_tuning/jobs/{job['id']}/events")).json()["data"]
    assert any(e["message"] == "before restart" for e in ev)
    # The lease survived too: the worker carries on.
    assert w.complete(job["id"], lease["lease_generation"]).status_code == 200


def test_unrunnable_jobs_do_not_block_the_queue(steady_server):
    server = steady_server
    key = server.create_key("p")
    tok = server.create_token("w")
    f = server.upload(key, TRAIN_JSONL)
    for _ in range(120):
        server.create_job(key, model="nobody-has-this", training_file=f["id"])
    job = server.create_job(key, model="tiny-llama", training_file=f["id"])
    server.wait_status(key, job["id"], "queued")
    w = TestWorker(server, tok)
    w.register()
    lease = w.lease(wait_s=5)
    assert lease and lease["job_id"] == job["id"]
