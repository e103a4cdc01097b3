"""`tuner predict`: a promoted adapter, from a folder or from the Hub stand-in at a pinned revision, loaded on the
base it was trained on (same quantization) with `PeftModel.from_pretrained`, gives the prices the trial itself
scored on its test rows; a base model of another architecture is refused before any weights load."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from conftest import SWEPT_TEST_ROWS as TEST_ROWS
from conftest import HUB_TOKEN as TOKEN
from conftest import hub_env, tuner


@pytest.fixture(scope="module")
def published(swept, hub, tmp_path_factory):
    """Trial 0 and then trial 1 promoted to one private repository (two commits; the first also tagged), and
    trial 0 promoted to a folder."""
    root = tmp_path_factory.mktemp("published")
    env = hub_env(hub, root / "hf")
    commits = {}
    for n in (0, 1):
        res = tuner(["promote", "shared", "--trial", str(n), "--repo", "tuner-test/predictor", "--storage",
                     swept.url], swept.root, env=env)
        assert res.returncode == 0, res.stdout + res.stderr
        commits[n] = hub.repo("tuner-test/predictor").branches["main"]
    hub.repo("tuner-test/predictor").tags["first"] = commits[0]  # what `promote --checkpoint` will tag
    folder = root / "trial-0"
    res = tuner(["promote", "shared", "--trial", "0", "--to", str(folder), "--storage", swept.url], swept.root)
    assert res.returncode == 0, res.stdout + res.stderr
    return {"commits": commits, "folder": folder, "root": root}


@pytest.fixture(scope="module")
def test_rows(swept, tmp_path_factory):
    """The study's test rows as a CSV file, and the trial predictions recorded for them."""
    from tuner import artifacts
    from tuner.config import DataSpec
    from tuner.data import load_splits

    test = load_splits(DataSpec(train_rows=16, val_rows=8, test_rows=TEST_ROWS)).test
    path = tmp_path_factory.mktemp("rows") / "rows.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "price"])
        for e in test:
            w.writerow([e.text, e.price])
    study = swept.study()
    store = artifacts.open_store(swept.store)
    recorded = {t.number: artifacts.read_predictions_csv(artifacts.fetch(store, t, artifacts.PREDICTIONS_ATTR,
                                                                         path.parent / f"{t.number}.csv"))
                for t in study.trials}
    return path, recorded


def _predictions(path: Path) -> list[float | None]:
    with open(path, newline="") as fh:
        return [float(r["prediction"]) if r["prediction"] else None for r in csv.DictReader(fh)]


def test_predict_from_the_hub_at_a_tag_gives_the_trials_own_prices(published, hub, test_rows, tmp_path):
    rows, recorded = test_rows
    first = published["commits"][0]
    assert hub.repo("tuner-test/predictor").branches["main"] != first  # main now holds trial 1
    before = len(hub.state.requests)
    out = tmp_path / "out.csv"
    res = tuner(["predict", "--adapter", "tuner-test/predictor", "--revision", "first", "--file", str(rows),
                 "--out", str(out)], tmp_path, env=hub_env(hub, tmp_path / "hf"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"tuner-test/predictor@first = {first[:12]}" in res.stdout and "study shared, trial 0" in res.stdout
    assert _predictions(out) == [r["prediction"] for r in recorded[0]]
    assert "MAE $" in res.stdout and TOKEN not in res.stdout + res.stderr

    # The tag was resolved once, then every file came from that commit, with the token (the repository is private).
    downloads = [r for r in hub.state.requests[before:] if "/resolve/" in r.path]
    assert {r.path.split("/resolve/")[1].split("/")[0] for r in downloads} == {first}
    assert {r.path.rsplit("/", 1)[1] for r in downloads} >= {"tuner.json", "adapter_config.json",
                                                              "adapter_model.safetensors"}
    assert all(r.authorized for r in downloads) and not hub.state.unhandled


def test_predict_from_a_folder_with_an_equivalent_base(published, swept, tmp_path):
    from tuner.config import ModelSpec
    from tuner.models import resolve_model

    local_copy = resolve_model(ModelSpec()).path  # the built-in model's converted folder: same weights
    res = tuner(["predict", "--adapter", str(published["folder"]), "--base", local_copy,
                 "Loose round diamond: 0.30 carat, Ideal cut, colour E, clarity VS2, depth 61.5%, table 55, "
                 "measures 4.30 x 4.33 x 2.65 mm."], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "is not the adapter's base 'builtin:smollm2-135m-instruct' by name" in res.stdout
    assert "study shared, trial 0" in res.stdout
    assert res.stdout.count("$") >= 1 and "Loose round diamond: 0.30 carat" in res.stdout


def _one_line_error(res, expected: str) -> None:
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], res.stderr


def test_refusals(published, hub, tmp_path):
    other = tmp_path / "other-base"
    other.mkdir()
    # Another architecture: only its config is read, the refusal comes before any weights would load.
    (other / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 49152}))
    _one_line_error(tuner(["predict", "--adapter", str(published["folder"]), "--base", str(other), "x"], tmp_path),
                    "was trained for base model 'builtin:smollm2-135m-instruct'; "
                    f"'{other}' is another model (hidden_size 576 vs 64")

    env = hub_env(hub, tmp_path / "hf")
    _one_line_error(tuner(["predict", "--adapter", "tuner-test/predictor", "--revision", "nope", "x"], tmp_path,
                          env=env), "--revision 'nope': no such branch, tag or commit in tuner-test/predictor")
    _one_line_error(tuner(["predict", "--adapter", "tuner-test/predictor", "x"], tmp_path,
                          env=hub_env(hub, tmp_path / "hf2", token=None)), "or it is private")
    _one_line_error(tuner(["predict", "--adapter", "tuner-test/missing", "x"], tmp_path, env=env),
                    "no such repository")

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "adapter_config.json").write_text("{}")
    _one_line_error(tuner(["predict", "--adapter", str(plain), "x"], tmp_path), "no tuner.json")
    # A tuner.json is anyone's file: its scoring settings size the scorer's work and are checked before any load.
    tampered = Path(shutil.copytree(published["folder"], tmp_path / "tampered"))
    info = json.loads((tampered / "tuner.json").read_text())
    info["scoring"].update(method="branch", branch_top_k=1_000_000)
    (tampered / "tuner.json").write_text(json.dumps(info))
    _one_line_error(tuner(["predict", "--adapter", str(tampered), "x"], tmp_path),
                    "tuner.json: scoring.branch_top_k: Input should be less than or equal to 10")
    _one_line_error(tuner(["predict", "--adapter", "no/such/thing", "x"], tmp_path), "no such folder")
    _one_line_error(tuner(["predict", "--adapter", str(plain)], tmp_path), "give a description or --file")
