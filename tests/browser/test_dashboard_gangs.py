"""Gangs on the dashboard, against the real server: which worker holds which rank of a running job
(a real loranull-worker started with --ranks 2, and a gang spread over two test workers), why a queued
gang waits (the scheduler's reservation events), and the jobs list filtered by metadata and status
with the filters kept in the URL."""
import pathlib
import sys
import threading
import urllib.parse

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "e2e"))

from e2e_helpers import Worker, make_tiny_model, task_jsonl  # noqa: E402
from gang_helpers import form_gang  # noqa: E402  (tests/server, on sys.path by this folder's conftest)
from lnserver import TRAIN_JSONL, TestWorker  # noqa: E402


def worker_ranks(page, worker_id):
    """{job id: "0,1"} as the Workers page shows the worker's row."""
    return page.evaluate("""id => Object.fromEntries([...document.querySelectorAll(
        `#workers-table tr[data-worker-id="${id}"] .worker-jobs > div`)].map(d =>
        [d.dataset.jobId, d.querySelector('.ranks')?.dataset.ranks]))""", worker_id)


def placement_rows(page):
    return page.eval_on_selector_all("#placement-table tbody tr", "rs => rs.map(r => [Number(r.dataset.rank), "
                                     "r.dataset.workerId])")


def test_a_two_rank_job_on_a_ranks_2_worker_shows_both_ranks_there(dash_factory, real_worker_server, tmp_path):
    srv, key = real_worker_server, real_worker_server.create_key("gang-real")
    train = srv.upload(key, task_jsonl(), "task.jsonl")["id"]
    w = Worker(srv, srv.create_token("w"), make_tiny_model(tmp_path), tmp_path / "w", name="node-a",
               extra=("--ranks", "2")).start()
    dash = dash_factory(server=srv)
    try:
        # 1000 epochs: it runs until the test cancels it.
        job = srv.create_job(key, model="tiny-llama", training_file=train, seed=7,
                             hyperparameters={"n_epochs": 1000, "batch_size": 4, "learning_rate": 0.01},
                             adapter={"type": "lora", "rank": 4}, resources={"ranks": 2, "device": "cpu"})["id"]
        running = srv.wait_status(key, job, "running", timeout=60)
        placed = srv.get_job(key, job)["placement"]
        assert placed and placed["world_size"] == 2, (running, placed, w.log())
        wid = placed["ranks"][0]["worker_id"]
        page = dash.page
        dash.sign_in(key)
        dash.go(f"#/jobs/{job}")
        page.wait_for_selector("#placement-table tbody tr[data-rank='1']")
        assert placement_rows(page) == [[0, wid], [1, wid]]
        assert page.inner_text("#placement-summary").startswith("2 ranks on 1 worker")
        assert page.inner_text("#placement-table").count("node-a") == 2
        dash.shot("job-placement-one-worker")

        dash.go("#/workers")
        page.wait_for_selector(f"#workers-table tr[data-worker-id='{wid}'] .ranks")
        assert worker_ranks(page, wid) == {job: "0,1"}
        assert "ranks 0, 1 of 2" in page.inner_text(f"#workers-table tr[data-worker-id='{wid}']")
        dash.shot("workers-ranks")

        r = srv.client(key).post(srv.url(f"/v1/fine_tuning/jobs/{job}/cancel"), json={})
        assert r.status_code == 200, r.text
        page.wait_for_selector(f"#workers-table tr[data-worker-id='{wid}'] td:has-text('idle')")
        dash.go(f"#/jobs/{job}")
        page.wait_for_selector("#placement-none:has-text('no longer runs')")
    finally:
        w.stop()


