"""A job from upload to a downloaded adapter through the real server and a real worker process."""
import json

import numpy as np
import pytest
from e2e_helpers import events, metrics, result_files, run_cli, save_files, submit, upload, MODEL_NAME


def peft_logits(model_dir, adapter_dir, ids):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base = transformers.LlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def our_logits(tmp_path, model_dir, adapter_dir, ids):
    from safetensors.numpy import load_file
    inp = tmp_path / "ids.json"
    inp.write_text(json.dumps([ids]))
    out = tmp_path / "logits.safetensors"
    run_cli("forward", "--model", model_dir, "--adapter", adapter_dir, "--input-ids", inp, "--out", out)
    t = load_file(str(out))
    return next(iter(t.values())).reshape(-1, 300)[: len(ids)]


@pytest.mark.parametrize("method", ["lora_null_v2", "lora"])
def test_job_from_upload_to_peft_adapter(env, method, tmp_path):
    w = env.worker()
    job = submit(env.srv, env.key, env.train_id, method=method,
                 calibration=env.facts_id if method == "lora_null_v2" else None)
    done = env.srv.wait_status(env.key, job["id"], {"succeeded", "failed"}, timeout=120)
    assert done["status"] == "succeeded", (done["error"], w.log())
    assert done["fine_tuned_model"].startswith(f"ft:{MODEL_NAME}:")
    assert done["trained_tokens"] > 0
    files = result_files(env.srv, env.key, done)
    assert {"adapter_config.json", "adapter_model.safetensors", "eval_summary.json"} <= set(files)
    cfg = json.loads(files["adapter_config.json"])
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    summary = json.loads(files["eval_summary.json"])
    assert summary["method"] == method and summary["steps"] == 24
    # The task was learnt: the loss on it went down.
    assert summary["after"]["task_loss"] < summary["before"]["task_loss"] - 0.05, summary
    if method == "lora_null_v2":
        # Knowledge kept: drift is measured, tiny, and the loss on the facts barely moves.
        assert summary["knowledge_drift"]["max"] < 1e-3, summary
        assert abs(summary["after"]["knowledge_loss"] - summary["before"]["knowledge_loss"]) < 0.05, summary
    # Every step's training loss reached the server, and the stages were announced as events.
    m = metrics(env.srv, env.key, job["id"])
    assert sorted(m["loss"]) == list(range(1, 25))
    assert set(m["eval/task_loss"]) == {0, 24}
    # Reports went in batches: at most 4 posts in any second.
    posts = [json.loads(x)["ts"] for x in env.srv.log_path.read_text().splitlines()
             if '"route":"/internal/v1/jobs/{}/events"' in x]
    secs = [int(t[11:13]) * 3600 + int(t[14:16]) * 60 + float(t[17:23]) for t in posts]
    assert secs and max(sum(1 for u in secs if t <= u < t + 1) for t in secs) <= 4, secs
    msgs = [e["message"] for e in events(env.srv, env.key, job["id"])]
    for stage in ("Validating the data", "Training: 24 steps", "Step 24/24", "After training", "Exported a PEFT adapter"):
        assert any(stage in s for s in msgs), (stage, msgs)
    if method == "lora_null_v2":
        assert any(s.startswith("Calibrated") for s in msgs)
    # Every stage event carries data.stage (the dashboard's timeline), entered in order.
    evs = events(env.srv, env.key, job["id"])
    staged = [(e["data"]["stage"], e["message"]) for e in evs if (e.get("data") or {}).get("stage")]
    for prefix, stage in (("Validating the data", "validating"), ("Training data validated", "validating"),
                          ("Calibrat", "calibrating"), ("Initialised the", "initialising"),
                          ("Before training", "training"), ("Training: 24 steps", "training"),
                          ("Step 24/24", "training"), ("Training finished", "evaluating"),
                          ("After training", "evaluating"), ("Exported a PEFT adapter", "exporting")):
        for e in evs:
            if e["message"].startswith(prefix):
                assert (e.get("data") or {}).get("stage") == stage, (prefix, e)
    order = ["validating", "calibrating", "initialising", "training", "evaluating", "exporting"]
    seq = [order.index(st) for st, _ in staged]
    assert seq == sorted(seq), staged
    want = set(order) - (set() if method == "lora_null_v2" else {"calibrating"})
    assert {st for st, _ in staged} == want, staged
    steps = [e for e in evs if e["message"].startswith("Step ")]
    assert steps and all(e["type"] == "metrics" and e["data"]["stage"] == "training" for e in steps), steps[:2]
    # The downloaded adapter runs in PEFT on the ORIGINAL base, and gives our engine's logits.
    adir = save_files({k: v for k, v in files.items() if k.startswith("adapter_")}, tmp_path / "adapter")
    ids = [1, 40, 50, 60, 70, 80, 90, 100]
    ref = peft_logits(env.models / MODEL_NAME, adir, ids)
    ours = our_logits(tmp_path, env.models / MODEL_NAME, adir, ids)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method, peft_rank", [("lora_null_v1", 8), ("pissa", 8), ("milora", 8), ("corda", 8),
                                               ("lora_fa", 4)])
