"""The team dashboard in headless chromium against the real loranull-server.

Every test fails on a console error or an uncaught page error (conftest.Dash), except the ones it
declares (the browser's own log line for an expected 401/404). Screenshots of every page go to
tests/artifacts/browser/ (desktop light, phone dark)."""
import pathlib
import re
import threading
import time

import pytest

from lnserver import TRAIN_JSONL, TestWorker  # tests/server, put on sys.path by this folder's conftest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PHONE = {"width": 390, "height": 844}

# Jobs of this model are never leased: no worker holds it (they stay queued for list tests).
NOBODY = "nobody-has-this-model"


def api_job(srv, key, model=NOBODY, **extra):
    f = srv.upload(key, TRAIN_JSONL)
    return srv.create_job(key, model=model, training_file=f["id"], **extra)


def points(dash, chart_id):
    return int(dash.page.get_attribute(f"#{chart_id} .chart-box", "data-points"))


def wait_points(dash, chart_id, n):
    dash.wait_for("([id, n]) => Number(document.querySelector(`#${id} .chart-box`)?.dataset.points) === n",
                  [chart_id, n])
    assert points(dash, chart_id) == n


def wait_status(dash, status):
    dash.page.wait_for_selector(f"#job-status .badge[data-status={status}]")


def confirm(dash, button, yes=True):
    dash.page.click(button)
    dash.page.wait_for_selector("#confirm[open]")
    dash.page.click("#confirm-yes" if yes else "#confirm-no")
    dash.page.wait_for_selector("#confirm:not([open])", state="attached")


def test_wrong_key_is_refused_with_a_message(dash, srv):
    dash.allow(r"status of 401")  # chromium logs the refused sign-in call itself
    page = dash.open()
    page.click("#signin button[type=submit]")
    assert page.inner_text("#signin-error") == "Enter an API key."
    page.fill("#api-key", "sk-ln-notarealkeynotarealkeyxx")
    page.click("#signin button[type=submit]")
    page.wait_for_selector("#signin-error:has-text('refused')")
    assert "Incorrect" in page.inner_text("#signin-error")
    assert page.is_hidden("#nav")
    assert page.evaluate("sessionStorage.getItem('loranull.apiKey')") is None
    dash.shot("signin-refused")


