"""Per-trial artifacts written by a real sweep: the predictions CSV, the scatter chart and the adapter archive in
Optuna's artifact store, named by trial user attributes; and the scatter chart's colours.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import optuna
import pytest

from conftest import SWEPT_TEST_ROWS as TEST_ROWS

def test_each_complete_trial_has_its_artifacts_in_the_store(swept, tmp_path):
    from PIL import Image

    from tuner import artifacts
    from tuner.config import DataSpec
    from tuner.data import load_splits
    from tuner import fmt
    from tuner.scoring import answer_spread, price_metrics

    study = swept.study()
    # Default location: next to the SQLite file, and recorded on the study for commands without the sweep file.
    assert study.user_attrs[artifacts.STORE_ATTR] == str(swept.store)
    store = artifacts.open_store(swept.store)
    test = load_splits(DataSpec(train_rows=16, val_rows=8, test_rows=TEST_ROWS)).test
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 2
    for t in trials:
        metas = {m.artifact_id: m for m in optuna.artifacts.get_all_artifact_meta(t, storage=study._storage)}
        ids = {attr: t.user_attrs[attr] for attr in (artifacts.ADAPTER_ATTR, artifacts.PREDICTIONS_ATTR,
                                                     artifacts.SCATTER_ATTR)}
        assert set(ids.values()) == set(metas)
        assert metas[ids[artifacts.PREDICTIONS_ATTR]].mimetype == "text/csv"
        assert metas[ids[artifacts.SCATTER_ATTR]].mimetype == "image/png"
        assert metas[ids[artifacts.ADAPTER_ATTR]].mimetype == "application/zip"

        # The predictions are the test rows, in order, and reproduce the trial's recorded metrics.
        rows = artifacts.read_predictions_csv(artifacts.fetch(store, t, artifacts.PREDICTIONS_ATTR,
                                                              tmp_path / f"{t.number}.csv"))
        assert [r["row_id"] for r in rows] == [e.row_id for e in test]
        assert [r["truth"] for r in rows] == [e.price for e in test]
        m = price_metrics([r["prediction"] for r in rows], [r["truth"] for r in rows])
        assert m["mae"] == pytest.approx(t.user_attrs["mae"], abs=1e-6)
        assert m["hit_rate"] == pytest.approx(t.user_attrs["hit_rate"])
        # The spread of the answers is recorded from the same predictions, and the note follows it.
        spread = answer_spread([r["prediction"] for r in rows])
        assert {k: t.user_attrs[k] for k in spread} == spread
        assert t.user_attrs["collapsed"] == (spread["top_answer_share"] >= 0.5)
        assert ("collapsed" in fmt.trial_note(t)) == t.user_attrs["collapsed"]
        assert all(r["description"] and len(r["description"]) <= 100 for r in rows)

        png = artifacts.fetch(store, t, artifacts.SCATTER_ATTR, tmp_path / f"{t.number}.png")
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size == (700, 600)

        archive = artifacts.fetch(store, t, artifacts.ADAPTER_ATTR, tmp_path / f"{t.number}.zip")
        with zipfile.ZipFile(archive) as zf:
            assert sorted(zf.namelist()) == ["adapter_config.json", "adapter_model.safetensors", "tuner.json"]
            assert zf.read("adapter_model.safetensors") == \
                (Path(t.user_attrs["adapter_path"]) / "adapter_model.safetensors").read_bytes()
            info = artifacts.AdapterInfo.model_validate_json(zf.read("tuner.json"))
        assert info.study == "shared" and info.trial == t.number
        assert info.base_model == "builtin:smollm2-135m-instruct" and info.bits == 4
        assert info.quantization == t.user_attrs["quantization"]
        assert info.params["r"] == t.user_attrs["r"] and info.params["learning_rate"] == t.params["learning_rate"]
        assert info.base_fingerprint["hidden_size"] == 576 and info.max_price >= max(e.price for e in test)


def _pixels_near(im, rgb, tol=40) -> int:
    import numpy as np

    px = np.asarray(im.convert("RGB")).astype(int)
    return int((np.abs(px - np.array(rgb)) <= tol).all(axis=-1).sum())


def test_scatter_colours_follow_the_original_evaluator(tmp_path):
    """green: error < $40 or < 20%; orange: < $80 or < 40%; red otherwise. A missing prediction is scored as 0
    and counted, not drawn on a log axis."""
    from PIL import Image

    from tuner import artifacts
    from tuner.data import Example
    from tuner.scoring import Prediction

    examples = [Example(i, f"item {i}", price, "", "") for i, price in enumerate([100, 1000, 1000, 50, 500])]
    preds = [Prediction("130", 130.0), Prediction("1300", 1300.0), Prediction("2000", 2000.0),
             Prediction("", None), Prediction("470", 470.0)]
    rows = artifacts.prediction_rows(examples, preds)
    assert [r["color"] for r in rows] == ["green", "orange", "red", "orange", "green"]
    assert rows[3]["prediction"] is None and rows[3]["error"] == 50
    metrics = {"mae": 284.0, "rmsle": 1.0, "hit_rate": 0.4}

    def colour_counts(rows_, name):
        with Image.open(artifacts.scatter_png(rows_, metrics, "t", tmp_path / name)) as im:
            im.load()
            return {c: _pixels_near(im, tuple(int(artifacts.COLORS[c][i:i + 2], 16) for i in (1, 3, 5)))
                    for c in ("green", "orange", "red")}

    counts = colour_counts(rows, "all.png")
    assert all(n > 20 for n in counts.values()), counts
    # Without the red points, no red is drawn: the colours come from the rows, not from a fixed palette.
    no_red = colour_counts([r for r in rows if r["color"] != "red"], "no-red.png")
    assert no_red["red"] < 5 and no_red["green"] > 20, no_red

    csv_rows = artifacts.read_predictions_csv(artifacts.write_predictions_csv(rows, tmp_path / "p.csv"))
    assert [r["prediction"] for r in csv_rows] == [130.0, 1300.0, 2000.0, None, 470.0]


def test_store_location(tmp_path, monkeypatch):
    from tuner import artifacts

    monkeypatch.chdir(tmp_path)
    assert artifacts.location(f"sqlite:///{tmp_path}/sub/s.db") == tmp_path / "sub" / "artifacts"
    assert artifacts.location("sqlite:///rel.db") == tmp_path / "artifacts"
    assert artifacts.location("postgresql://u@h/db") == tmp_path / "artifacts"
    assert artifacts.location("postgresql://u@h/db", "store") == tmp_path / "store"


def test_unsafe_archive_is_refused(tmp_path):
    from tuner import artifacts

    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("../escape.txt", "x")
    with pytest.raises(artifacts.ArtifactError, match="unsafe member"):
        artifacts.unzip_folder(bad, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def test_adapter_info_rejects_other_formats(tmp_path):
    from tuner import artifacts

    (tmp_path / "tuner.json").write_text('{"format": "something/2"}')
    with pytest.raises(artifacts.ArtifactError, match="format 'something/2'"):
        artifacts.AdapterInfo.read(tmp_path / "tuner.json", "x")


def test_adapter_info_validates_its_scoring_record(tmp_path):
    """tuner.json may come from anyone's Hub repository, and the scorer sizes its work by its `scoring` record: it
    is checked as a sweep file's `scoring:` is (a tampered one is refused, naming the key), settings of other
    methods (model_dump writes them all) are dropped, and keys an older tuner did not write take today's defaults."""
    import json

    from tuner import artifacts
    from tuner.config import ScoringSpec

    info = {"base_model": "m", "base_fingerprint": {}, "quantization": {"bits": 4}, "question": "q",
            "answer_prefix": "Price is $", "max_price": 100.0, "params": {}, "data": {}, "study": "s", "trial": 0}
    path = tmp_path / "tuner.json"

    def read(scoring):
        path.write_text(json.dumps({**info, "format": artifacts.INFO_FORMAT, "scoring": scoring}))
        return artifacts.AdapterInfo.read(path, "repo/x")

    written = ScoringSpec(method="branch").model_dump()
    assert read(written).scoring == written
    assert read({"method": "greedy", "batch_size": 8, "top_k": 10, "samples": 31})
    old = read({"method": "median", "batch_size": 8, "top_k": 10})  # saved before `samples` existed
    assert (old.scoring["samples"], old.scoring["branch_top_k"]) == (31, 3)
    with pytest.raises(artifacts.ArtifactError, match=r"repo/x: tuner.json: scoring.*branch_top_k.*less than or "
                                                      r"equal to 10"):
        read({**written, "branch_top_k": 1_000_000})
    with pytest.raises(artifacts.ArtifactError, match="scoring.*batch_size"):
        read({**written, "batch_size": 0})
    with pytest.raises(artifacts.ArtifactError, match="scoring"):
        read({**written, "method": "beam"})
