"""pytest fixtures around lnserver.Server. tests/server/conftest.py imports them; another folder's
conftest.py can too, once tests/server is on sys.path: `from lnserver_fixtures import server, server_factory`."""
import pytest

from lnserver import SERVER_BIN, Server


@pytest.fixture
def server_factory(tmp_path):
    """Starts servers with extra flags: server_factory("--lease-ttl-s", "1"); all stopped at the end."""
    started = []

    def make(*args, data_dir=None):
        if not SERVER_BIN.exists():
            pytest.skip(f"{SERVER_BIN} is not built (run make)")
        s = Server.start(data_dir or tmp_path / f"srv{len(started)}", args)
        started.append(s)
        return s

    yield make
    problems = []
    for s in started:
        rc = s.stop()
        log = s.log()
        # A graceful stop exits 0; under ASan/UBSan a leak or undefined behaviour shows in the log.
        if rc not in (0, None, -9) or "Sanitizer" in log or "runtime error:" in log:
            problems.append(f"server on port {s.port} exited {rc}:\n{log[-4000:]}")
    assert not problems, "\n".join(problems)


@pytest.fixture
def server(server_factory):
    """A fresh server with a short lease TTL and backoff, so expiry tests run fast."""
    return server_factory("--lease-ttl-s", "1.5", "--retry-backoff-s", "0.2", "--max-attempts", "3",
                          "--sse-keepalive-s", "1")


@pytest.fixture
def steady_server(server_factory):
    """Like `server`, but with a lease TTL (60 s) that a loaded machine cannot run out between two
    steps of a test: for tests that do not test lease expiry."""
    return server_factory("--lease-ttl-s", "60", "--retry-backoff-s", "0.2", "--max-attempts", "3",
                          "--sse-keepalive-s", "1")