def test_submit_watch_control_a_job(dash, srv, project, worker):
    page = dash.page
    worker.post(f"/workers/{worker.worker_id}/heartbeat", {})  # its models stay listed
    dash.sign_in(project)
    assert page.evaluate("sessionStorage.getItem('loranull.apiKey')") == project
    dash.shot("jobs-empty")

    # ---- submit through the form
    dash.go("#/new")
    page.wait_for_selector("#f-model option[value='tiny-llama']", state="attached")
    page.set_input_files("#f-training_file", {"name": "train.jsonl", "mimeType": "application/jsonl",
                                              "buffer": TRAIN_JSONL})
    page.select_option("#f-adapter-type", "lora_null_v2")
    page.fill("#f-adapter-rank", "4")
    page.fill("#f-hyperparameters-n_epochs", "2")
    page.fill("#f-suffix", "browser")
    dash.shot("new-job")
    page.click("#submit-job")
    page.wait_for_selector("#job-page")
    job_id = page.get_attribute("#job-page", "data-job-id")
    assert re.fullmatch(r"ftjob-[A-Za-z0-9_-]+", job_id)
    job = srv.get_job(project, job_id)
    assert job["model"] == "tiny-llama" and job["adapter"]["type"] == "lora_null_v2"
    assert job["adapter"]["rank"] == 4 and job["hyperparameters"]["n_epochs"] == 2
    assert job["user_provided_suffix"] == "browser"
    page.wait_for_selector("#job-spec td:has-text('4 / 4')")

    # ---- it appears in the list
    dash.go("#/jobs")
    page.wait_for_selector(f"#jobs-table tr[data-job-id='{job_id}']")
    dash.go(f"#/jobs/{job_id}")
    page.wait_for_selector("#live-state:has-text('live')")
    page.evaluate("window.__noReload = 1")  # gone if anything below reloaded the page

    # ---- a test worker leases it and reports as loranull-worker does; the page follows without reload
    lease = worker.lease(wait_s=8)
    assert lease and lease["job_id"] == job_id, lease
    gen = lease["lease_generation"]
    wait_status(dash, "running")

    def stage_is(name):
        page.wait_for_selector(f"#timeline li[data-stage={name}][data-state=active]")
        states = page.eval_on_selector_all("#timeline li", "ls => ls.map(l => l.dataset.state)")
        i = ["validating", "calibrating", "initialising", "training", "evaluating", "exporting"].index(name)
        assert states == ["done"] * i + ["active"] + ["pending"] * (5 - i), states

    def report(events=(), metrics=()):
        r = worker.events(job_id, gen, events=list(events), metrics=list(metrics))
        assert r.status_code == 200, r.text

    report([{"message": "Validating the data of " + job["training_file"]}])
    stage_is("validating")
    report([{"message": "Training data validated: 3 examples, 40 tokens (12 trained)"}])  # still validating
    report([{"message": "Calibrating on up to 3 samples", "data": {"stage": "calibrating"}, "type": "message"}])
    stage_is("calibrating")
    report([{"message": "Initialised the lora_null_v2 adapter (rank 4, alpha 4) in 0.01 s"}])
    stage_is("initialising")
    row = lambda s: {"loss": 3.0 - 0.2 * s, "lr": 1e-4 * s, "tokens_per_s": 1234.0, "elapsed_s": 0.5 * s}  # noqa: E731
    report([{"message": "Training: 10 steps of 8 examples (2 epochs, learning rate 0.0002)"}],
           [{"step": s, "values": row(s)} for s in (1, 2, 3)])
    stage_is("training")
    wait_points(dash, "chart-loss", 3)
    wait_points(dash, "chart-lr", 3)

    drift = {f"knowledge_drift/model.layers.{l}.{m}": 1e-4 * (l + 1) for l in (0, 1) for m in ("q_proj", "v_proj")}
    report(metrics=[{"step": 3, "values": drift}] + [{"step": s, "values": row(s)} for s in (4, 5, 6)] +
           [{"step": 5, "values": {"val_loss": 2.2}}, {"step": 6, "values": {k: 2 * v for k, v in drift.items()}}])
    wait_points(dash, "chart-loss", 7)  # 6 train + 1 validation
    dash.wait_for("() => document.querySelector('#chart-drift-layers .heatmap-box').dataset.steps === '2'")
    assert page.get_attribute("#chart-drift-layers .heatmap-box", "data-layers") == "4"
    wait_points(dash, "chart-drift", 2)  # the mean over layers, computed where none is posted

    # A step event (type metrics, as the worker's every few steps) arrives over the SSE stream itself
    # and gives the step count: progress 7/10. It stays out of the log unless asked for.
    report([{"type": "metrics", "message": "Step 7/10: training loss=1.5000",
             "data": {"step": 7, "train_loss": 1.5, "total_steps": 10}}])
    wait_points(dash, "chart-loss", 8)
    page.wait_for_selector("#job-overview .progress[data-progress='70']")
    assert page.locator("#events li:has-text('Step 7/10')").count() == 0
    page.check("#show-metric-events")
    page.wait_for_selector("#events li:has-text('Step 7/10')")
    # The same step as a metric point ("loss", while the event said "train_loss") is one point.
    report(metrics=[{"step": 7, "values": row(7)}])
    time.sleep(2.5)
    assert points(dash, "chart-loss") == 8

    # ---- checkpoint and artifact
    ck = worker.upload(job_id, gen, "state.safetensors", b"checkpoint-bytes", kind="checkpoint")
    assert ck.status_code == 201, ck.text
    assert worker.checkpoint(job_id, gen, 6, [ck.json()["id"]], {"train_loss": 1.8}).status_code == 201
    page.wait_for_selector("#checkpoints tr[data-step='6']")
    art = worker.upload(job_id, gen, "adapter_model.safetensors", b"adapter-bytes-123", kind="result")
    assert art.status_code == 201, art.text
    link = page.wait_for_selector("#artifacts a:has-text('adapter_model.safetensors')", timeout=10_000)
    with page.expect_download() as dl:
        link.click()
    assert open(dl.value.path(), "rb").read() == b"adapter-bytes-123"
    assert page.evaluate("window.__noReload") == 1
    dash.shot("job-running")
    # Switching the system to dark re-themes the open page, charts included.
    page.emulate_media(color_scheme="dark")
    dash.wait_for("() => getComputedStyle(document.body).backgroundColor === 'rgb(16, 19, 23)'")
    dash.shot("job-running-dark")
    page.emulate_media(color_scheme="light")

    report([{"message": "Training finished: 10 steps, last loss 1.1000"}])
    report([{"message": "After training: task loss 1.2000", "type": "metrics", "data": {"task_loss": 1.2}}])
    stage_is("evaluating")
    page.wait_for_selector("#events li:has-text('After training')")  # a summary, not a step row
    report([{"message": "Exported a PEFT adapter (rank 4, lora_alpha 4) for the original tiny-llama"}])
    stage_is("exporting")

    # The list reads the metric points and the step count from the events: 7 of 10 steps.
    dash.go("#/jobs")
    row_sel = f"#jobs-table tr[data-job-id='{job_id}']"
    page.wait_for_selector(f"{row_sel} .progress[data-progress='70']")
    assert page.inner_text(f"{row_sel} .badge") == "running"
    assert "1234" in page.inner_text(row_sel)  # tokens/s
    dash.shot("jobs")

    # ---- pause (declined, then confirmed), resume, cancel
    dash.go(f"#/jobs/{job_id}")
    wait_status(dash, "running")
    confirm(dash, "#btn-pause", yes=False)
    time.sleep(0.3)
    assert srv.get_job(project, job_id)["status"] == "running"
    confirm(dash, "#btn-pause")
    wait_status(dash, "paused")
    assert srv.get_job(project, job_id)["status"] == "paused"
    confirm(dash, "#btn-resume")
    wait_status(dash, "queued")
    confirm(dash, "#btn-cancel")
    wait_status(dash, "cancelled")
    assert srv.get_job(project, job_id)["status"] == "cancelled"
    page.wait_for_selector("#live-state:has-text('final')")
    assert page.is_disabled("#btn-cancel")
    page.wait_for_selector("#events li:has-text('Job cancelled')")
    assert page.evaluate("window.__noReload") == 1
    dash.shot("job-cancelled")


