"""Checkpoints as revisions: a trial pushes each checkpoint to a private repository while it trains (tagged
`step-N`, as the original recipe did with hub_strategy="every_save"), `tuner promote --checkpoint STEP` publishes a
chosen checkpoint as its own tagged commit, promotions list them, and `tuner predict --revision` loads exactly the
one asked for. All against the real `huggingface_hub` client talking to the local Hub stand-in."""

from __future__ import annotations

import json

import optuna
import pytest

from conftest import HUB_TOKEN as TOKEN
from conftest import hub_env, tiny_sweep, tuner

DESCRIPTION = ("Loose round diamond: 0.30 carat, Ideal cut, colour E, clarity VS2, depth 61.5%, table 55, "
               "measures 4.30 x 4.33 x 2.65 mm.")


def archived(root, trial, step: int):
    """The trial's checkpoint at `step` as the artifact store keeps it (unpacked into a folder of its own)."""
    from tuner import artifacts

    dest = root / "archived" / f"step-{step}"
    if not dest.is_dir():
        artifacts.extract_checkpoint(artifacts.open_store(root / "artifacts", create=False), trial, step, dest)
    return dest


@pytest.fixture(scope="module")
def pushed(tmp_path_factory, hub):
    """One 16-bit trial of 6 steps, checkpoints every 2 steps (2 and 4; the end is the trial's own adapter),
    pushed to the stand-in while it trains."""
    root = tmp_path_factory.mktemp("revisions")
    sweep = tiny_sweep(root, name="revs", trials=1, train_rows=24, test_rows=8, quant="16", wandb="disabled",
                       train_extra=", checkpoint_every: 2, eval_every: 2, eval_rows: 8",
                       extra="  hub: {push_checkpoints: true, repo: tuner-test/revs}\n")
    text = sweep.read_text().replace("tracking: {wandb: {mode: disabled}}\n", "tracking:\n  wandb: {mode: disabled}\n")
    sweep.write_text(text)
    url = f"sqlite:///{root}/studies.db"
    res = tuner(["run", str(sweep), "--storage", url], root, env=hub_env(hub, root / "hf"), timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    return root, url, sweep


def test_checkpoints_are_pushed_while_training_and_kept_for_promotion(pushed, hub):
    root, url, _ = pushed
    trial = optuna.load_study(study_name="revs", storage=url).trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.user_attrs["checkpoint_steps"] == [2, 4]
    pushed_attr = trial.user_attrs["hub_checkpoints"]
    assert pushed_attr["repo"] == "tuner-test/revs-trial-0"
    repo = hub.repo("tuner-test/revs-trial-0")
    assert repo.private
    assert repo.tags == {"step-2": pushed_attr["commits"]["2"], "step-4": pushed_attr["commits"]["4"]}
    assert repo.tags["step-2"] != repo.tags["step-4"]  # one commit per checkpoint
    for step in (2, 4):
        files = hub.files("tuner-test/revs-trial-0", f"step-{step}")
        assert json.loads(files["tuner.json"])["checkpoint_step"] == step
        local = archived(root, trial, step)
        assert files["adapter_model.safetensors"] == (local / "adapter_model.safetensors").read_bytes()
    # Kept once: in the artifact store, no longer in the COMPLETE trial's run folder.
    assert not (root / "runs" / "revs" / "trial-0000" / "checkpoints").exists()
    assert TOKEN not in json.dumps(trial.user_attrs)
    assert not hub.state.unhandled


def test_promote_checkpoints_as_tagged_commits_and_predict_each(pushed, hub, tmp_path):
    from tuner.storage import open_storage, promotions

    root, url, _ = pushed
    env = hub_env(hub, tmp_path / "hf")
    commits = {}
    for step in (2, 4):
        res = tuner(["promote", "revs", "--checkpoint", str(step), "--repo", "tuner-test/chosen", "--storage", url],
                    root, env=env)
        assert res.returncode == 0, res.stdout + res.stderr
        commits[step] = hub.repo("tuner-test/chosen").branches["main"]
        assert f"promoted trial 0 (checkpoint at step {step})" in res.stdout
        assert f"tag trial-0-step-{step}" in res.stdout and f"commit {commits[step]}" in res.stdout
    repo = hub.repo("tuner-test/chosen")
    assert commits[2] != commits[4]
    assert repo.tags == {"trial-0-step-2": commits[2], "trial-0-step-4": commits[4]}
    card = hub.files("tuner-test/chosen", "trial-0-step-2")["README.md"].decode()
    assert "training checkpoint at step 2" in card and "This checkpoint (step 2) was not scored on the test" in card
    trial = optuna.load_study(study_name="revs", storage=url).trials[0]
    for step in (2, 4):
        local = archived(root, trial, step)
        files = hub.files("tuner-test/chosen", f"trial-0-step-{step}")
        assert files["adapter_model.safetensors"] == (local / "adapter_model.safetensors").read_bytes()

    records = promotions(open_storage(url).engine, "revs")
    assert [(r["checkpoint_step"], r["tag"], r["revision"]) for r in records] == \
        [(2, "trial-0-step-2", commits[2]), (4, "trial-0-step-4", commits[4])]
    status = tuner(["status", "revs", "--storage", url], root)
    assert status.returncode == 0
    for step in (2, 4):
        assert f"promoted: trial 0 checkpoint {step} -> tuner-test/chosen @ {commits[step][:12]} " \
               f"tag trial-0-step-{step}" in status.stdout

    # The same checkpoint again: refused before anything is uploaded.
    n_commits = len(repo.commits)
    again = tuner(["promote", "revs", "--checkpoint", "2", "--repo", "tuner-test/chosen", "--storage", url], root,
                  env=env)
    assert again.returncode == 2 and "already has tag trial-0-step-2" in again.stderr
    assert len(repo.commits) == n_commits

    # predict at each tag loads exactly that commit; the two checkpoints are different adapters.
    prices = {}
    for step in (2, 4):
        res = tuner(["predict", "--adapter", "tuner-test/chosen", "--revision", f"trial-0-step-{step}", DESCRIPTION],
                    tmp_path, env=env)
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"tuner-test/chosen@trial-0-step-{step} = {commits[step][:12]}" in res.stdout
        prices[step] = res.stdout
    downloads = [r.path for r in hub.state.requests if "/resolve/" in r.path and "tuner-test/chosen" in r.path]
    assert {p.split("/resolve/")[1].split("/")[0] for p in downloads} == set(commits.values())


def test_bad_checkpoint_and_revision_requests(pushed, hub, tmp_path):
    root, url, _ = pushed
    env = hub_env(hub, tmp_path / "hf")
    res = tuner(["promote", "revs", "--checkpoint", "3", "--repo", "tuner-test/other", "--storage", url], root,
                env=env)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].endswith(
        "--checkpoint 3: trial 0 has no checkpoint at step 3; saved: 2, 4"), res.stderr
    assert "tuner-test/other" not in hub.state.repos
    res = tuner(["predict", "--adapter", "tuner-test/revs-trial-0", "--revision", "step-3", DESCRIPTION], tmp_path,
                env=env)
    assert res.returncode == 2 and "--revision 'step-3': no such branch, tag or commit" in res.stderr


def test_without_a_token_the_worker_says_so_once_and_trains_on(tmp_path, hub):
    sweep = tiny_sweep(tmp_path, name="notoken", trials=1, train_rows=16, test_rows=8, quant="16", wandb="disabled",
                       train_extra=", checkpoint_every: 1",
                       extra="  hub: {push_checkpoints: true, repo: tuner-test/never}\n")
    sweep.write_text(sweep.read_text().replace("tracking: {wandb: {mode: disabled}}\n",
                                               "tracking:\n  wandb: {mode: disabled}\n"))
    url = f"sqlite:///{tmp_path}/studies.db"
    res = tuner(["run", str(sweep), "--storage", url], tmp_path, env=hub_env(hub, tmp_path / "hf", token=None))
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout + res.stderr
    assert out.count("no Hugging Face token") == 1, out
    trial = optuna.load_study(study_name="notoken", storage=url).trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.user_attrs["hub_push"] == "skipped: no Hugging Face token"
    assert trial.user_attrs["checkpoint_steps"] == [1, 2, 3]
    assert not any(r.startswith("tuner-test/never") for r in hub.state.repos)
