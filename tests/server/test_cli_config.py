"""The server's command line: keys/tokens subcommands, --config FILE, and clear errors for bad flags."""
import json
import subprocess

import requests

from lnserver import ROOT, SERVER_BIN, Server, TestWorker


def run(*args):
    return subprocess.run([str(SERVER_BIN), *args], capture_output=True, text=True, timeout=30)


def test_keys_and_tokens_subcommands(tmp_path):
    d = str(tmp_path / "data")
    mig = ["--migrations-dir", str(ROOT / "migrations")]
    r = run("keys", "create", "--project", "team-a", "--data-dir", d, *mig)
    assert r.returncode == 0 and r.stdout.startswith("sk-ln-") and "shown only once" in r.stderr
    key = r.stdout.strip()
    key_id = r.stderr.split("created key ")[1].split()[0]
    listing = run("keys", "list", "--data-dir", d, *mig).stdout
    assert key_id in listing and "team-a" in listing and "active" in listing and key not in listing
    assert run("keys", "revoke", key_id, "--data-dir", d, *mig).returncode == 0
    assert "revoked" in run("keys", "list", "--data-dir", d, *mig).stdout
    again = run("keys", "revoke", key_id, "--data-dir", d, *mig)
    assert again.returncode == 2 and "not an active key" in again.stderr
    bad = run("keys", "create", "--project", "no spaces", "--data-dir", d, *mig)
    assert bad.returncode == 2 and "--project" in bad.stderr
    tok = run("tokens", "create", "--name", "node-1", "--data-dir", d, *mig)
    assert tok.returncode == 0 and tok.stdout.startswith("wt-ln-")
    assert run("tokens", "create", "--data-dir", d, *mig).returncode == 2  # --name missing


def test_revoked_worker_token_refused(server):
    tok = server.create_token("w")
    w = TestWorker(server, tok)
    w.register()
    server._admin("tokens", "revoke", tok)
    r = w.post("/lease", {"worker_id": w.worker_id, "wait_s": 0})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_config_file_and_flag_precedence(tmp_path):
    static = tmp_path / "static"
    static.mkdir()
    (static / "index.html").write_text("from-config")
    cfg = tmp_path / "server.json"
    cfg.write_text(json.dumps({"static_dir": str(static), "max_body_bytes": 2048, "threads": 2,
                               "access_log": False, "lease_ttl_s": 5}))
    srv = Server(tmp_path / "data", ["--config", str(cfg), "--max-body-bytes", "4096"])
    srv.launch()
    try:
        assert requests.get(srv.url("/")).text == "from-config"
        key = srv.create_key("p")
        c = srv.client(key)
        # the flag (4096) wins over the file (2048)
        assert c.post(srv.url("/v1/fine_tuning/jobs"), data=b"{" + b" " * 3000 + b"}").status_code == 400
        assert c.post(srv.url("/v1/fine_tuning/jobs"), data=b"{" + b" " * 5000 + b"}").status_code == 413
        assert '"route"' not in srv.log()  # access_log: false
    finally:
        assert srv.stop() == 0


def test_bad_flags_and_config_are_clear(tmp_path):
    r = run("--listen", "nonsense", "--data-dir", str(tmp_path))
    assert r.returncode == 2 and "--listen 'nonsense'" in r.stderr
    r = run("--threads", "zero", "--data-dir", str(tmp_path))
    assert r.returncode == 2 and "threads" in r.stderr
    r = run("--bogus", "1", "--data-dir", str(tmp_path))
    assert r.returncode == 2 and "unknown option 'bogus'" in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"threads": 2,')
    r = run("--config", str(bad), "--data-dir", str(tmp_path))
    assert r.returncode == 2 and str(bad) in r.stderr
    r = run("--listen", "127.0.0.1:0")
    assert r.returncode == 2 and "--data-dir is required" in r.stderr


def test_import_given_secrets_from_stdin(server):
    """`keys import` / `tokens import` make given secrets valid (a Kubernetes Secret), idempotently."""
    mig = ["--migrations-dir", str(ROOT / "migrations"), "--data-dir", str(server.data_dir)]
    key = "sk-given-0123456789abcdefghij"
    lines = f"team-a {key}\n# comment\n\nteam-b sk-given-zzzzzzzzzzzzzzzzzzzzzz\n"
    r = subprocess.run([str(SERVER_BIN), "keys", "import", *mig], input=lines, capture_output=True, text=True)
    assert r.returncode == 0 and "imported 2 new key(s) (0 already known)" in r.stderr
    assert server.client(key).get(server.url("/v1/files")).status_code == 200
    # Idempotent, and a revoked key stays revoked when imported again.
    server.revoke_key(key)
    r = subprocess.run([str(SERVER_BIN), "keys", "import", *mig], input=lines, capture_output=True, text=True)
    assert "imported 0 new key(s) (2 already known)" in r.stderr
    assert server.client(key).get(server.url("/v1/files")).status_code == 401
    tok = "wt-given-0123456789abcdefgh"
    r = subprocess.run([str(SERVER_BIN), "tokens", "import", "--name", "k8s", *mig], input=tok + "\n",
                       capture_output=True, text=True)
    assert r.returncode == 0
    TestWorker(server, tok).register()
    bad = subprocess.run([str(SERVER_BIN), "keys", "import", *mig], input="team-c short\n", capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "stdin line 1" in bad.stderr and "20..128" in bad.stderr
