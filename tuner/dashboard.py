"""`tuner dashboard`: optuna-dashboard on the study storage, with the artifact store, so that a trial's scatter chart,
predictions and adapter archive are in its trial view beside its user attributes (metrics, LoRA values, W&B run id,
artifact ids, duration, device).

Served by a threaded wsgiref server, as optuna-dashboard's own command does; bound to 127.0.0.1 unless told
otherwise, since the dashboard can also change a study (notes, tells, deletions) and has no login. Bound to any
other address it is read-only unless `--allow-writes` says otherwise: every request but GET, HEAD and OPTIONS is
refused with 403, so that anyone who can reach the port can look but not delete.
"""

from __future__ import annotations

import ipaddress
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna

from . import artifacts
from .errors import TunerError


class _ThreadedServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # one line per request would drown the terminal
        pass


READ_METHODS = ("GET", "HEAD", "OPTIONS")


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost reach this machine only; every other address (0.0.0.0, ::, a LAN address,
    a host name) may be reached from others."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_only(app):
    """A WSGI app that answers 403 to every request that could change the storage."""
    def guarded(environ, start_response):
        if environ.get("REQUEST_METHOD", "GET").upper() not in READ_METHODS:
            body = b"read-only dashboard: tuner dashboard --allow-writes permits changes\n"
            start_response("403 Forbidden", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
            return [body]
        return app(environ, start_response)

    return guarded


@dataclass
class Dashboard:
    server: WSGIServer
    url: str
    artifact_dir: Path
    studies: list[str]
    store_note: str = ""  # which artifact store is served, and whether it exists
    read_only: bool = False
    exposed: bool = False  # bound to an address other machines may reach

    def serve(self) -> None:
        """Until Ctrl-C or SIGTERM."""
        def stop(signum, frame):
            threading.Thread(target=self.server.shutdown, daemon=True).start()

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, stop)
        try:
            self.server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            self.server.server_close()


def create(storage, storage_url: str, *, host: str = "127.0.0.1", port: int = 8080,
           artifacts_dir: str | None = None, writes: bool | None = None) -> Dashboard:
    """Bind the server (port 0: any free port) and return it ready to serve. `writes`: None allows changes on a
    loopback address only; True or False says so for any address."""
    from optuna_dashboard import wsgi

    summaries = optuna.get_all_study_summaries(storage)
    store_dir = artifacts.location_for_studies(summaries, storage_url, artifacts_dir)
    note = artifacts.store_note(summaries, store_dir)
    if store_dir.is_dir():
        store = artifacts.open_store(store_dir, create=False)
    else:  # a reader never creates storage: served without artifacts
        store, note = None, f"{note}: no such folder, so no artifacts are shown"
    exposed = not is_loopback(host)
    allow = (not exposed) if writes is None else writes
    app = wsgi(storage, artifact_store=store)
    if not allow:
        app = read_only(app)
    try:
        server = make_server(host, port, app, server_class=_ThreadedServer, handler_class=_QuietHandler)
    except OSError as exc:
        raise TunerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    return Dashboard(server, f"http://{shown}:{bound_port}/", store_dir, [s.study_name for s in summaries], note,
                     read_only=not allow, exposed=exposed)