def test_a_waiting_gang_shows_why_then_its_ranks_on_two_workers(dash, srv, project):
    model = "gang-wait-llama"  # only this test's workers hold it
    page = dash.page
    f = srv.upload(project, TRAIN_JSONL)
    tok = srv.create_token("gang-wait")
    a = TestWorker(srv, tok, "gw-a", models=(model,), devices=1)
    a.register()
    job = srv.create_job(project, model=model, training_file=f["id"], resources={"ranks": 2})["id"]
    srv.wait_status(project, job, "queued")
    dash.sign_in(project)
    dash.go(f"#/jobs/{job}")
    page.wait_for_selector("#wait-reason[data-reason=none]")

    # One live one-device worker: the gang cannot be placed, and nothing is held for it.
    assert a.lease(wait_s=0.5) is None
    page.wait_for_selector("#wait-reason[data-reason=capacity]")
    assert page.inner_text("#wait-reason").startswith("Cannot be placed yet")
    assert "have 1 device in all and the job needs 2" in page.inner_text("#wait-reason")
    dash.shot("job-waiting-capacity")

    # A second worker registers: two devices live, only a's free (b is not asking) — held for the gang.
    b = TestWorker(srv, tok, "gw-b", models=(model,), devices=1)
    b.register()
    assert a.lease(wait_s=0.5) is None
    page.wait_for_selector("#wait-reason[data-reason=holding]")
    assert page.inner_text("#wait-reason").startswith("Waiting for 2 devices at once")
    dash.shot("job-waiting-holding")

    # Both ask at once: the gang is leased, one rank on each worker.
    r0, r1, gen = form_gang(job, a, b)
    page.wait_for_selector("#placement-table tbody tr[data-rank='1']")
    assert placement_rows(page) == [[0, r0.worker_id], [1, r1.worker_id]]
    assert page.inner_text("#placement-summary").startswith("2 ranks on 2 workers")
    dash.shot("job-placement-two-workers")
    dash.go("#/workers")
    page.wait_for_selector(f"#workers-table tr[data-worker-id='{r1.worker_id}'] .ranks")
    assert worker_ranks(page, r0.worker_id) == {job: "0"}
    assert worker_ranks(page, r1.worker_id) == {job: "1"}
    assert r0.complete(job, gen, as_me=True).status_code == 200


def hash_params(page):
    frag = page.evaluate("location.hash")
    return urllib.parse.parse_qs(frag.split("?", 1)[1]) if "?" in frag else {}


def listed(page):
    return set(page.eval_on_selector_all("#jobs-table tbody tr[data-job-id]", "rs => rs.map(r => r.dataset.jobId)"))


def wait_listed(dash, ids):
    dash.wait_for("ids => { const got = [...document.querySelectorAll('#jobs-table tbody tr[data-job-id]')]"
                  ".map(r => r.dataset.jobId).sort(); return JSON.stringify(got) === JSON.stringify(ids); }",
                  sorted(ids))


def test_the_jobs_list_filters_by_metadata_and_status_and_keeps_the_filter_in_the_url(dash, srv, project):
    f = srv.upload(project, TRAIN_JSONL)
    make = lambda meta: srv.create_job(project, model="nobody-has-this-model", training_file=f["id"],  # noqa: E731
                                       metadata=meta)["id"]
    red, blue, red_b = make({"team": "red"}), make({"team": "blue"}), make({"team": "red", "run": "b"})
    for j in (red, blue, red_b):
        srv.wait_status(project, j, "queued")
    cancelled = srv.client(project).post(srv.url(f"/v1/fine_tuning/jobs/{red_b}/cancel"), json={})
    assert cancelled.status_code == 200
    page = dash.page
    dash.sign_in(project)
    wait_listed(dash, [red, blue, red_b])
    assert "team=red" in page.inner_text(f"tr[data-job-id='{red}']")

    page.fill("#metadata-filter", "team=red")
    page.press("#metadata-filter", "Enter")
    wait_listed(dash, [red, red_b])
    assert hash_params(page) == {"metadata[team]": ["red"]}
    dash.shot("jobs-metadata-filter")

    # The URL carries the filter: a reload (or a shared link) shows the same list.
    page.reload()
    page.wait_for_selector("#jobs-table")
    wait_listed(dash, [red, red_b])
    assert page.input_value("#metadata-filter") == "team=red"

    # The status filter adds to it.
    page.select_option("#status-filter", "queued")
    wait_listed(dash, [red])
    assert hash_params(page) == {"status": ["queued"], "metadata[team]": ["red"]}
    page.select_option("#status-filter", "")
    wait_listed(dash, [red, red_b])

    # Several pairs must all match; a pair that matches nothing says so.
    page.fill("#metadata-filter", "team=red & run=b")
    page.press("#metadata-filter", "Enter")
    wait_listed(dash, [red_b])
    page.fill("#metadata-filter", "team=green")
    page.press("#metadata-filter", "Enter")
    page.wait_for_selector("#jobs-table td:has-text('No jobs with metadata team=green.')")
    assert listed(page) == set()

    # A malformed filter is explained next to the box and not sent.
    page.fill("#metadata-filter", "team")
    page.press("#metadata-filter", "Enter")
    assert page.inner_text("#metadata-filter-error") == '"team" is not key=value.'
    assert hash_params(page) == {"metadata[team]": ["green"]}

    # Clearing it lists every job again.
    page.fill("#metadata-filter", "")
    page.press("#metadata-filter", "Enter")
    wait_listed(dash, [red, blue, red_b])
    assert hash_params(page) == {}
