"""End-to-end helpers: a real loranull-worker process next to the real server (tests/server/lnserver.py),
a tiny model made by `loranull model new`, and generated data.

    models = make_tiny_model(tmp_path)                        # tmp_path/models/tiny-llama
    w = Worker(srv, srv.create_token("w1"), models, tmp_path / "w1").start()
    job = submit(srv, key, train_id, method="lora_null_v2", calibration=facts_id)
    srv.wait_status(key, job["id"], "succeeded", timeout=120)
    files = result_files(srv, key, job)                       # {filename: bytes}
"""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "server"))

from lnserver import BIN, Server  # noqa: E402

WORKER_BIN = BIN / "loranull-worker"
CLI_BIN = BIN / "loranull"
MODEL_NAME = "tiny-llama"

# Small enough that a whole job takes seconds on one core, big enough to learn something.
TINY_CONFIG = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
               "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
               "architectures": ["LlamaForCausalLM"], "model_type": "llama"}


def run_cli(*args, timeout=300):
    r = subprocess.run([str(CLI_BIN), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"loranull {' '.join(map(str, args))} failed:\n{r.stderr}"
    return r


def make_tiny_model(root, name=MODEL_NAME, seed=1):
    """A random tiny LLaMA with the default tokenizer in root/models/name; returns root/models."""
    models = pathlib.Path(root) / "models"
    (models / name).parent.mkdir(parents=True, exist_ok=True)
    cfg = pathlib.Path(root) / "tiny-config.json"
    cfg.write_text(json.dumps(TINY_CONFIG))
    run_cli("model", "new", "--config", cfg, "--out", models / name, "--seed", seed)
    return models


def task_jsonl(n=48):
    """A new task the model has not seen: reversing short words."""
    words = ["cat", "dog", "sun", "map", "pen", "cup", "hat", "box", "bus", "car", "egg", "fox"]
    lines = []
    for i in range(n):
        w = words[i % len(words)] + words[(i * 5 + 3) % len(words)]
        lines.append(json.dumps({"prompt": f"reverse {w}:", "completion": " " + w[::-1]}))
    return ("\n".join(lines) + "\n").encode()


def facts_jsonl(n=48):
    """Knowledge text (calibration data)."""
    return ("\n".join(json.dumps({"text": f"Fact {i}: the river {i % 9} flows into lake {i * 7 % 11}."})
                      for i in range(n)) + "\n").encode()


class Worker:
    """One loranull-worker process with its own work dir; logs to work_dir/worker.log."""

    def __init__(self, server, token, models, work_dir, name="e2e-worker", extra=(), prefix=()):
        self.srv, self.token, self.models = server, token, pathlib.Path(models)
        self.work_dir = pathlib.Path(work_dir)
        self.name, self.extra, self.prefix = name, list(extra), list(prefix)
        self.proc = None
        self._log = None

    @property
    def log_path(self):
        return self.work_dir / "worker.log"

    def start(self):
        self.work_dir.mkdir(parents=True, exist_ok=True)
        tok = self.work_dir / "token"
        tok.write_text(self.token + "\n")
        self._log = open(self.log_path, "ab")
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        cmd = [*self.prefix, str(WORKER_BIN), "--server", self.srv.base, "--token-file", str(tok), "--models", str(self.models),
               "--device", "cpu", "--work-dir", str(self.work_dir), "--name", self.name, "--lease-wait-s", "2",
               "--heartbeat-s", "0.3", *self.extra]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=self._log, env=env)
        return self

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._close()

    def term(self, timeout=30):
        """SIGTERM; returns (exit code, seconds it took)."""
        t0 = time.time()
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        self._close()
        return rc, time.time() - t0

    def stop(self):
        if self.running():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._close()

    def _close(self):
        if self._log:
            self._log.close()
            self._log = None

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except OSError:
            return ""


def upload(srv, key, content, filename):
    return srv.upload(key, content, filename)["id"]


def submit(srv, key, training_file, method="lora_null_v2", calibration=None, epochs=2, batch_size=4, lr=0.01,
           seed=7, rank=4, save_interval=0, eval_interval=0, validation_file=None, samples=32, data=None, **hp):
    spec = {"model": MODEL_NAME, "training_file": training_file, "seed": seed,
            "hyperparameters": {"n_epochs": epochs, "batch_size": batch_size, "learning_rate": lr,
                                "save_interval": save_interval, "eval_interval": eval_interval, **hp},
            "adapter": {"type": method, "rank": rank}}
    if calibration:
        spec["adapter"]["calibration"] = {"file": calibration, "samples": samples, "max_length": 64}
    if validation_file:
        spec["validation_file"] = validation_file
    if data is not None:
        spec["data"] = data
    return srv.create_job(key, **spec)


def result_files(srv, key, job):
    """{filename: bytes} of a finished job's result files."""
    api = srv.client(key)
    out = {}
    for fid in job["result_files"]:
        meta = api.get(srv.url(f"/v1/files/{fid}")).json()
        r = api.get(srv.url(f"/v1/files/{fid}/content"))
        assert r.status_code == 200, r.text
        out[meta["filename"]] = r.content
    return out


def events(srv, key, job_id):
    """Every event of a job, oldest first."""
    r = srv.client(key).get(srv.url(f"/v1/fine_tuning/jobs/{job_id}/events"), params={"limit": 1000})
    assert r.status_code == 200, r.text
    return list(reversed(r.json()["data"]))


def metrics(srv, key, job_id, name=None):
    params = {"name": name} if name else {}
    r = srv.client(key).get(srv.url(f"/v1/fine_tuning/jobs/{job_id}/metrics"), params=params)
    assert r.status_code == 200, r.text
    return {s["name"]: dict(zip(s["steps"], s["values"])) for s in r.json()["data"]}


def checkpoints(srv, key, job_id):
    r = srv.client(key).get(srv.url(f"/v1/fine_tuning/jobs/{job_id}/checkpoints"), params={"limit": 100})
    assert r.status_code == 200, r.text
    return r.json()["data"]


def wait_for(pred, timeout, what, interval=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def save_files(files, dest):
    dest = pathlib.Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (dest / name).write_bytes(data)
    return dest


__all__ = ["Server", "Worker", "make_tiny_model", "task_jsonl", "facts_jsonl", "upload", "submit", "result_files",
           "events", "metrics", "checkpoints", "wait_for", "save_files", "run_cli", "MODEL_NAME", "WORKER_BIN"]


class Env:
    """A server with a project key, a worker token and the task/facts files uploaded."""

    def __init__(self, srv, models, tmp_path):
        self.srv, self.models, self.tmp = srv, models, tmp_path
        self.key = srv.create_key("e2e")
        self.token = srv.create_token("e2e-workers")
        self.train_id = upload(srv, self.key, task_jsonl(), "task.jsonl")
        self.facts_id = upload(srv, self.key, facts_jsonl(), "facts.jsonl")
        self.workers = []

    def worker(self, name="w1", extra=(), prefix=()):
        w = Worker(self.srv, self.token, self.models, self.tmp / name, name=name, extra=extra, prefix=prefix).start()
        self.workers.append(w)
        return w


# The job every interruption test runs: long enough (720 steps of 4 examples, a second or two on one
# core) to be interrupted mid-way, with a checkpoint every 40 steps.
LONG_JOB = dict(method="lora_null_v2", epochs=60, save_interval=40)
LONG_STEPS = 720