def test_api_validation_error_is_shown_next_to_its_field(dash, srv, project, worker):
    page = dash.page
    worker.post(f"/workers/{worker.worker_id}/heartbeat", {})
    dash.allow(r"status of 400")  # the refused create call, logged by chromium
    dash.sign_in(project)
    dash.go("#/new")
    page.wait_for_selector("#f-model option[value='tiny-llama']", state="attached")
    page.click("#submit-job")
    assert page.inner_text("[data-param=training_file] .error") == "Choose a training file."
    page.set_input_files("#f-training_file", {"name": "t.jsonl", "mimeType": "application/jsonl", "buffer": TRAIN_JSONL})
    page.fill("#f-adapter-rank", "0")
    page.click("#submit-job")
    err = page.wait_for_selector("[data-param='adapter.rank'] .error:not(:empty)")
    assert "adapter.rank" in err.inner_text()
    assert "invalid" in page.get_attribute("[data-param='adapter.rank']", "class")
    assert page.inner_text("[data-param=training_file] .error") == ""
    dash.shot("new-job-error")
    # Fixed and resubmitted: the uploaded file is reused, the job is created.
    page.fill("#f-adapter-rank", "2")
    page.fill("#f-hyperparameters-learning_rate", "fast")
    page.click("#submit-job")
    err = page.wait_for_selector("[data-param='hyperparameters.learning_rate'] .error:not(:empty)")
    assert "learning_rate" in err.inner_text()
    assert page.inner_text("[data-param='adapter.rank'] .error") == ""
    page.fill("#f-hyperparameters-learning_rate", "1e-4")
    page.click("#submit-job")
    page.wait_for_selector("#job-page")
    files = srv.client(project).get(srv.url("/v1/files")).json()["data"]
    assert len(files) == 1, "the training file was uploaded again"


