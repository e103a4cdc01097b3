"""Issue 16: tuner where users already work. `--version`, help on every argument, `--format json|csv` that scripts
parse, `tuner export`, `--set KEY=VALUE` validated like the file, `tuner init`, `tuner clean`; one duration and `r`
(never `r_exp`) everywhere a user reads; local promotion targets whole; a promoted adapter that peft's
`AutoPeftModelForCausalLM` loads; the model cache in the user's cache folder; run folders beside the storage;
checkpoints kept once; no third-party progress bars in logs; `import tuner` changes nothing global."""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys

import optuna

from conftest import REPO, assert_peft_holds_the_saved_adapter, tiny_sweep, tuner


def _one_line_error(res, expected: str) -> str:
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], res.stderr
    return lines[0]


def test_version_and_help_on_every_argument():
    import tuner as pkg
    from tuner.cli import build_parser

    res = tuner(["--version"], REPO)
    assert res.returncode == 0 and res.stdout.strip() == f"tuner {pkg.__version__}", res.stdout + res.stderr
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"tuner {name} {action.dest}" for name, sub in commands.choices.items() for action in sub._actions
               if not (action.help or "").strip()]
    assert not missing, missing
    assert {"export", "init", "clean"} <= set(commands.choices)


def test_import_changes_no_environment_variable_nor_warning_filter():
    code = """
import logging, os, warnings
env, filters = dict(os.environ), list(warnings.filters)
levels = {n: logging.getLogger(n).level for n in ("transformers", "bitsandbytes.backends.cpu.ops")}
import tuner
assert dict(os.environ) == env, set(os.environ.items()) ^ set(env.items())
assert warnings.filters == filters
# The modules the API and the CLI import pull in numpy, optuna, torch: their own filters are theirs; none is tuner's.
import tuner.api, tuner.cli, tuner.worker
from tuner.quiet import WARNINGS, scoped
theirs = list(warnings.filters)
assert not [f for f in theirs if f[1] is not None and f[1].pattern in WARNINGS]
assert dict(os.environ) == env, set(os.environ.items()) ^ set(env.items())
with scoped():
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    assert [f for f in warnings.filters if f[1] is not None and f[1].pattern in WARNINGS]
assert dict(os.environ) == env and warnings.filters == theirs
assert {n: logging.getLogger(n).level for n in levels} == levels
assert callable(tuner.run) and callable(tuner.load) and callable(tuner.predict)
print("unchanged")
"""
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("TOKENIZERS_PARALLELISM",)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert res.returncode == 0 and res.stdout.strip() == "unchanged", res.stdout + res.stderr


def test_set_overrides_are_validated_like_the_file(tmp_path):
    from tuner.config import load_config

    sweep = tiny_sweep(tmp_path)
    db = tmp_path / "s.db"
    url = f"sqlite:///{db}"
    by_set = _one_line_error(tuner(["run", str(sweep), "--set", "search.r=48", "--storage", url], tmp_path),
                             "search.r: expected a power of two")
    in_file = tmp_path / "r48.yaml"
    in_file.write_text(sweep.read_text().replace("r: {min: 8, max: 16}", "r: 48"))
    by_file = _one_line_error(tuner(["run", str(in_file), "--storage", url], tmp_path), "search.r")
    # The same words; only the source differs: the --set that put the value there, or the file.
    assert by_set == "error: --set search.r=48: search.r: expected a power of two (8, 16, 32, ...), got 48"
    assert by_file == f"error: {in_file}: search.r: expected a power of two (8, 16, 32, ...), got 48"

    _one_line_error(tuner(["run", str(sweep), "--set", "search.r", "--storage", url], tmp_path), "KEY=VALUE")
    _one_line_error(tuner(["run", str(sweep), "--set", "nosuch.key=1", "--storage", url], tmp_path),
                    "--set nosuch.key=1: nosuch: expected a sweep section or key")
    _one_line_error(tuner(["run", str(sweep), "--set", "search.rank=8", "--storage", url], tmp_path),
                    "--set search.rank=8: search.rank: expected a known key (unknown key; allowed here: r, alpha")
    _one_line_error(tuner(["run", str(sweep), "--set", "study.trials=0", "--storage", url], tmp_path),
                    "--set study.trials=0: study.trials: expected a value >= 1")
    _one_line_error(tuner(["run", str(sweep), "--set", "model=builtin:smollm2-135m-instruct", "--set", "model.name=x",
                           "--storage", url], tmp_path), "--set model.name=x: model: expected a mapping to set name in")
    _one_line_error(tuner(["data", str(sweep), "--set", "data.train_rows=many"], tmp_path),
                    "--set data.train_rows=many: data.train_rows: expected an integer")
    assert not db.exists()  # refused before the storage is opened

    cfg = load_config(sweep, ["search.r={min: 8, max: 32}", "study.name=first", "study.name=second",
                              "train.max_length=auto", "model=HuggingFaceTB/SmolLM2-135M"])
    assert cfg.search.r.values() == [8, 16, 32] and cfg.study.name == "second"  # a later --set wins
    assert cfg.train.max_length.value == "auto" and cfg.model.name == "HuggingFaceTB/SmolLM2-135M"
    assert load_config(sweep).search.r.values() == [8, 16]  # the file itself is not touched


