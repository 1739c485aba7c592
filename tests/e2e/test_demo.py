"""`make demo` (tests/e2e/demo.sh) runs to the end and its summary says what the README promises."""
import os
import re
import socket
import subprocess

from e2e_helpers import ROOT, WORKER_BIN

import pytest


def test_demo_runs_and_its_summary_holds(tmp_path):
    if not WORKER_BIN.exists():
        pytest.skip("run make first")
    env = dict(os.environ, LORANULL_DEMO_DIR=str(tmp_path / "demo"))
    r = subprocess.run(["bash", str(ROOT / "tests" / "e2e" / "demo.sh")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    out = r.stdout
    assert r.returncode == 0, out[-4000:] + r.stderr[-4000:]
    # Progress was shown live, for both jobs, from the event stream.
    assert re.search(r"\[lora_null_v2\] info  Step \d+/\d+: training loss=", out)
    assert "[lora] info  The job has successfully completed" in out
    summary = out[out.index("==> Summary"):]

    def row(label):
        m = re.search(rf"^{re.escape(label)}\s+(\S+)\s+(\S+)$", summary, re.M)
        assert m, (label, summary)
        return float(m.group(1)), float(m.group(2))

    (t0_null, t0_lora), (t1_null, t1_lora) = row("task loss before"), row("task loss after")
    (k0_null, k0_lora), (k1_null, k1_lora) = row("facts loss before"), row("facts loss after")
    d_null, d_lora = row("knowledge drift (mean)")
    # Both learnt the task; the base model knew the facts; LoRA-Null kept them and plain LoRA did not.
    assert t1_null < t0_null - 3 and t1_lora < t0_lora - 3
    assert k0_null < 1.0
    assert abs(k1_null - k0_null) < 0.05
    assert k1_lora > k1_null + 0.5
    assert d_null < d_lora / 100
    m = re.search(r"^adapter:\s+(\S+)", summary, re.M)
    assert m and os.path.getsize(m.group(1)) > 0
    assert os.path.exists(os.path.join(os.path.dirname(m.group(1)), "adapter_config.json"))
    url = re.search(r"^dashboard:\s+http://127\.0\.0\.1:(\d+)/ ", summary, re.M)
    assert url
    # Its processes are gone: nothing listens on the demo's port any more.
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", int(url.group(1)))) != 0
