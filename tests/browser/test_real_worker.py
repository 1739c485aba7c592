"""The dashboard with a real loranull-worker training a tiny model (tests/e2e's helpers): the job is
submitted through the form with validation and calibration files, and the page shows what the real
worker reports — every stage, the loss and validation-loss curves, learning rate, knowledge drift
for every adapted layer, and the exported adapter as a download."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "e2e"))

from e2e_helpers import Worker, facts_jsonl, make_tiny_model, task_jsonl  # noqa: E402

STAGES = ["validating", "calibrating", "initialising", "training", "evaluating", "exporting"]


def test_a_real_worker_job_end_to_end(dash_factory, real_worker_server, tmp_path):
    srv = real_worker_server
    dash = dash_factory(server=srv)
    key = srv.create_key("real-worker")
    facts = srv.upload(key, facts_jsonl(), "facts.jsonl")["id"]
    valid = srv.upload(key, task_jsonl(12), "valid.jsonl")["id"]
    models = make_tiny_model(tmp_path)
    w = Worker(srv, srv.create_token("w"), models, tmp_path / "w1")
    try:
        page = dash.page
        dash.sign_in(key)
        dash.go("#/new")
        page.wait_for_selector("#f-model option:text('no live worker holds a model')", state="attached")
        w.start()  # the open form picks up the model of a worker that starts now
        page.wait_for_selector("#f-model option[value='tiny-llama']", state="attached", timeout=20_000)
        page.set_input_files("#f-training_file", {"name": "task.jsonl", "mimeType": "application/jsonl",
                                                  "buffer": task_jsonl()})
        page.select_option("[data-param=validation_file] select", valid)
        page.select_option("[data-param='adapter.calibration.file'] select", facts)
        page.select_option("#f-adapter-type", "lora_null_v2")
        for field, value in {"adapter-rank": "4", "adapter-calibration-samples": "32",
                             "adapter-calibration-max_length": "64", "hyperparameters-n_epochs": "3",
                             "hyperparameters-batch_size": "4", "hyperparameters-learning_rate": "0.01",
                             "hyperparameters-eval_interval": "12", "seed": "7"}.items():
            page.fill(f"#f-{field}", value)
        page.click("#submit-job")
        page.wait_for_selector("#job-page")
        job_id = page.get_attribute("#job-page", "data-job-id")

        page.wait_for_selector("#job-status .badge[data-status=succeeded]", timeout=90_000)
        job = srv.get_job(key, job_id)
        assert job["status"] == "succeeded", (job, w.log())
        page.wait_for_selector("#live-state:has-text('final')")
        assert page.eval_on_selector_all("#timeline li", "ls => ls.map(l => l.dataset.state)") == ["done"] * 6

        # Every stage was reported by the worker in its own words and recognised by the page.
        seen = page.evaluate("""() => [...document.querySelectorAll('#timeline li .when')]
                                      .map(w => w.textContent !== '')""")
        assert seen == [True] * 6, seen

        steps = 36  # ceil(48 / 4) batches × 3 epochs
        dash.wait_for("n => Number(document.querySelector('#chart-loss .chart-box').dataset.points) >= n", steps + 3)
        loss = page.evaluate("""() => { const c = Chart.getChart(document.querySelector('#chart-loss canvas'));
                                        return c.data.datasets.map(d => d.data.map(p => p.y)); }""")
        train, val = loss
        assert len(train) == steps and len(val) == 3, (len(train), len(val))  # eval at 12, 24, 36
        assert train[-1] < train[0], "the task loss did not go down"
        assert int(page.get_attribute("#chart-lr .chart-box", "data-points")) == steps
        layers = int(page.get_attribute("#chart-drift-layers .heatmap-box", "data-layers"))
        assert layers == 2 * 7, layers  # 2 layers × q,k,v,o,gate,up,down
        mean, top = page.evaluate("""() => Chart.getChart(document.querySelector('#chart-drift canvas'))
                                           .data.datasets.map(d => d.data.map(p => p.y))""")
        assert len(mean) == len(top) >= 1 and all(m <= t for m, t in zip(mean, top)), (mean, top)
        page.wait_for_selector("#job-overview .progress[data-progress='100']")
        # The worker's checkpoints carry no metrics: the table shows the training loss of their step.
        # The table is re-read once per burst of events, so the last rows can land after progress 100.
        page.wait_for_selector("#checkpoints tbody tr[data-step]")
        ck_loss = page.eval_on_selector_all("#checkpoints tbody tr[data-step]", "rs => rs.map(r => r.cells[2].textContent)")
        assert ck_loss and all(x not in ("", "—") for x in ck_loss), ck_loss

        link = page.wait_for_selector("#artifacts a:has-text('adapter_model.safetensors')")
        with page.expect_download() as dl:
            link.click()
        data = open(dl.value.path(), "rb").read()
        header_len = int.from_bytes(data[:8], "little")
        assert b"lora_A" in data[8:8 + header_len]  # a safetensors adapter, byte for byte what the API serves
        dash.shot("job-real-worker")
        dash.go("#/workers")
        page.wait_for_selector("#workers-table .badge[data-status=alive]")
        dash.shot("workers-real")
    finally:
        w.stop()