def test_init_writes_the_starters_the_package_ships(tmp_path):
    from importlib import resources

    from tuner.config import load_config

    dest = tmp_path / "mine.yaml"
    res = tuner(["init", str(dest)], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    text = dest.read_text()
    assert text.startswith("# Written by `tuner init`") and text.count("\n#") > 5  # commented
    shipped = resources.files("tuner").joinpath("sweeps", "default.yaml")
    assert shipped.is_file()
    ours, packaged = load_config(dest).model_dump(), load_config(REPO / "sweeps" / "default.yaml").model_dump()
    ours.pop("source_file"), packaged.pop("source_file")
    assert ours == packaged

    gpu = tmp_path / "gpu.yaml"
    assert tuner(["init", str(gpu), "--gpu"], tmp_path).returncode == 0
    assert load_config(gpu).model.name == "meta-llama/Llama-3.1-8B"
    _one_line_error(tuner(["init", str(dest), "--gpu"], tmp_path), "exists; choose another path or pass --force")
    assert dest.read_text() == text
    assert tuner(["init", str(dest), "--gpu", "--force"], tmp_path).returncode == 0
    assert load_config(dest).model.name == "meta-llama/Llama-3.1-8B"


def test_status_best_report_and_export_for_scripts(swept, tmp_path):
    import pandas as pd

    from tuner import fmt

    study = swept.study()
    trials = {t.number: t for t in study.trials}

    res = tuner(["status", "shared", "--format", "json", "--storage", swept.url], tmp_path)
    assert res.returncode == 0, res.stderr
    status = json.loads(res.stdout)  # nothing but JSON on stdout
    assert "r_exp" not in res.stdout and "NaN" not in res.stdout
    rows = [r for r in status["leaderboard"] if r["kind"] == "trial"]
    assert sorted(r["number"] for r in rows) == sorted(trials)
    for r in rows:
        t = trials[r["number"]]
        assert r["r"] in (8, 16) and r["bits"] == 4  # the fixed quant_bits as its value
        if t.state.name == "COMPLETE":
            assert r["duration_s"] == t.user_attrs["duration_s"] == fmt.trial_duration(t)
            # The one duration is the study's start-to-end, but for the time `tell` takes to record the end.
            assert 0 <= (t.datetime_complete - t.datetime_start).total_seconds() - r["duration_s"] < 10
    assert {b["name"] for b in status["leaderboard"] if b["kind"] == "baseline"} >= {"median", "classical"}
    assert status["best_trial"] == study.best_trial.number

    res = tuner(["status", "shared", "--format", "csv", "--storage", swept.url], tmp_path)
    table = list(csv.DictReader(io.StringIO(res.stdout)))
    assert [int(r["number"]) for r in table if r["kind"] == "trial"] == [r["number"] for r in rows]

    res = tuner(["status", "shared", "--storage", swept.url], tmp_path)
    assert "fixed" not in res.stdout
    for t in trials.values():
        if t.state.name == "COMPLETE":
            assert fmt.secs(fmt.trial_duration(t)) in res.stdout

    best = json.loads(tuner(["best", "shared", "--format", "json", "--storage", swept.url], tmp_path).stdout)
    assert best["number"] == study.best_trial.number and best["value"] == study.best_trial.value
    assert "r" in best["params"] and "r_exp" not in best["params"]
    assert best["params"]["r"] == study.best_trial.user_attrs["r"]
    plain = tuner(["best", "shared", "--storage", swept.url], tmp_path).stdout
    assert "param r " in plain and "r_exp" not in plain
    assert list(csv.DictReader(io.StringIO(tuner(["best", "shared", "--format", "csv", "--storage", swept.url],
                                                   tmp_path).stdout)))[0]["key"] == "number"

    res = tuner(["report", "shared", "--format", "json", "--storage", swept.url], tmp_path)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert "r_exp" not in res.stdout
    assert report["importances"]["trials"] == sum(t.state.name == "COMPLETE" for t in trials.values())
    res = tuner(["report", "shared", "--format", "csv", "--storage", swept.url], tmp_path)
    assert {r["kind"] for r in csv.DictReader(io.StringIO(res.stdout))} >= {"trial", "baseline"}

    for name in ("trials.csv", "trials.parquet"):
        res = tuner(["export", "shared", "--out", str(tmp_path / name), "--storage", swept.url], tmp_path)
        assert res.returncode == 0, res.stdout + res.stderr
        frame = pd.read_csv(tmp_path / name) if name.endswith(".csv") else pd.read_parquet(tmp_path / name)
        assert sorted(frame["number"]) == sorted(trials)
        assert {"state", "value", "param_r", "param_learning_rate", "param_quant_bits", "mae", "rmsle",
                "hit_rate", "duration_s", "datetime_start", "datetime_complete"} <= set(frame.columns)
        assert "param_r_exp" not in frame.columns
        for _, r in frame.iterrows():
            t = trials[int(r["number"])]
            assert r["state"] == t.state.name and int(r["param_r"]) == t.user_attrs["r"]
            if t.state.name == "COMPLETE":
                assert abs(r["duration_s"] - fmt.trial_duration(t)) < 1e-6 and abs(r["mae"] - t.user_attrs["mae"]) < 1e-9
    _one_line_error(tuner(["export", "shared", "--out", str(tmp_path / "t.xlsx"), "--storage", swept.url], tmp_path),
                    "expected a file name ending in .csv or .parquet")


def test_promoted_adapter_loads_with_auto_peft_and_is_listed_whole(swept, tmp_path):
    from peft import AutoPeftModelForCausalLM

    from tuner import fmt
    from tuner.models import builtin_folder

    dest = tmp_path / "a-rather-long-folder-name-for-the-promoted-adapter"
    res = tuner(["promote", "shared", "--to", str(dest), "--storage", swept.url], swept.root)  # the best trial
    assert res.returncode == 0, res.stdout + res.stderr
    config = json.loads((dest / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(builtin_folder())  # tuner's converted copy, a real folder
    model = AutoPeftModelForCausalLM.from_pretrained(str(dest))  # peft alone, nothing of tuner's
    assert_peft_holds_the_saved_adapter(model, dest)

    card = (dest / "README.md").read_text()
    trial = swept.study().best_trial
    assert "AutoPeftModelForCausalLM.from_pretrained" in card and "builtin_folder()" in card
    assert f"in {fmt.secs(fmt.trial_duration(trial))}" in card and "r_exp" not in card

    status = tuner(["status", "shared", "--storage", swept.url], tmp_path)
    assert f"-> {dest} (" in status.stdout.replace("\n", "")  # the whole path, not 12 characters of it


def test_run_with_set_from_elsewhere_fresh_user_cache_and_clean(tmp_path):
    """One real trial: the sweep's values overridden with --set, the built-in model converted into
    $XDG_CACHE_HOME/tuner (no TUNER_CACHE), run folders beside the SQLite file though tuner runs from another
    folder, no progress bar in the captured output, the run line's duration the study's, checkpoints kept once
    (in the artifact store, not the run folder), and `tuner clean` removing the finished trial's run folder."""
    from tuner import fmt

    study_dir, elsewhere, xdg = tmp_path / "study", tmp_path / "elsewhere", tmp_path / "xdg"
    study_dir.mkdir()
    elsewhere.mkdir()
    sweep = study_dir / "sweep.yaml"
    sweep.write_text("study: {name: file-name, trials: 3}\n"
                     "search: {r: 8, quant_bits: 16, learning_rate: 1.0e-3}\n"
                     "train: {batch_size: 4}\n"
                     "scoring: {batch_size: 16}\n"
                     "tracking: {wandb: {mode: disabled}}\n")
    url = f"sqlite:///{study_dir}/studies.db"
    env = {"TUNER_CACHE": None, "XDG_CACHE_HOME": str(xdg)}
    res = tuner(["run", str(sweep), "--storage", url, "--set", "study.name=from-set", "--set", "study.trials=1",
                 "--set", "search.learning_rate=2.0e-3", "--set", "data={train_rows: 8, val_rows: 8, test_rows: 8}",
                 "--set", "train.checkpoint_every=1"], elsewhere, env=env, timeout=1500)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert (xdg / "tuner" / "models" / "smollm2-135m-instruct" / "config.json").is_file()
    assert "%|" not in out and "\r" not in out, out  # no tqdm bar (the GGUF conversion's was one)

    trial = optuna.load_study(study_name="from-set", storage=url).trials[0]
    assert trial.state.name == "COMPLETE" and trial.user_attrs["learning_rate"] == 2e-3
    assert "trial 0 COMPLETE" in out and f"({fmt.secs(trial.user_attrs['duration_s'])})" in out

    run_dir = study_dir / "runs" / "from-set" / "trial-0000"
    assert run_dir.is_dir() and not (elsewhere / "runs").exists()
    # Archived in the store ... (the last step's checkpoint is a resume point only, not archived: the kept adapter
    # is the end of training)
    assert trial.user_attrs["checkpoint_steps"] == [1]
    assert not (run_dir / "checkpoints").exists()  # ... and nowhere else
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()

    res = tuner(["clean", "from-set", "--storage", url, "--dry-run"], elsewhere)
    assert res.returncode == 0 and "would remove 1 run folder" in res.stdout and run_dir.is_dir(), res.stdout
    res = tuner(["clean", "from-set", "--storage", url], elsewhere)
    assert res.returncode == 0 and "removed 1 run folder" in res.stdout, res.stdout + res.stderr
    assert str(study_dir / "runs" / "from-set") in res.stdout.replace("\n", "") and not run_dir.exists()
    assert tuner(["status", "from-set", "--storage", url], elsewhere).returncode == 0
