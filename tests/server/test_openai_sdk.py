"""The OpenAI Python SDK, unchanged, against loranull-server (base_url pointed at it)."""
import io

import openai
import pytest

from lnserver import TRAIN_JSONL, TestWorker


def test_openai_sdk_fine_tuning_flow(steady_server):
    server = steady_server
    key = server.create_key("sdk")
    tok = server.create_token("w")
    client = openai.OpenAI(api_key=key, base_url=server.url("/v1"), max_retries=0)

    f = client.files.create(file=("train.jsonl", io.BytesIO(TRAIN_JSONL)), purpose="fine-tune")
    assert f.id.startswith("file-") and f.bytes == len(TRAIN_JSONL) and f.purpose == "fine-tune"
    assert client.files.retrieve(f.id).filename == "train.jsonl"
    assert client.files.content(f.id).read() == TRAIN_JSONL

    job = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=f.id, suffix="sdk", seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}},
        extra_body={"adapter": {"type": "lora_null_v1", "rank": 16}, "resources": {"ranks": 1}})
    assert job.id.startswith("ftjob-") and job.model == "tiny-llama" and job.seed == 7
    assert job.hyperparameters.n_epochs == 2
    got = client.fine_tuning.jobs.retrieve(job.id)
    assert got.id == job.id and got.training_file == f.id
    assert got.model_extra["adapter"]["rank"] == 16

    listed = client.fine_tuning.jobs.list(limit=10)
    assert [j.id for j in listed.data] == [job.id]

    # A worker runs it a little, so there are events to list.
    w = TestWorker(server, tok)
    w.register()
    lease = w.lease(wait_s=5)
    assert lease["job_id"] == job.id
    w.events(job.id, lease["lease_generation"], events=[{"message": "step 1/10 loss=1.5"}])
    events = client.fine_tuning.jobs.list_events(job.id, limit=50)
    messages = [e.message for e in events.data]
    assert "step 1/10 loss=1.5" in messages and messages[-1].startswith("Created fine-tuning job")

    fid = w.upload(job.id, lease["lease_generation"], "adapter.safetensors", b"x", kind="checkpoint").json()["id"]
    w.checkpoint(job.id, lease["lease_generation"], 5, [fid], {"train_loss": 1.25})
    ckpts = client.fine_tuning.jobs.checkpoints.list(job.id)
    assert ckpts.data[0].step_number == 5 and ckpts.data[0].metrics.train_loss == 1.25
    assert ckpts.data[0].fine_tuning_job_id == job.id
    assert "tiny-llama" in [m.id for m in client.models.list()]

    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"

    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-doesnotexist")
    with pytest.raises(openai.BadRequestError) as ei:
        client.fine_tuning.jobs.create(model="tiny-llama", training_file="file-missing")
    assert ei.value.code == "file_not_found" and ei.value.param == "training_file"
    bad = openai.OpenAI(api_key="sk-wrong", base_url=server.url("/v1"), max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.fine_tuning.jobs.list()
    deleted = client.files.delete(f.id)
    assert deleted.deleted is True


def test_openai_sdk_pagination_auto(server):
    key = server.create_key("sdk")
    client = openai.OpenAI(api_key=key, base_url=server.url("/v1"), max_retries=0)
    f = client.files.create(file=("t.jsonl", io.BytesIO(TRAIN_JSONL)), purpose="fine-tune")
    ids = [client.fine_tuning.jobs.create(model="m", training_file=f.id).id for _ in range(7)]
    # auto-pagination follows `after` with has_more
    assert [j.id for j in client.fine_tuning.jobs.list(limit=3)] == list(reversed(ids))
