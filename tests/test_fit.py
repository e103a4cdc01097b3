"""Data that does not fit the token budget: descriptions are cut, never rows dropped (and the prompt's question,
answer prefix and price never touched), the same way for every split; `max_length: auto`; refusals before a study
exists; the classical baseline; `tuner data`."""

from __future__ import annotations

import random
import re
from pathlib import Path

import optuna
import pandas as pd
import pytest

from conftest import tuner
from tuner.batches import auto_max_length, auto_reason, encode, fit_splits, row_length
from tuner.config import DataSpec
from tuner.data import load_splits
from tuner.errors import DataError

WORDS = ("oak walnut brass handle drawer vintage mirror polished lacquer carved shelf cabinet antique velvet "
         "linen chrome marble hinge dovetail veneer").split()


def long_texts(path: Path, n: int, words: tuple[int, int], seed: int = 0, price=None) -> Path:
    """A CSV of `n` listings of random furniture words, `words` long, priced by their length."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.randint(*words)
        text = f"Listing {i}: " + " ".join(rng.choice(WORDS) for _ in range(k)) + "."
        rows.append({"text": text, "price": price if price is not None else 20 + 3 * k + rng.randint(0, 50)})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_long_descriptions_are_cut_not_dropped_alike_in_every_split(tokenizer, tmp_path):
    spec = DataSpec(source=str(long_texts(tmp_path / "d.csv", 60, (20, 160))), train_rows=40, val_rows=8,
                    test_rows=12)
    splits = load_splits(spec)
    fitted, fit = fit_splits(tokenizer, splits, 100, spec)
    assert [len(getattr(fitted, s)) for s in ("train", "val", "test")] == [40, 8, 12]  # no row dropped
    assert 0 < len(fit.cuts) < 60 and fit.rows == 60
    for name in ("train", "val", "test"):
        for before, after in zip(getattr(splits, name), getattr(fitted, name)):
            assert after.row_id == before.row_id and after.completion == before.completion
            assert row_length(tokenizer, after.prompt, after.completion) <= 100
            assert after.prompt.startswith("How much does this cost to the nearest dollar?\n\nListing ")
            assert after.prompt.endswith("\n\nPrice is $")
            body = after.prompt.removesuffix("\n\nPrice is $")
            assert before.prompt.removesuffix("\n\nPrice is $").startswith(body)  # a cut, not a rewrite
    cut_ids = {c.row_id for c in fit.cuts}
    assert any(e.row_id in cut_ids for e in fitted.test)  # the scorer sees the prompts cut as in training
    rows, too_long = encode(tokenizer, fitted.train, 100)
    assert too_long == 0 and len(rows) == 40
    removed = sorted(c.removed for c in fit.cuts)
    assert fit.line().startswith(f"{len(fit.cuts)} of 60 descriptions cut to fit 100 tokens; median cut "
                                 f"{removed[len(removed) // 2]} tokens")


def test_auto_picks_the_length_that_leaves_95_percent_uncut(tokenizer, tmp_path):
    # 57 listings of 20-60 words and 3 of 300: the long tail is cut rather than paid for by every batch.
    short, tail = long_texts(tmp_path / "s.csv", 57, (20, 60)), long_texts(tmp_path / "t.csv", 3, (300, 300), seed=1)
    pd.concat([pd.read_csv(short), pd.read_csv(tail)]).to_csv(tmp_path / "d.csv", index=False)
    spec = DataSpec(source=str(tmp_path / "d.csv"), train_rows=40, val_rows=8, test_rows=12)
    splits = load_splits(spec)
    lengths = sorted(row_length(tokenizer, e.prompt, e.completion) for e in splits.train + splits.val + splits.test)
    rec = auto_max_length(tokenizer, splits, cap=4096)
    assert rec["value"] == rec["p95"] == lengths[56] and rec["longest"] == lengths[-1]
    assert sum(n > rec["value"] for n in lengths) <= 3
    assert auto_max_length(tokenizer, splits, cap=80)["value"] == 80
    # Rows all longer than the cap: the cap, and their descriptions are cut to it (not refused: they fit when cut).
    capped = auto_max_length(tokenizer, splits, cap=30)
    assert capped["value"] == 30 and auto_reason(capped).startswith("30 tokens (the cap; 95% of rows need")
    assert fit_splits(tokenizer, splits, 30, spec)[1].line().startswith("60 of 60 descriptions cut to fit 30 tokens")
    # Rows of nearly one length: cutting the longest by a token or two would save nothing, so every row fits.
    even = load_splits(DataSpec(source=str(long_texts(tmp_path / "e.csv", 60, (30, 33))), train_rows=40, val_rows=8,
                                test_rows=12))
    rec = auto_max_length(tokenizer, even, cap=4096)
    assert rec["value"] == rec["longest"] > rec["p95"] or rec["value"] == rec["longest"] == rec["p95"]
    assert auto_reason(rec).startswith(f"{rec['longest']} tokens (every row fits;")


def test_a_prompt_that_cannot_fit_even_without_its_description_is_named(tokenizer, tmp_path):
    spec = DataSpec(source=str(long_texts(tmp_path / "d.csv", 30, (5, 10))), train_rows=20, val_rows=4,
                    test_rows=6)
    with pytest.raises(DataError, match=r"train.max_length 20: 30 rows do not fit even with their description cut "
                                        r"to nothing \(row ids \d+, \d+, \d+, \d+, \d+, \.\.\.\)"):
        fit_splits(tokenizer, load_splits(spec), 20, spec)


def test_train_tokens_keeps_the_first_rows_that_fit_for_training_and_baselines_alike(tokenizer, tmp_path):
    """data.train_tokens: the first train rows whose fitted lengths add up to the limit, nothing else changed; the
    baselines read the same rows; a limit that keeps no row, or too few for train.eval_every, is refused by name."""
    from tuner.baselines import classical
    from tuner.config import parse_config
    from tuner.prepare import prepare
    from tuner.space import space_signature

    data = long_texts(tmp_path / "d.csv", 60, (20, 160))

    def cfg(**data_keys):
        return parse_config({"data": {"source": str(data), "train_rows": 40, "val_rows": 8, "test_rows": 12,
                                      **data_keys},
                             "train": {"max_length": 100, "batch_size": 4, "eval_every": 2, "eval_rows": 8}})

    full = prepare(cfg())
    assert full.token_budget is None and len(full.splits.train) == 40
    lengths = [min(row_length(tokenizer, e.prompt, e.completion), 100) for e in full.splits.train]
    assert len(set(lengths)) > 5  # short and cut rows alike: the limit counts each row at its fitted length
    limit = sum(lengths[:25]) + lengths[25] - 1  # row 25 would pass it by one token
    ready = prepare(cfg(train_tokens=limit))
    assert [e.row_id for e in ready.splits.train] == [e.row_id for e in full.splits.train[:25]]
    assert ready.splits.val == full.splits.val and ready.splits.test == full.splits.test
    [(fitted, fit)] = ready.fits.values()
    assert [e.row_id for e in fitted.train] == [e.row_id for e in full.splits.train[:25]] and fit.rows == 25 + 8 + 12
    assert ready.token_budget == {"train_tokens": limit, "rows": 25, "of": 40, "tokens": sum(lengths[:25]),
                                  "line": f"data.train_tokens {limit:,}: a trial trains on the first 25 of 40 train "
                                          f"rows ({sum(lengths[:25]):,} tokens, rows of up to 100); the baselines "
                                          f"fit the same 25"}
    assert classical(ready.splits.train, ready.splits.val, ready.splits.test)["train_rows"] == 25
    assert prepare(cfg(train_tokens=sum(lengths))).token_budget["line"].endswith(": all 40 train rows fit "
                                                                                 f"({sum(lengths):,} tokens)")
    with pytest.raises(DataError, match=r"^data.train_tokens 16: not one train row fits .* raise data.train_tokens"):
        prepare(cfg(train_tokens=16))
    # 5 rows are 2 steps of 4: train.eval_every 2 would never be reached.
    with pytest.raises(DataError, match=r"^data.train_tokens [\d,]+ keeps 5 train rows, 2 optimizer steps, and "
                                        r"train.eval_every is 2"):
        prepare(cfg(train_tokens=sum(lengths[:5])))
    assert "train_tokens" not in space_signature(cfg())["data"]  # studies made before it keep their signature
    assert space_signature(cfg(train_tokens=limit))["data"]["train_tokens"] == limit


def test_classical_baseline_beats_the_constant_on_diamonds(diamonds):
    from tuner.baselines import classical
    from tuner.scoring import constant_baseline

    truths = [e.price for e in diamonds.test]
    c = classical(diamonds.train, diamonds.val, diamonds.test)
    const = constant_baseline(diamonds.train_median, truths)
    assert c["n"] == len(truths) == 32 and c["train_rows"] == 64
    assert c["mae"] < 0.8 * const["mae"] and c["rmsle"] < const["rmsle"]
    assert c == {**classical(diamonds.train, diamonds.val, diamonds.test), "seconds": c["seconds"]}  # deterministic
    fewer = classical(diamonds.train[:16], diamonds.val, diamonds.test)
    assert fewer["mae"] != c["mae"] and fewer["train_rows"] == 16


def test_run_says_what_was_cut_and_compares_with_every_baseline(tmp_path):
    """One real trial on long texts, its prices read as the branch mean (the default study's read-out, said in the
    run output): the run output and `tuner status` say how many rows were cut, the trial records it, the
    leaderboard shows the classical baseline, and the last line compares strongest first."""
    data = long_texts(tmp_path / "d.csv", 40, (40, 160))
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"""
study: {{name: fit, trials: 1, output_dir: {tmp_path / 'runs'}}}
data: {{source: {data}, train_rows: 16, val_rows: 8, test_rows: 16}}
search: {{r: 8, target_modules: qv, quant_bits: 16, learning_rate: 2.0e-3}}
train: {{batch_size: 8, max_length: 80}}
scoring: {{batch_size: 16, method: branch}}
tracking: {{wandb: {{mode: disabled}}}}
""")
    url = f"sqlite:///{tmp_path}/s.db"
    res = tuner(["run", str(sweep), "--storage", url], tmp_path, timeout=900)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    # The default study's read-out, through a study with tuner's own LoRA routing, said before any number.
    assert "test prices read as the branch mean (the top 3 tokens at each of the first 2 places" in out
    study = optuna.load_study(study_name="fit", storage=url)
    fit = study.user_attrs["fits"]["builtin:smollm2-135m-instruct@80"]
    assert fit["rows"] == 40 and fit["cut"] > 20
    assert f"{fit['cut']} of 40 descriptions cut to fit 80 tokens" in out
    assert "WARNING:" in out and "most descriptions lose more than 25%" in out
    [t] = study.trials
    assert t.state.name == "COMPLETE" and t.user_attrs["fit"]["cut"] == fit["cut"] and "rows_too_long" not in t.user_attrs
    assert "baseline: classical (TF-IDF + ridge)" in out
    last = [line for line in res.stdout.splitlines() if line.strip()][-1]
    base = study.user_attrs["baselines"]
    order = sorted(base, key=lambda k: base[k]["mae"])
    assert last.startswith(f"best MAE ${t.value:,.0f}: {t.value / base[order[0]]['mae']:.0%} of the ")
    status = tuner(["status", "fit", "--storage", url], tmp_path)
    assert status.returncode == 0 and f"{fit['cut']} of 40 descriptions cut to fit 80 tokens" in status.stdout


BAD = {
    "every text exceeds any budget": (lambda p: long_texts(p, 40, (2000, 2200)), "every description is longer "
                                                                                   "than any budget"),
    "fewer rows than the splits": (lambda p: long_texts(p, 20, (5, 10)), "20 usable rows, but train_rows"),
    "six orders of magnitude": (lambda p: _prices(p, [0.01] * 20 + [50_000.0] * 20), "six orders of magnitude"),
    "booleans as prices": (lambda p: _prices(p, [True, False] * 20), "holds true/false values, not prices"),
    "a duplicate price header": (lambda p: _write(p, "text,price,price\n" + "a chair,12,13\n" * 40),
                                 "the header names column 'price' twice"),
    "a header-only file": (lambda p: _write(p, "text,price\n"), "no rows"),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _prices(path: Path, prices: list) -> Path:
    pd.DataFrame({"text": [f"item {i}" for i in range(len(prices))], "price": prices}).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("case", list(BAD))
def test_bad_data_is_refused_before_the_study_exists(tmp_path, case):
    make, message = BAD[case]
    data = make(tmp_path / "d.csv")
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"study: {{name: bad}}\ndata: {{source: {data}, train_rows: 24, val_rows: 4, test_rows: 4}}\n"
                     f"tracking: {{wandb: {{mode: disabled}}}}\n")
    for command in (["data", str(sweep)], ["run", str(sweep), "--storage", f"sqlite:///{tmp_path}/s.db"]):
        res = tuner(command, tmp_path)
        assert res.returncode == 2, res.stdout + res.stderr
        assert message in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "s.db").exists()  # nothing stored: no study to refuse the corrected run


@pytest.mark.parametrize("limit,message", [
    (16, "data.train_tokens 16: not one train row fits (a row here takes up to "),
    (100, "optimizer steps, and train.eval_every is 5: raise data.train_tokens or lower train.eval_every"),
])
def test_a_token_limit_that_leaves_too_little_is_refused_before_the_study_exists(tmp_path, limit, message):
    """`data.train_tokens` that keeps no row, or too few rows for one evaluation, through the command line: exit 2,
    one line, and no storage made."""
    data = long_texts(tmp_path / "d.csv", 40, (5, 10))
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"study: {{name: tokens}}\ndata: {{source: {data}, train_rows: 24, val_rows: 4, test_rows: 4, "
                     f"train_tokens: {limit}}}\ntrain: {{batch_size: 4, eval_every: 5, eval_rows: 4}}\n"
                     f"tracking: {{wandb: {{mode: disabled}}}}\n")
    for command in (["data", str(sweep)], ["run", str(sweep), "--storage", f"sqlite:///{tmp_path}/s.db"]):
        res = tuner(command, tmp_path)
        assert res.returncode == 2, res.stdout + res.stderr
        assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "s.db").exists()


def test_a_wrong_data_path_leaves_no_study_behind(tmp_path):
    """A study made with the wrong path in its signature would refuse the corrected run as another search."""
    sweep = tmp_path / "s.yaml"
    sweep.write_text("study: {name: typo, trials: 1}\ndata: {source: missing.csv}\n")
    res = tuner(["run", str(sweep), "--storage", f"sqlite:///{tmp_path}/s.db"], tmp_path)
    assert res.returncode == 2 and "data.source 'missing.csv': no such file" in res.stderr, res.stderr
    assert not (tmp_path / "s.db").exists()


def test_tuner_data_says_what_a_study_will_train_on(tmp_path):
    data = long_texts(tmp_path / "d.csv", 60, (20, 160))
    with open(data, "a") as fh:
        fh.write("no price here,\n")
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"data: {{source: {data}, train_rows: 40, val_rows: 8, test_rows: 12}}\n"
                     f"train: {{max_length: 100}}\n")
    res = tuner(["data", str(sweep)], tmp_path)
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    assert "61 rows read; skipped: 1 missing price" in out
    assert "splits: train 40, validation 8, test 12" in out and "data.train_tokens" not in out
    assert "tokens per row (prompt + price): 5% " in out and "train.max_length 100" in out
    assert "descriptions cut to fit 100 tokens; median cut" in out
    bars = [line for line in out.splitlines() if re.fullmatch(r"\s+\$[\d,]+ -\s+\$[\d,]+\s+#*\s+\d+", line)]
    assert "prices: min $" in out and len(bars) == 8  # the histogram's bins
    assert "test MAE of the baselines: constant train median $" in out and "classical (TF-IDF + ridge) $" in out
    # A budget that takes most of most descriptions away is said loudly here too, before any training.
    sweep.write_text(sweep.read_text().replace("max_length: 100", "max_length: 50"))
    res = tuner(["data", str(sweep)], tmp_path)
    assert res.returncode == 0 and "WARNING: " in res.stdout and "most descriptions lose more than 25%" in res.stdout
    # A token limit says which train rows a trial gets, and the baselines below are fitted on those.
    res = tuner(["data", str(sweep), "--set", "data.train_tokens=1000"], tmp_path)
    kept = re.search(r"data.train_tokens 1,000: a trial trains on the first (\d+) of 40 train rows", res.stdout)
    assert res.returncode == 0 and kept and 1000 // 50 <= int(kept[1]) < 40, res.stdout + res.stderr
    assert f"splits: train {kept[1]}, validation 8, test 12" in res.stdout
    # A queued first trial's rate given at a number of steps is said at the steps this data gives it (batch 8: 5 steps).
    sweep.write_text(sweep.read_text() + "study: {enqueue: [{learning_rate: {value: 0.001, at_steps: 20}}]}\n"
                     "search: {learning_rate: {low: 0.0005, high: 0.005}}\n")
    res = tuner(["data", str(sweep)], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert ("study.enqueue[0].learning_rate: 0.001 at 20 steps is 0.002 at this data's 5 (times sqrt(20/5)"
            in res.stdout)