def test_another_projects_job_is_not_visible(dash, srv, project):
    other = srv.create_key(f"other-{time.monotonic_ns() % 100000}")
    theirs = api_job(srv, other)
    mine = api_job(srv, project)
    dash.allow(r"status of 404")  # chromium logs the refused GET of their job
    # A deep link opened before signing in leads to its page after.
    page = dash.open(f"#/jobs/{mine['id']}")
    page.fill("#api-key", project)
    page.click("#signin button[type=submit]")
    page.wait_for_selector(f"#job-page[data-job-id='{mine['id']}'] #job-overview tr")
    dash.go("#/jobs")
    page.wait_for_selector(f"#jobs-table tr[data-job-id='{mine['id']}']")
    assert page.query_selector(f"#jobs-table tr[data-job-id='{theirs['id']}']") is None
    assert theirs["id"] not in page.inner_text("#jobs-table")
    dash.go(f"#/jobs/{theirs['id']}")
    page.wait_for_selector("#job-missing")
    assert "another project" in page.inner_text("#job-missing")


def test_jobs_list_filter_paging_and_live_updates(dash, srv, project):
    jobs = [api_job(srv, project) for _ in range(5)]
    api = srv.client(project)
    for j in jobs[1:3]:
        assert api.post(srv.url(f"/v1/fine_tuning/jobs/{j['id']}/cancel")).status_code == 200
    newest_first = [j["id"] for j in reversed(jobs)]
    dash.sign_in(project)
    page = dash.page
    dash.go("#/jobs?limit=2")

    def rows():
        return page.eval_on_selector_all("#jobs-table tr[data-job-id]", "rs => rs.map(r => r.dataset.jobId)")

    def wait_rows(ids):
        dash.wait_for("ids => JSON.stringify([...document.querySelectorAll('#jobs-table tr[data-job-id]')]"
                      ".map(r => r.dataset.jobId)) === JSON.stringify(ids)", ids)
        assert rows() == ids

    wait_rows(newest_first[:2])
    assert page.is_disabled("#page-newer")
    page.click("#page-older")
    wait_rows(newest_first[2:4])
    page.click("#page-older")
    wait_rows(newest_first[4:])
    assert page.is_disabled("#page-older")
    page.click("#page-newer")
    wait_rows(newest_first[2:4])

    page.select_option("#status-filter", "cancelled")
    wait_rows([jobs[2]["id"], jobs[1]["id"]])
    assert page.eval_on_selector_all("#jobs-table .badge", "bs => bs.map(b => b.dataset.status)") == ["cancelled"] * 2
    assert "status=cancelled" in page.url

    # A job created elsewhere shows up on the first page without a reload.
    page.select_option("#status-filter", "")
    page.evaluate("window.__noReload = 1")
    new = api_job(srv, project)
    dash.wait_for("id => document.querySelector('#jobs-table tbody tr')?.dataset.jobId === id", new["id"], timeout=8000)
    assert page.evaluate("window.__noReload") == 1


def test_workers_page_shows_alive_and_lost_workers(dash_factory, server_factory):
    srv = server_factory("--worker-timeout-s", "1")
    dash = dash_factory(server=srv)
    key = srv.create_key("workers-view")
    tok = srv.create_token("w")
    gone = TestWorker(srv, tok, name="gone-worker", models=("m-old",), devices=1)
    gone.register()
    live = TestWorker(srv, tok, name="gpu-box", models=("llama-a", "llama-b"), devices=8, kind="cuda")
    live.register()
    shared = TestWorker(srv, tok, name="shared-box", models=("llama-x",), devices=1)
    shared.register()
    stop = threading.Event()

    def beat():  # two workers heartbeat; the third falls silent and is lost after 1 s
        while not stop.wait(0.25):
            for w in (live, shared):
                w.post(f"/workers/{w.worker_id}/heartbeat", {})

    t = threading.Thread(target=beat, daemon=True)
    t.start()
    try:
        job = api_job(srv, key, model="llama-a")
        srv.wait_status(key, job["id"], "queued")
        lease = live.lease(wait_s=5)
        assert lease["job_id"] == job["id"]
        other = srv.create_key("workers-other")
        theirs = api_job(srv, other, model="llama-x")
        srv.wait_status(other, theirs["id"], "queued")
        assert shared.lease(wait_s=5)["job_id"] == theirs["id"]
        # Workers are shared; their jobs are named only to the job's own project.
        seen_by = {k: {w["name"]: w for w in srv.client(k).get(srv.url("/v1/workers")).json()["data"]}
                   for k in (key, other)}
        assert seen_by[key]["shared-box"]["current_jobs"] == [] and seen_by[key]["shared-box"]["busy"] is True
        assert seen_by[other]["shared-box"]["current_jobs"] == [theirs["id"]]
        assert seen_by[other]["gpu-box"]["current_jobs"] == [] and seen_by[other]["gpu-box"]["busy"] is True
        assert seen_by[key]["gone-worker"]["busy"] is False
        dash.sign_in(key)
        dash.go("#/workers")
        page = dash.page
        row = f"#workers-table tr[data-worker-id='{live.worker_id}']"
        page.wait_for_selector(f"{row} .badge[data-status=alive]")
        page.wait_for_selector(f"#workers-table tr[data-worker-id='{gone.worker_id}'] .badge[data-status=lost]",
                               timeout=8000)
        text = page.inner_text(row)
        assert "8 × cuda" in text and "llama-a, llama-b" in text and "1.0 GiB" in text
        assert job["id"] in text
        shared_row = page.inner_text(f"#workers-table tr[data-worker-id='{shared.worker_id}']")
        assert "busy (another project)" in shared_row and theirs["id"] not in page.inner_text("#workers-table")
        assert page.inner_text("#workers-summary") == "2 alive · 1 lost"
        dash.shot("workers")
    finally:
        stop.set()
        t.join()


