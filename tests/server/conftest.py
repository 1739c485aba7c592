"""Server test fixtures (server, server_factory) from lnserver_fixtures; see lnserver.py."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from lnserver_fixtures import server, server_factory, steady_server  # noqa: E402,F401  (re-exported fixtures)
