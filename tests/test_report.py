"""`tuner report`: the leaderboard with baselines, parameter importances (and how many trials they rest on),
optimisation history, intermediate values and the best trial's scatter chart, as one self-contained HTML file plus
the PNGs, and as tables in a terminal."""

from __future__ import annotations

import base64
import re

import optuna

from conftest import tuner


def test_report_writes_self_contained_html_and_pngs(swept, tmp_path):
    from tuner import artifacts

    study = swept.study()
    best = study.best_trial
    out = tmp_path / "report"
    res = tuner(["report", "shared", "--out", str(out), "--storage", swept.url], swept.root)
    assert res.returncode == 0, res.stdout + res.stderr

    pngs = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert {"history.png", "intermediate.png", "best-scatter.png"} <= set(pngs)
    assert pngs["best-scatter.png"] == (swept.store / best.user_attrs[artifacts.SCATTER_ATTR]).read_bytes()
    html = (out / "index.html").read_text()
    embedded = [base64.b64decode(m) for m in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)]
    assert sorted(embedded) == sorted(pngs.values())  # every chart is in the page itself
    assert not re.search(r"(src|href)=['\"]?https?:", html)  # and nothing is fetched from elsewhere

    # Leaderboard: COMPLETE trials best first, the best marked, the baselines below.
    numbers = re.findall(r"<tr[^>]*><td class=\"\">(\d+)</td>", html)
    assert numbers[0] == str(best.number) and sorted(numbers) == ["0", "1"]
    assert "<tr class=\"best\">" in html and "COMPLETE *" in html
    base = study.user_attrs["baselines"]
    assert f"${base['median']['mae']:,.0f}" in html and "baseline: constant train median" in html
    assert "baseline: base model 4bit" in html
    assert f"${best.user_attrs['mae']:,.0f}" in html
    assert "PedAnovaImportanceEvaluator (Optuna's default evaluator) over 2 COMPLETE trial(s)" in html
    assert "Validation mae during training" in html and "Best trial (" in html

    # The terminal gets the same tables and says what the importances rest on.
    assert "leaderboard" in res.stdout and "baseline: constant train median" in res.stdout
    assert "parameter importances rest on 2 COMPLETE trial(s)" in res.stdout
    assert f"wrote {out / 'index.html'}" in res.stdout


def test_report_in_a_terminal_prints_tables_and_writes_nothing(swept, tmp_path):
    res = tuner(["report", "--storage", swept.url], tmp_path)  # the storage's only study
    assert res.returncode == 0, res.stdout + res.stderr
    study = swept.study()
    for t in study.trials:
        assert f"${t.user_attrs['mae']:,.0f}" in res.stdout
    assert "COMPLETE *" in res.stdout and "baseline: base model 4bit" in res.stdout
    assert list(tmp_path.iterdir()) == []


def test_report_of_a_study_without_complete_trials(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(study_name="nothing-yet", storage=url)
    t = study.ask()
    t.set_user_attr("fail_reason", "nan_loss")
    study.tell(t, state=optuna.trial.TrialState.FAIL)
    res = tuner(["report", "nothing-yet", "--storage", url, "--out", str(tmp_path / "r")], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "needs at least 2 COMPLETE trials, the study has 0" in res.stdout
    assert "no COMPLETE trial yet" in res.stdout and "nan_loss" in res.stdout
    html = (tmp_path / "r" / "index.html").read_text()
    assert "data:image/png" not in html and "no COMPLETE trial yet" in html
    assert not list((tmp_path / "r").glob("*.png"))


def test_importances_find_the_parameter_that_matters():
    """The evaluator is wired to the study as it is: a parameter that drives the objective ranks first."""
    from tuner.report import importances

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("lr", 0, 1) * 10 + t.suggest_float("noise", 0, 1) * 0.1, n_trials=30)
    imp = importances(study)
    assert imp.trials == 30 and list(imp.values)[0] == "lr" and imp.values["lr"] > 0.8
