"""Job spec fields through the real server: data options reach the job object and the worker's
lease; bad values are a 400 naming the field; an accepted spec is never refused by the worker."""
from lnserver import TRAIN_JSONL, TestWorker


def test_data_options_reach_the_job_and_the_lease(steady_server):
    server = steady_server
    key, tok = server.create_key("proj-a"), server.create_token("w1")
    f = server.upload(key, TRAIN_JSONL)
    job = server.create_job(key, model="tiny-llama", training_file=f["id"], hyperparameters={"max_seq_len": 256},
                            data={"overlong": "reject", "chat_template": "llama3", "pack": True})
    assert job["data"] == {"overlong": "reject", "chat_template": "llama3", "pack": 256}
    plain = server.create_job(key, model="tiny-llama", training_file=f["id"])
    assert plain["data"] == {"overlong": "truncate", "chat_template": "auto", "pack": 0}
    server.wait_status(key, job["id"], "queued")
    w = TestWorker(server, tok)
    w.register()
    lease = w.lease(wait_s=5)
    assert lease["job_id"] == job["id"]
    assert lease["spec"]["data"] == {"overlong": "reject", "chat_template": "llama3", "pack": 256}
    assert server.get_job(key, job["id"])["data"]["pack"] == 256


def test_bad_data_options_and_learning_rate_name_the_field(steady_server):
    server = steady_server
    key = server.create_key("proj-a")
    f = server.upload(key, TRAIN_JSONL)
    api = server.client(key)
    cases = [({"data": {"overlong": "drop"}}, "data.overlong"),
             ({"data": {"chat_template": "chatml"}}, "data.chat_template"),
             ({"data": {"pack": -4}}, "data.pack"),
             ({"data": {"pack": "yes"}}, "data.pack"),
             ({"data": {"shuffle": True}}, "data.shuffle"),
             ({"data": "pack"}, "data"),
             # Was a 201, then the worker failed it with invalid_spec (multiplier 50000 > 1000).
             ({"hyperparameters": {"learning_rate": 10}}, "hyperparameters.learning_rate")]
    for extra, param in cases:
        r = api.post(server.url("/v1/fine_tuning/jobs"), json={"model": "tiny-llama", "training_file": f["id"], **extra})
        assert r.status_code == 400, (extra, r.text)
        err = r.json()["error"]
        assert err["param"] == param and param in err["message"], (extra, err)
    ok = api.post(server.url("/v1/fine_tuning/jobs"),
                  json={"model": "tiny-llama", "training_file": f["id"], "hyperparameters": {"learning_rate": 0.2}})
    assert ok.status_code == 201, ok.text
    assert ok.json()["hyperparameters"]["learning_rate"] == 0.2
