"""The Python API: the README's example executed as it is, and a study read back as typed trials."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    found = re.search(r"<!-- api-example -->\n```python\n(.*?)```", text, re.S)
    assert found, "README.md has no <!-- api-example --> python block"
    return found.group(1)


def test_the_readme_example_runs(tmp_path):
    res = subprocess.run([sys.executable, "-c", readme_example()], capture_output=True, text=True, cwd=tmp_path,
                         timeout=1500)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("trained trials [0] in "), res.stdout
    number, state, r, mae, duration = lines[1].split()
    assert (number, state, r) == ("0", "COMPLETE", "8") and float(mae) >= 0 and float(duration) > 0
    assert lines[2].startswith("baseline MAE (train median): ")
    prices = eval(lines[3])  # a list of floats (or None where no number was answered)
    assert isinstance(prices, list) and len(prices) == 1
    assert (tmp_path / "notebook.db").is_file() and (tmp_path / "runs" / "notebook").is_dir()


def test_load_gives_typed_trials_baselines_and_the_best_adapter(swept):
    import tuner
    from tuner import fmt

    study = tuner.load("shared", storage=swept.url)
    frozen = {t.number: t for t in swept.study().trials}
    assert study.name == "shared" and study.objective == "mae" and study.direction == "minimize"
    assert [t.number for t in study.trials] == sorted(frozen)
    for t in study.trials:
        assert t.state == frozen[t.number].state.name and "r_exp" not in t.params
        assert t.params["r"] == frozen[t.number].user_attrs["r"] and t.params["quant_bits"] == 4
        assert t.duration_s == fmt.trial_duration(frozen[t.number])
        if t.state == "COMPLETE":
            assert t.metrics["mae"] == frozen[t.number].user_attrs["mae"]
    assert study.best.number == swept.study().best_trial.number
    assert (study.best_adapter / "adapter_model.safetensors").is_file()
    assert (study.best_adapter / "tuner.json").is_file()
    assert {"median", "classical"} <= set(study.baselines)