@pytest.mark.parametrize("scheme", ["dark"])
def test_every_page_fits_a_phone_in_dark_mode(dash_factory, srv, project, worker, scheme):
    dash = dash_factory(viewport=PHONE, color_scheme=scheme)
    worker.post(f"/workers/{worker.worker_id}/heartbeat", {})
    job = api_job(srv, project)
    page = dash.open()
    page.wait_for_selector("#signin")
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(16, 19, 23)"
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    dash.shot(f"signin-phone-{scheme}")
    dash.sign_in(project)
    pages = {"jobs": ("#/jobs", "#jobs-table tr[data-job-id]"),
             "job": (f"#/jobs/{job['id']}", "#job-overview tr"),
             "new-job": ("#/new", "#f-model option[value='tiny-llama']"),
             "workers": ("#/workers", "#workers-table tr[data-worker-id]")}
    for name, (hash_, ready) in pages.items():
        dash.go(hash_)
        page.wait_for_selector(ready, state="attached")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"], f"{name} is {width}px wide on a {PHONE['width']}px phone"
        dash.shot(f"{name}-phone-{scheme}")


def test_pages_serve_and_chartjs_comes_from_the_debian_package(srv):
    import requests

    index = requests.get(srv.url("/"))
    assert index.status_code == 200 and '<script src="/vendor/chart.js">' in index.text
    chart = requests.get(srv.url("/vendor/chart.js"))
    assert chart.status_code == 200 and "Chart.js v" in chart.text[:200]
    for path in ("/static/app.css", "/static/js/app.js", "/static/js/job.js"):
        assert requests.get(srv.url(path)).status_code == 200, path
    # Nothing the pages load comes from outside the server, and no copy of Chart.js is committed.
    for asset in re.findall(r'(?:src|href)="([^"]+)"', index.text):
        assert asset.startswith(("/", "#")), asset
    for f in (ROOT / "server" / "static").rglob("*"):
        if f.is_file():
            text = re.sub(r'xmlns="[^"]*"', "", f.read_text(errors="ignore"))  # a namespace, not a fetch
            assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text), f"{f} refers to another host"
            assert "Chart.js v" not in text, f



def test_event_stream_resumes_after_a_server_restart(dash_factory, server_factory):
    srv = server_factory()
    dash = dash_factory(server=srv)
    dash.allow(r"net::ERR_")  # chromium logs the polls that hit the stopped server
    key = srv.create_key("restart")
    w = TestWorker(srv, srv.create_token("w"), models=("m",))
    w.register()
    job = api_job(srv, key, model="m")
    srv.wait_status(key, job["id"], "queued")
    gen = w.lease(wait_s=5)["lease_generation"]
    dash.sign_in(key)
    dash.go(f"#/jobs/{job['id']}")
    page = dash.page
    page.wait_for_selector("#live-state:has-text('live')")
    page.evaluate("window.__noReload = 1")
    assert w.events(job["id"], gen, events=[{"message": "before the restart"}]).status_code == 200
    page.wait_for_selector("#events li:has-text('before the restart')")
    srv.restart()
    assert w.events(job["id"], gen, events=[{"message": "after the restart"}]).status_code == 200
    page.wait_for_selector("#events li:has-text('after the restart')", timeout=15_000)
    page.wait_for_selector("#live-state:has-text('live')")
    # Resumed from Last-Event-ID: nothing seen twice.
    ids = page.eval_on_selector_all("#events li[data-event-id]", "ls => ls.map(l => l.dataset.eventId)")
    assert len(ids) == len(set(ids)), ids
    assert page.locator("#events li:has-text('before the restart')").count() == 1
    assert page.evaluate("window.__noReload") == 1