def test_every_adapter_method_exports_for_peft(env, tmp_path, method, peft_rank):
    """The other methods through the service: residual methods that train A export rank 2r."""
    env.worker()
    job = submit(env.srv, env.key, env.train_id, method=method, epochs=1,
                 calibration=env.facts_id if method in ("lora_null_v1", "corda") else None)
    done = env.srv.wait_status(env.key, job["id"], {"succeeded", "failed"}, timeout=120)
    assert done["status"] == "succeeded", (done["error"], env.workers[0].log())
    files = result_files(env.srv, env.key, done)
    assert json.loads(files["adapter_config.json"])["r"] == peft_rank
    adir = save_files({k: v for k, v in files.items() if k.startswith("adapter_")}, tmp_path / "adapter")
    ids = [1, 40, 50, 60, 70]
    np.testing.assert_allclose(our_logits(tmp_path, env.models / MODEL_NAME, adir, ids),
                               peft_logits(env.models / MODEL_NAME, adir, ids), rtol=1e-4, atol=1e-4)


def test_full_fine_tuning_job_exports_a_model(env, tmp_path):
    """method full: every weight trains; the result is a whole model in HF layout that transformers loads."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    env.worker()
    job = submit(env.srv, env.key, env.train_id, method="full", lr=0.003, epochs=1)
    done = env.srv.wait_status(env.key, job["id"], {"succeeded", "failed"}, timeout=120)
    assert done["status"] == "succeeded", (done["error"], env.workers[0].log())
    files = result_files(env.srv, env.key, done)
    assert {"config.json", "model.safetensors", "eval_summary.json"} <= set(files)
    summary = json.loads(files["eval_summary.json"])
    assert summary["after"]["task_loss"] < summary["before"]["task_loss"]
    mdir = save_files({k: v for k, v in files.items() if k != "eval_summary.json"}, tmp_path / "model")
    model = transformers.LlamaForCausalLM.from_pretrained(str(mdir), torch_dtype=torch.float32)
    base = transformers.LlamaForCausalLM.from_pretrained(str(env.models / MODEL_NAME), torch_dtype=torch.float32)
    ids = torch.tensor([[1, 40, 50, 60]])
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base(ids).logits)


def test_broken_training_file_fails_in_validating_files_with_line(env):
    bad = b'{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n{"prompt": "e" "completion": 1}\n'
    fid = upload(env.srv, env.key, bad, "broken.jsonl")
    job = submit(env.srv, env.key, fid, method="lora")
    done = env.srv.wait_status(env.key, job["id"], {"failed", "succeeded"}, timeout=20)
    assert done["status"] == "failed"
    assert "line 3" in done["error"]["message"], done["error"]
    assert done["error"]["code"] == "invalid_training_file"


def test_worker_side_data_error_names_the_line(env):
    """A line the server's shape check accepts but the engine refuses (a token id outside the vocabulary)
    fails on the worker, with the file id, the line and the field in error.message."""
    w = env.worker()
    data = b'{"input_ids": [1, 2, 3]}\n{"input_ids": [4, 5, 6]}\n{"input_ids": [7, 99999, 9]}\n'
    fid = upload(env.srv, env.key, data, "ids.jsonl")
    job = submit(env.srv, env.key, fid, method="lora")
    done = env.srv.wait_status(env.key, job["id"], {"failed", "succeeded"}, timeout=60)
    assert done["status"] == "failed", w.log()
    err = done["error"]
    assert err["code"] == "invalid_training_file"
    assert fid in err["message"] and "line 3" in err["message"] and "vocabulary" in err["message"], err
    assert "/" not in err["message"].split(":")[0], "the worker's local path leaked into the message"


def test_data_overlong_reject_fails_naming_the_line_and_truncate_trains(env):
    """spec.data.overlong reaches the worker's loader: "reject" fails the job (not retried) naming the
    file and the line; the same file under the default "truncate" trains."""
    w = env.worker()
    lines = [{"prompt": "reverse cat:", "completion": " tac"}, {"prompt": "reverse dog:", "completion": " god"},
             {"prompt": "reverse sun:", "completion": " " + " ".join(["nus pam puc"] * 20)},
             {"prompt": "reverse hat:", "completion": " tah"}]
    fid = upload(env.srv, env.key, ("\n".join(json.dumps(x) for x in lines) + "\n").encode(), "long.jsonl")
    job = submit(env.srv, env.key, fid, method="lora", epochs=1, max_seq_len=24, data={"overlong": "reject"})
    assert job["data"]["overlong"] == "reject"
    done = env.srv.wait_status(env.key, job["id"], {"failed", "succeeded"}, timeout=60)
    assert done["status"] == "failed", w.log()
    err = done["error"]
    assert err["code"] == "invalid_training_file", err
    assert fid in err["message"] and "line 3" in err["message"] and "max_seq_len 24" in err["message"], err
    assert done["attempts"] == 1, "a rejected example is the data's fault: not retried"
    job = submit(env.srv, env.key, fid, method="lora", epochs=1, max_seq_len=24)
    done = env.srv.wait_status(env.key, job["id"], {"failed", "succeeded"}, timeout=60)
    assert done["status"] == "succeeded", done["error"]["message"]
    msgs = [e["message"] for e in events(env.srv, env.key, job["id"])]
    assert any("Training data validated: 4 examples" in m and "1 truncated to max_seq_len 24" in m for m in msgs), msgs


def test_data_pack_trains_packed_rows(env):
    """spec.data.pack reaches ln_train_opts.pack: the job trains rows of N tokens, so its step count
    is the epochs' tokens over (rows per step · N), not examples over batch_size."""
    import math
    w = env.worker()
    job = submit(env.srv, env.key, env.train_id, method="lora", epochs=2, batch_size=2, data={"pack": 64})
    assert job["data"]["pack"] == 64
    done = env.srv.wait_status(env.key, job["id"], {"failed", "succeeded"}, timeout=120)
    assert done["status"] == "succeeded", (done["error"], w.log())
    msgs = [e["message"] for e in events(env.srv, env.key, job["id"])]
    validated = [m for m in msgs if m.startswith("Training data validated:")][0]
    n_examples, n_tokens = (int(x) for x in validated.split(":")[1].replace(",", "").split()[0:3:2])
    steps = math.ceil(2 * n_tokens / (2 * 64))
    assert steps < math.ceil(2 * n_examples / 2), "packing must take fewer steps than one example per row"
    assert any(f"Training: {steps} steps of 2 packed rows of 64 tokens" in m for m in msgs), (steps, msgs)
    assert max(metrics(env.srv, env.key, job["id"], "loss")["loss"]) == steps


