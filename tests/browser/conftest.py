"""Browser-test fixtures: one real loranull-server for the module (tests/server's lnserver), Debian's
chromium driven headless by Playwright (no browser download), and a `dash` helper per test that
fails the test on any console error or uncaught page error and saves screenshots under
tests/artifacts/browser/."""
import os
import pathlib
import re
import sys
import time

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "server"))

from lnserver import SERVER_BIN, Server, TestWorker  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts" / "browser"
CHROMIUM = os.environ.get("LORANULL_CHROMIUM", "/usr/bin/chromium")
DESKTOP = {"width": 1280, "height": 900}


def start_server(data_dir, *args):
    """A server on this checkout's dashboard files (wherever LORANULL_BIN points)."""
    if not SERVER_BIN.exists():
        pytest.skip(f"{SERVER_BIN} is not built (run make)")
    return Server.start(data_dir, ["--sse-keepalive-s", "1", "--no-access-log",
                                   "--static-dir", str(ROOT / "server" / "static"), *args])


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    """A server for the whole module; tests keep apart by using their own projects."""
    s = start_server(tmp_path_factory.mktemp("browser-srv"))
    yield s
    s.stop()


@pytest.fixture
def server_factory(tmp_path):
    """Extra servers with their own flags for one test; stopped at its end."""
    started = []

    def make(*args):
        s = start_server(tmp_path / f"srv{len(started)}", *args)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


@pytest.fixture
def real_worker_server(server_factory):
    """A server of its own for a real loranull-worker (tests/e2e's Worker), with a short lease TTL and
    long-poll so the worker's leases come quickly; skips when the worker is not built."""
    sys.path.insert(0, str(ROOT / "tests" / "e2e"))
    from e2e_helpers import WORKER_BIN

    if not WORKER_BIN.exists():
        pytest.skip(f"{WORKER_BIN} is not built (run make)")
    return server_factory("--lease-ttl-s", "5", "--lease-wait-max-s", "2")


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    if not pathlib.Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (Debian package chromium)")
    pw = sync_playwright().start()
    b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
    yield b
    b.close()
    pw.stop()


class Dash:
    """One browser context + page on the server, with console-error checking and screenshots."""

    def __init__(self, browser, srv, viewport=DESKTOP, color_scheme="light"):
        self.srv = srv
        self.context = browser.new_context(viewport=viewport, color_scheme=color_scheme, accept_downloads=True)
        self.context.set_default_timeout(10_000)
        self.page = self.context.new_page()
        self.errors = []
        self.allowed = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))

    def _console(self, msg):
        if msg.type == "error":
            self.errors.append(f"console error: {msg.text} at {msg.location}")

    def allow(self, pattern):
        """Expects console errors matching pattern (e.g. the browser's own log of a 401 response)."""
        self.allowed.append(re.compile(pattern))

    def unexpected_errors(self):
        return [e for e in self.errors if not any(p.search(e) for p in self.allowed)]

    def open(self, hash_=""):
        self.page.goto(self.srv.url("/") + hash_)
        return self.page

    def sign_in(self, key):
        self.open("#/jobs")
        self.page.fill("#api-key", key)
        self.page.click("#signin button[type=submit]")
        self.page.wait_for_selector("#jobs-table")

    def go(self, hash_):
        self.page.evaluate("h => { location.hash = h; }", hash_)

    def shot(self, name):
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def wait_for(self, js, arg=None, timeout=10_000):
        """Waits until a JS predicate over the page holds (polled by the browser)."""
        self.page.wait_for_function(js, arg=arg, timeout=timeout)

    def close(self):
        self.context.close()


@pytest.fixture
def dash_factory(browser, srv):
    made = []

    def make(server=None, **kw):
        d = Dash(browser, server or srv, **kw)
        made.append(d)
        return d

    yield make
    errors = []
    for d in made:
        errors += d.unexpected_errors()
        d.close()
    assert not errors, "the dashboard logged errors:\n" + "\n".join(errors)


@pytest.fixture
def dash(dash_factory):
    return dash_factory()


@pytest.fixture
def project(srv, request):
    """A fresh project (named after the test) and its API key."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)[:56] + f"-{time.monotonic_ns() % 100000}"
    return srv.create_key(name)


@pytest.fixture(scope="module")
def worker(srv):
    """A registered test worker holding the model "tiny-llama" (speaks /internal/v1 over HTTP)."""
    w = TestWorker(srv, srv.create_token("browser-worker"), name="browser-worker", models=("tiny-llama",), devices=2)
    w.register()
    return w
