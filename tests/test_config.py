"""Sweep files: every bad input is one line naming the file, the key and what is expected, exit code 2, and
nothing is loaded first."""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import REPO, tuner_cmd
from tuner.config import Dim, load_config, parse_config
from tuner.errors import ConfigError

BAD = [
    ({"search": {"r": 48}}, "search.r", "a power of two"),
    ({"search": {"r": {"min": 8, "max": 48}}}, "search.r.max", "a power of two"),
    ({"search": {"alpha": 0}}, "search.alpha", "alpha > 0"),
    ({"search": {"alpha": -4}}, "search.alpha", "alpha > 0"),
    ({"search": {"dropout": 1.0}}, "search.dropout", "[0, 1)"),
    ({"search": {"dropout": {"low": -0.1, "high": 0.2}}}, "search.dropout", "[0, 1)"),
    ({"search": {"target_modules": {"choices": []}}}, "search.target_modules", "non-empty"),
    ({"search": {"target_modules": "everything"}}, "search.target_modules", "a target set among"),
    ({"search": {"quant_bits": 3}}, "search.quant_bits", "one of [4, 8, 16]"),
    ({"search": {"quant_bits": {"choices": [4, 2]}}}, "search.quant_bits", "one of [4, 8, 16]"),
    ({"search": {"learning_rate": {"low": 0, "high": 1e-3, "log": True}}}, "search.learning_rate", ""),
    ({"serach": {}}, "serach", "unknown key"),
    ({"train": {"batch_sise": 4}}, "train.batch_sise", "allowed here: epochs, max_steps, batch_size"),
    ({"train": {"batch_size": "eight"}}, "train.batch_size", "an integer"),
    ({"train": {"batch_size": 0}}, "train.batch_size", "an integer from 1 to"),
    ({"data": {"train_rows": -5}}, "data.train_rows", ">= 1"),
    ({"study": {"objective": "accuracy"}}, "study.objective", "one of mae, rmsle or hit_rate"),
    ({"study": {"pruner": {"type": "median"}}}, "train.eval_every", "pruning needs intermediate values"),
    ({"study": {"timeout": "soon"}}, "study.timeout", "a duration"),
    ({"study": {"deadline": "-15m"}}, "study.deadline", "a duration"),
    ({"study": {"pruner": {"until": 0.5}}}, "study.pruner.until",
     "no until with type none (it applies to median, successive_halving and hyperband only)"),
    ({"study": {"pruner": {"type": "median", "until": 0}}, "train": {"eval_every": 5}}, "study.pruner.until",
     "a value > 0"),
    ({"study": {"pruner": {"type": "median", "until": 1.5}}, "train": {"eval_every": 5}}, "study.pruner.until",
     "a value <= 1.0, got 1.5"),
    ({"study": {"pruner": {"type": "successive_halving", "n_startup_trials": 2}}, "train": {"eval_every": 5}},
     "study.pruner.n_startup_trials", "no n_startup_trials with type successive_halving (it applies to median only)"),
    ({"study": {"pruner": {"type": "median", "reduction_factor": 4}}, "train": {"eval_every": 5}},
     "study.pruner.reduction_factor", "applies to successive_halving and hyperband only"),
    ({"search": {"dropout": [0.1, 0.2]}}, "search.dropout", "{choices: [0.1, 0.2]}"),
    ({"model": {"name": "builtin:gpt-5"}}, "model.name", "builtin:smollm2-135m-instruct"),
    ({"data": {"source": "prices.xlsx"}}, "data.source", ".csv/.jsonl/.parquet"),
]


@pytest.mark.parametrize("data,key,expected", BAD, ids=[b[1] + ":" + str(i) for i, b in enumerate(BAD)])
def test_bad_values_name_file_key_and_expectation(data, key, expected):
    with pytest.raises(ConfigError) as info:
        parse_config(data, "sweeps/bad.yaml")
    first = str(info.value).splitlines()[0]
    assert first.startswith(f"sweeps/bad.yaml: {key}: expected"), first
    assert expected in first, first


def test_good_file_parses_into_dims():
    cfg = parse_config({"search": {"r": {"min": 8, "max": 64}, "alpha": {"ratio": {"choices": [1, 2, 4]}},
                                   "learning_rate": {"low": "1e-5", "high": 1e-3, "log": True}},
                        "train": {"batch_size": {"choices": [4, 8]}, "epochs": 2}})
    assert cfg.search.r.values() == [8, 16, 32, 64]
    assert cfg.search.alpha.ratio == Dim("choices", choices=(1.0, 2.0, 4.0))
    assert cfg.search.learning_rate.log and cfg.search.learning_rate.low == 1e-5
    assert cfg.train.batch_size.choices == (4, 8)
    assert cfg.train.epochs.value == 2
    assert cfg.study.direction == "minimize"


def test_shipped_sweeps_are_valid():
    for path in sorted((REPO / "sweeps").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.source_file == str(path)
    recipe = load_config(REPO / "sweeps" / "pricer-llama31-8b.yaml")
    assert recipe.model.name == "meta-llama/Llama-3.1-8B"
    assert recipe.search.r.values() == [32] and recipe.search.alpha.value == 64
    assert recipe.search.target_modules.value == "attention" and recipe.search.quant_bits.value == 4
    assert recipe.train.optimizer.value == "paged_adamw_32bit" and recipe.train.max_length.value == 182
    assert recipe.train.max_grad_norm.value == 0.3 and recipe.train.warmup_ratio.value == 0.03


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("study:\n  name: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: expected valid YAML")
    assert "line" in str(info.value)


def _cli(args, tmp_path):
    env = {**os.environ, "TUNER_CACHE": str(tmp_path / "cache")}
    return subprocess.run(tuner_cmd() + args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


@pytest.mark.parametrize("text,needle", [
    ("search:\n  r: 12\n", "search.r: expected a power of two"),
    ("search:\n  dropout: 1.5\n", "search.dropout: expected a number in [0, 1)"),
    ("search:\n  quant_bits: 2\n", "search.quant_bits: expected one of [4, 8, 16]"),
    ("bogus: 1\n", "bogus: expected a known key"),
    ("study: {name: [\n", "expected valid YAML"),
])
def test_cli_exits_2_with_one_line_before_loading_anything(tmp_path, text, needle):
    sweep = tmp_path / "bad.yaml"
    sweep.write_text(text)
    res = _cli(["run", str(sweep), "--storage", f"sqlite:///{tmp_path}/s.db"], tmp_path)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and str(sweep) in lines[0], res.stderr
    assert not (tmp_path / "cache").exists(), "a model was resolved before the config was checked"
    assert not (tmp_path / "s.db").exists(), "storage was touched before the config was checked"


def test_cli_unreachable_storage_is_a_clear_error_before_any_model(tmp_path):
    sweep = tmp_path / "ok.yaml"
    sweep.write_text("study: {name: x}\n")
    res = _cli(["run", str(sweep), "--storage", "postgresql://nobody@127.0.0.1:1/nowhere"], tmp_path)
    assert res.returncode == 2
    assert "cannot open storage postgresql://nobody@127.0.0.1:1/nowhere" in res.stderr
    assert not (tmp_path / "cache").exists()
    res = _cli(["run", str(sweep), "--storage", "not a url"], tmp_path)
    assert res.returncode == 2 and "not a database URL" in res.stderr