def test_non_finite_weights_are_refused_naming_the_tensor(env, tmp_path):
    """NaN weights (a poisoned copy of the model) are refused when the worker loads the model: the
    job fails naming the tensor, not a crash, a NaN loss at step 1, or a silent NaN adapter."""
    import shutil

    from safetensors.numpy import load_file, save_file
    models = tmp_path / "poisoned-models"
    shutil.copytree(env.models, models)
    st = models / MODEL_NAME / "model.safetensors"
    t = load_file(str(st))
    name = next(k for k in t if k.endswith("layers.1.self_attn.o_proj.weight"))
    t[name] = np.full_like(t[name], np.nan)
    save_file(t, str(st), metadata={"format": "pt"})
    w = env.worker("poisoned")
    w.stop()
    w.models = models
    w.start()
    job = submit(env.srv, env.key, env.train_id, method="lora", epochs=1)
    done = env.srv.wait_status(env.key, job["id"], {"failed", "succeeded"}, timeout=90)
    assert done["status"] == "failed", w.log()
    err = done["error"]
    assert err["code"] == "model_unavailable", err
    assert name in err["message"] and "not finite" in err["message"], err
    assert "step" not in err["message"], "refused at load, before any training step"
    assert w.running()


def test_out_of_memory_fails_with_what_to_change(env):
    """A batch that does not fit in the worker's memory (an address-space limit of 1.5 GB here)."""
    import shutil

    from e2e_helpers import WORKER_BIN
    if "asan" in str(WORKER_BIN) or not shutil.which("prlimit"):
        pytest.skip("needs prlimit and a build without ASan (which reserves terabytes of address space)")
    w = env.worker("small", prefix=("prlimit", "--as=1500000000"))
    job = submit(env.srv, env.key, env.train_id, method="lora", epochs=1, batch_size=65536)
    try:
        done = env.srv.wait_status(env.key, job["id"], {"failed", "succeeded"}, timeout=60)
    except AssertionError as x:
        raise AssertionError(f"{x}; the worker's log: {w.log()}") from None
    assert done["status"] == "failed", w.log()
    err = done["error"]
    assert err["code"] == "out_of_memory", err
    assert "out of memory" in err["message"] and "batch_size" in err["message"], err
    # refused by the memory plan before anything big is allocated, with the numbers
    assert "CPU memory plan: the job needs" in err["message"] and "RLIMIT_AS" in err["message"], err
    assert not any(e["message"].startswith("Calibrating") for e in events(env.srv, env.key, job["id"]))
    assert w.running(), "the worker itself must survive a job's out-of-memory"


