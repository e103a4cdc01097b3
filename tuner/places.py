"""Where a study's machine-local files go: its run folders (checkpoints, the kept adapter while it trains, W&B's
offline runs). Beside the storage, like the artifact store, so that a study's files sit together whatever folder
tuner is run from: `runs/` next to a SQLite file; `./runs` for a database server (there is no file to sit beside);
`study.output_dir` in the sweep file to choose. The folder used is recorded on the study (`runs_dir`) for
`tuner clean`.
"""

from __future__ import annotations

from pathlib import Path

RUNS_ATTR = "runs_dir"


def sqlite_folder(storage_url: str) -> Path | None:
    """The folder of a SQLite file, or None for a database server or an in-memory database."""
    import sqlalchemy as sa

    url = sa.engine.make_url(storage_url)
    if url.drivername.startswith("sqlite") and url.database and url.database != ":memory:":
        return Path(url.database).expanduser().resolve().parent
    return None


def runs_root(storage_url: str, configured: str | None = None) -> Path:
    """`study.output_dir` when set, else `runs/` beside the SQLite file, else `./runs`."""
    if configured:
        return Path(configured).expanduser().resolve()
    beside = sqlite_folder(storage_url)
    return (beside if beside is not None else Path.cwd()) / "runs"
