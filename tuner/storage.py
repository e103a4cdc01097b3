"""Study storage: Optuna's RDB storage (SQLite by default, PostgreSQL or MySQL for many machines) and the one
table tuner adds beside Optuna's own.

Optuna is the system of record for studies and trials. It has no atomic way to hand out a global trial budget to
several workers, so `tuner_trial_slots` does that: a worker inserts (study, slot) before it asks for a new trial;
the primary key makes the insert fail for everyone but one worker, so the budget is never overshot. A retry of a
failed trial reuses the slot of the trial it retries, so a retried trial is counted once.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
import sqlite3
import time
from pathlib import Path

import sqlalchemy as sa

from .errors import StorageError

DEFAULT_STORAGE = "sqlite:///studies.db"

_metadata = sa.MetaData()
slots_table = sa.Table(
    "tuner_trial_slots", _metadata,
    sa.Column("study_name", sa.String(512), primary_key=True),
    sa.Column("slot", sa.Integer, primary_key=True),
    sa.Column("trial_number", sa.Integer, nullable=True),
    sa.Column("worker", sa.String(256), nullable=False),
    sa.Column("claimed_at", sa.DateTime, nullable=False),
)
promotions_table = sa.Table(
    "tuner_promotions", _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("study_name", sa.String(512), nullable=False, index=True),
    sa.Column("trial_number", sa.Integer, nullable=False),
    sa.Column("target", sa.String(1024), nullable=False),  # OWNER/NAME on the Hub, or a local folder
    sa.Column("kind", sa.String(16), nullable=False),  # hub | local
    sa.Column("revision", sa.String(256), nullable=True),  # commit id on the Hub, or the path written
    sa.Column("checkpoint_step", sa.Integer, nullable=True),
    sa.Column("tag", sa.String(256), nullable=True),
    sa.Column("created_at", sa.DateTime, nullable=False),
)


NOT_A_URL = "(the value given is not a URL, so it is not shown: it may hold a password)"
# Query parameters that carry a secret in the drivers' URLs (?password=, ?sslpassword=, ?token=, ?api_key= ...).
_SECRET_QUERY = re.compile(r"([?&;][^=&;#]*(?:pass|secret|token|key)[^=&;#]*=)[^&;#]*", re.IGNORECASE)


def mask_url(url: str) -> str:
    """The URL as it may be shown: every password replaced by ***. The password is everything between the user's
    ':' and the authority's last '@' (an unencoded '@' in a password is still the password's, and the user may be
    empty), and every secret-like query parameter. A string that is not a URL is not shown at all."""
    if not isinstance(url, str) or "://" not in url:
        return NOT_A_URL
    scheme, _, rest = url.partition("://")
    if "@" in rest:
        userinfo, _, host = rest.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        if colon and "/" not in user:
            rest = f"{user}:***@{host}"
    return _SECRET_QUERY.sub(r"\1***", f"{scheme}://{rest}")


def _secrets(url: str) -> list[str]:
    """The pieces of `url` that mask_url hides: the password (and each '@'-separated part of it, which a driver may
    quote as part of a host name) and secret query values. Parts shorter than 4 characters are not scrubbed from
    messages (they would mangle them); mask_url hides them all the same."""
    if not isinstance(url, str) or "://" not in url:
        return [url] if isinstance(url, str) and url else []
    rest = url.partition("://")[2]
    found = [m.group(0).partition("=")[2] for m in _SECRET_QUERY.finditer(rest)]
    if "@" in rest:
        userinfo = rest.rpartition("@")[0]
        user, colon, password = userinfo.partition(":")
        if colon and "/" not in user and password:
            found += [password, *password.split("@")]
    return sorted({f for f in found if len(f) >= 4}, key=len, reverse=True)


def _scrub(text: str, url: str) -> str:
    """A driver's message with the URL's secrets taken out, should the driver have quoted them."""
    for secret in _secrets(url):
        text = text.replace(secret, "***")
    return text


def parse_url(url: str) -> sa.engine.URL:
    """The parsed URL, or a StorageError that shows it masked (or not at all, when it is not a URL)."""
    try:
        if isinstance(url, str) and "://" in url:
            _check_userinfo(url)
        return sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise StorageError(f"storage {mask_url(url)}: not a database URL (examples: sqlite:///studies.db, "
                           f"postgresql://user@host/db)") from None
    except ValueError:  # sqlalchemy reads the port as an int
        raise StorageError(f"storage {mask_url(url)}: not a valid database URL (the port must be a number)") from None


def _check_userinfo(url: str) -> None:
    """An unencoded '@' in the password makes the driver read part of the password as the host (and quote it in
    its error): refused, saying how to write it."""
    authority = url.partition("://")[2].split("/", 1)[0]
    if authority.count("@") > 1:
        raise StorageError(f"storage {mask_url(url)}: the user or password holds an '@'; write it as %40")


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _prepare_sqlite(url: str) -> None:
    """Create the folder, and switch the file to write-ahead logging: readers then never block the writer, which
    with a busy timeout is what keeps several local workers clear of 'database is locked'."""
    path = sa.engine.make_url(url).database
    if not path or path == ":memory:":
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=60)
    try:
        con.execute("PRAGMA journal_mode=WAL")
    finally:
        con.close()


def engine_kwargs(url: str) -> dict:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 120}}
    return {"pool_pre_ping": True, "pool_size": 2, "max_overflow": 4}


def _check_sqlite_writable(path: str | None) -> None:
    """A worker writes its SQLite file: one it cannot write (read-only file, folder or mount) is refused now, by
    taking the write lock once, rather than failing later with SQLite's misleading messages."""
    if not path or path == ":memory:" or not Path(path).exists():
        return
    try:
        con = sqlite3.connect(f"file:{Path(path).resolve()}?mode=rw", uri=True, timeout=30)
        try:  # a write inside a transaction that is rolled back: SQLite opens a protected file read-only silently
            con.isolation_level = None
            con.execute("BEGIN IMMEDIATE")
            con.execute("CREATE TABLE tuner_write_probe (x INTEGER)")
            con.execute("ROLLBACK")
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise StorageError(f"storage {path}: cannot write this SQLite file ({exc}); `tuner run` needs to write "
                           f"it (check its and its folder's permissions)") from None