def test_a_revoked_key_signs_the_tab_out_with_a_message(dash, srv, project):
    dash.allow(r"status of 401")
    dash.sign_in(project)
    srv.revoke_key(project)
    dash.page.wait_for_selector("#signin-error:has-text('no longer accepted')", timeout=8000)
    assert dash.page.evaluate("sessionStorage.getItem('loranull.apiKey')") is None


def test_the_console_check_catches_errors(dash_factory):
    """The guard every other test relies on: a console error is caught (then cleared here)."""
    d = dash_factory()
    d.open()
    d.page.evaluate("console.error('deliberate')")
    d.page.evaluate("setTimeout(() => { throw new Error('uncaught'); }, 0)")
    d.page.wait_for_timeout(200)
    found = d.unexpected_errors()
    assert any("deliberate" in e for e in found) and any("uncaught" in e for e in found), found
    d.errors.clear()


def test_failed_jobs_show_the_failed_stage_and_the_error(dash, srv, project):
    # A training file the server refuses: the job fails while validating, with the line at fault.
    bad = srv.upload(project, b'{"text": "ok"}\n{"prompt": 1}\n', "broken.jsonl")
    early = srv.create_job(project, model=NOBODY, training_file=bad["id"])
    srv.wait_status(project, early["id"], "failed")
    # A job a worker fails while calibrating.
    w = TestWorker(srv, srv.create_token("failing"), name="failing", models=("fail-model",))
    w.register()
    late = api_job(srv, project, model="fail-model")
    srv.wait_status(project, late["id"], "queued")
    gen = w.lease(wait_s=5)["lease_generation"]
    assert w.events(late["id"], gen, events=[{"message": "Calibrating on up to 8 samples"}]).status_code == 200
    assert w.fail(late["id"], gen, "out_of_memory", "calibration needs 3 GiB, 1 GiB free").status_code == 200

    dash.sign_in(project)
    page = dash.page
    dash.go(f"#/jobs/{early['id']}")
    wait_status(dash, "failed")
    assert page.eval_on_selector_all("#timeline li", "ls => ls.map(l => l.dataset.state)") == \
        ["failed"] + ["pending"] * 5
    page.wait_for_selector("#job-overview td:has-text('line 2')")
    assert page.inner_text("#job-overview tr:has(th:text-is('Attempts')) td") == "0"
    dash.shot("job-failed-validation")

    dash.go(f"#/jobs/{late['id']}")
    wait_status(dash, "failed")
    page.wait_for_selector("#timeline li[data-stage=calibrating][data-state=failed]")
    assert page.get_attribute("#timeline li[data-stage=validating]", "data-state") == "done"
    assert "out_of_memory: calibration needs 3 GiB" in page.inner_text("#job-overview")
    assert page.is_disabled("#btn-cancel") and page.is_disabled("#btn-pause")
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280

    # Stages a worker never announced before a later one count as skipped, not done.
    third = api_job(srv, project, model="fail-model")
    srv.wait_status(project, third["id"], "queued")
    gen = w.lease(wait_s=5)["lease_generation"]
    w.events(third["id"], gen, events=[{"message": "Validating the data of x"},
                                       {"message": "Training: 3 steps of 8 examples"}])
    w.fail(third["id"], gen, "nan_loss", "the loss became NaN at step 2")
    dash.go(f"#/jobs/{third['id']}")
    wait_status(dash, "failed")
    dash.wait_for("() => document.querySelector('#timeline li[data-stage=training]').dataset.state === 'failed'")
    assert page.eval_on_selector_all("#timeline li", "ls => ls.map(l => l.dataset.state)") == \
        ["done", "skipped", "skipped", "failed", "pending", "pending"]
