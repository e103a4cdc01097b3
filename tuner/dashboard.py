"""`tuner dashboard`: optuna-dashboard on the study storage, with the artifact store, so that a trial's scatter chart,
predictions and adapter archive are in its trial view beside its user attributes (metrics, LoRA values, W&B run id,
artifact ids, duration, device).

Served by a threaded wsgiref server, as optuna-dashboard's own command does; bound to 127.0.0.1 unless told
otherwise, since the dashboard can also change a study (notes, tells, deletions).
"""

from __future__ import annotations

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


@dataclass
class Dashboard:
    server: WSGIServer
    url: str
    artifact_dir: Path
    studies: list[str]
    store_note: str = ""  # which artifact store is served, and whether it exists

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
           artifacts_dir: str | None = None) -> Dashboard:
    """Bind the server (port 0: any free port) and return it ready to serve."""
    from optuna_dashboard import wsgi

    summaries = optuna.get_all_study_summaries(storage)
    store_dir = artifacts.location_for_studies(summaries, storage_url, artifacts_dir)
    note = artifacts.store_note(summaries, store_dir)
    if store_dir.is_dir():
        store = artifacts.open_store(store_dir, create=False)
    else:  # a reader never creates storage: served without artifacts
        store, note = None, f"{note}: no such folder, so no artifacts are shown"
    app = wsgi(storage, artifact_store=store)
    try:
        server = make_server(host, port, app, server_class=_ThreadedServer, handler_class=_QuietHandler)
    except OSError as exc:
        raise TunerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    return Dashboard(server, f"http://{shown}:{bound_port}/", store_dir, [s.study_name for s in summaries], note)