def check_url(url: str) -> None:
    """Before anything else is done: a URL that cannot be parsed, or a database server that cannot be reached, is
    refused. Nothing is created (a SQLite file is only made when the storage is opened, after the data and models
    are known to be good)."""
    parsed = parse_url(url)
    if parsed.drivername.startswith("sqlite"):
        _check_sqlite_writable(parsed.database)
        return
    try:
        engine = sa.create_engine(url, **engine_kwargs(url))
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:  # drivers raise their own types; all mean the same thing to a user
        reason = _scrub(str(getattr(exc, "orig", exc) or exc).strip().splitlines()[0][:300], url)
        raise StorageError(f"cannot open storage {mask_url(url)}: {type(exc).__name__}: {reason}") from None


def open_storage(url: str, *, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 retry_callback=None, create: bool = True):
    """An `optuna.storages.RDBStorage`, or a clear StorageError naming the URL (password masked) and the cause.
    `create=False` (the commands that read a study): a SQLite file that is not there is an error, not a new
    database, so that a mistyped path creates no folders and no file."""
    import optuna

    parsed = parse_url(url)
    path = parsed.database if parsed.drivername.startswith("sqlite") else None
    if not create and path and path != ":memory:" and not Path(path).is_file():
        raise StorageError(f"storage {mask_url(url)}: no such SQLite file ({Path(path).expanduser().resolve()}); "
                           f"nothing was created")
    for wait in (*SCHEMA_RACE_WAITS, None):
        try:
            if url.startswith("sqlite") and create:
                _prepare_sqlite(url)
            storage = optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs(url), heartbeat_interval=heartbeat_interval,
                grace_period=grace_period, heartbeat_stale_trial_callback=retry_callback)
            _metadata.create_all(storage.engine, checkfirst=True)
            return storage
        except StorageError:
            raise
        except Exception as exc:  # drivers raise their own types; all mean the same thing to a user
            if wait is not None and path is None and _lost_schema_race(exc):
                time.sleep(wait)  # the other worker has made the tables by now: the next try finds them
                continue
            reason = _scrub(str(getattr(exc, "orig", exc) or exc).strip().splitlines()[0][:300], url)
            raise StorageError(f"cannot open storage {mask_url(url)}: {type(exc).__name__}: {reason}") from None