def test_two_rank_job_on_one_worker_matches_one_rank(env, tmp_path):
    """resources.ranks=2 on a worker started with --ranks 2: tensor parallel on threads, each rank
    holding its shard. lora: the adapter equals the one-rank job's up to float rounding (partial sums
    added in another order). lora_null_v2 calibrates on the shards, whose covariances differ from a
    whole-model calibration by rounding (~1e-7), which can turn the null-space basis where two
    eigenvalues nearly tie: the adapter is then another, equally good one — so the job's losses and
    knowledge drift are compared, not its bytes (tests/unit/test_tensor_parallel.c compares the init
    itself on equal covariances)."""
    import json

    from safetensors.numpy import load

    env.worker("w2ranks", extra=("--ranks", "2"))
    calib = {"file": env.facts_id, "samples": 32, "max_length": 64}
    jobs = {}
    for method in ("lora", "lora_null_v2"):
        for ranks in (1, 2):
            spec = dict(model="tiny-llama", training_file=env.train_id, seed=7,
                        hyperparameters={"n_epochs": 1, "batch_size": 4, "learning_rate": 0.01},
                        adapter={"type": method, "rank": 4, "calibration": calib},
                        resources={"ranks": ranks, "device": "cpu"})
            jobs[method, ranks] = env.srv.create_job(env.key, **spec)
    out = {}
    for k, job in jobs.items():
        done = env.srv.wait_status(env.key, job["id"], {"succeeded", "failed"}, timeout=120)
        assert done["status"] == "succeeded", (done["error"], env.workers[0].log())
        files = result_files(env.srv, env.key, done)
        out[k] = (load(files["adapter_model.safetensors"]), json.loads(files["eval_summary.json"]))
    assert any("tensor-parallel" in e["message"] for e in events(env.srv, env.key, jobs["lora", 2]["id"]))
    one, two = out["lora", 1][0], out["lora", 2][0]
    assert one.keys() == two.keys()
    for k in one:
        np.testing.assert_allclose(two[k], one[k], rtol=1e-3, atol=1e-5, err_msg=k)
    a, b = out["lora_null_v2", 1][1], out["lora_null_v2", 2][1]
    assert abs(b["after"]["task_loss"] - a["after"]["task_loss"]) <= 0.02 * a["after"]["task_loss"], (a, b)
    assert abs(b["after"]["knowledge_loss"] - a["after"]["knowledge_loss"]) <= 0.02 * a["after"]["knowledge_loss"], (a, b)
    for s in (a, b):  # both keep the knowledge: LoRA-Null's drift stays far below plain LoRA's
        assert s["knowledge_drift"]["mean"] < 0.1 * out["lora", 1][1]["knowledge_drift"]["mean"], (s, out["lora", 1][1])


def test_reports_are_split_to_fit_a_small_server_body_limit(server_factory, models, tmp_path):
    """A server that takes at most 16 KiB per request: the worker's batches (hundreds of points with
    per-layer drift) are refused with 413, halved until they fit, and every point still arrives."""
    from e2e_helpers import Env

    srv = server_factory("--max-body-bytes", "16384")
    env = Env(srv, models, tmp_path)
    w = env.worker("w1")
    try:
        job = submit(srv, env.key, env.train_id, calibration=env.facts_id, epochs=10, eval_interval=1)
        done = srv.wait_status(env.key, job["id"], {"succeeded", "failed"}, timeout=120)
        assert done["status"] == "succeeded", (done["error"], w.log())
        m = metrics(srv, env.key, job["id"])
        assert sorted(m["loss"]) == list(range(1, 121))
        assert sorted(m["knowledge_drift_mean"]) == list(range(1, 121))
        assert len([k for k in m if k.startswith("knowledge_drift/")]) == 14
    finally:
        w.stop()


@pytest.mark.parametrize("args, needle", [
    (["--device", "tpu"], 'device "tpu": expected cpu, cuda or cuda:N'),
    (["--device", "cpu", "--ranks", "0"], "--ranks '0'"),
    (["--device", "cpu", "--token-file", "/nonexistent/token"], "--token-file"),
    (["--device", "cpu", "--models", "/nonexistent/models"], "--models /nonexistent/models"),
])
def test_worker_flags_errors_are_sentences(models, tmp_path, args, needle):
    import subprocess

    from e2e_helpers import WORKER_BIN
    tok = tmp_path / "tok"
    tok.write_text("wt-ln-x\n")
    base = ["--server", "http://127.0.0.1:9", "--token-file", str(tok), "--models", str(models),
            "--work-dir", str(tmp_path / "w")]
    # later flags win: the case's own value replaces the default one
    r = subprocess.run([str(WORKER_BIN), *base, *args], capture_output=True, text=True, timeout=20)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr, r.stderr