# Several workers started at once on a new server database all create the tables; PostgreSQL lets one win and
# answers the others with a unique violation on its catalog (pg_type_typname_nsp_index), MySQL with "already exists".
SCHEMA_RACE_WAITS = (0.5, 1.0, 2.0, 4.0)


def _lost_schema_race(exc: BaseException) -> bool:
    text = str(getattr(exc, "orig", exc) or exc)
    return isinstance(exc, (sa.exc.IntegrityError, sa.exc.ProgrammingError, sa.exc.OperationalError)) and any(
        marker in text for marker in ("pg_type_typname_nsp_index", "already exists", "Duplicate entry"))


# ---------------------------------------------------------------------------------------------------------------
# Budget slots


def db_now(conn) -> dt.datetime:
    """The database's clock, as a naive UTC datetime. Workers on several machines share one database but not one
    clock, so a slot's age is measured on the database's."""
    now = conn.execute(sa.select(sa.func.current_timestamp())).scalar_one()
    if isinstance(now, str):  # SQLite: 'YYYY-MM-DD HH:MM:SS', in UTC
        now = dt.datetime.fromisoformat(now)
    if now.tzinfo is not None:
        now = now.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return now


def claim_slot(engine, study_name: str, budget: int) -> int | None:
    """Claim the lowest free slot below `budget`; None when the budget is spent. Atomic across processes."""
    with engine.begin() as conn:
        now = db_now(conn)
        stale_before = now - dt.timedelta(minutes=30)
        # A worker that died between claiming and asking leaves a slot with no trial; give it back after a while.
        conn.execute(sa.delete(slots_table).where(slots_table.c.study_name == study_name,
                                                  slots_table.c.trial_number.is_(None),
                                                  slots_table.c.claimed_at < stale_before))
    with engine.connect() as conn:
        taken = {r[0] for r in conn.execute(sa.select(slots_table.c.slot).where(slots_table.c.study_name == study_name))}
    for slot in range(budget):
        if slot in taken:
            continue
        try:
            with engine.begin() as conn:
                conn.execute(sa.insert(slots_table).values(study_name=study_name, slot=slot, trial_number=None,
                                                           worker=worker_id(), claimed_at=now))
            return slot
        except sa.exc.IntegrityError:
            continue
    return None


def bind_slot(engine, study_name: str, slot: int, trial_number: int) -> None:
    with engine.begin() as conn:
        conn.execute(sa.update(slots_table).where(slots_table.c.study_name == study_name, slots_table.c.slot == slot)
                     .values(trial_number=trial_number))


def release_slot(engine, study_name: str, slot: int) -> None:
    with engine.begin() as conn:
        conn.execute(sa.delete(slots_table).where(slots_table.c.study_name == study_name, slots_table.c.slot == slot))


# ---------------------------------------------------------------------------------------------------------------
# Promotions


def record_promotion(engine, **values) -> None:
    values.setdefault("created_at", dt.datetime.now())
    with engine.begin() as conn:
        conn.execute(sa.insert(promotions_table).values(**values))


def promotions(engine, study_name: str) -> list[dict]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(promotions_table).where(promotions_table.c.study_name == study_name)
                            .order_by(promotions_table.c.id))
        return [dict(r._mapping) for r in rows]
