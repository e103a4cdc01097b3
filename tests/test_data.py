"""Data: the real diamonds table, the recipe's prompt, seeded splits, bad rows skipped and counted."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tuner.config import DataSpec
from tuner.data import load_splits, make_prompt
from tuner.errors import DataError


def test_diamonds_prompt_is_the_recipes(diamonds):
    assert diamonds.rows_read == 53940
    ex = diamonds.train[0]
    assert ex.prompt.startswith("How much does this cost to the nearest dollar?\n\nLoose round diamond: ")
    assert ex.prompt.endswith(" mm.\n\nPrice is $")
    assert ex.completion == f"{round(ex.price)}.00"
    assert 326 <= min(e.price for e in diamonds.train) and max(e.price for e in diamonds.train) <= 18823
    assert (len(diamonds.train), len(diamonds.val), len(diamonds.test)) == (64, 16, 32)


def test_splits_are_seeded_disjoint_and_test_stable_when_train_grows():
    a = load_splits(DataSpec(train_rows=50, val_rows=10, test_rows=20, seed=3))
    b = load_splits(DataSpec(train_rows=50, val_rows=10, test_rows=20, seed=3))
    big = load_splits(DataSpec(train_rows=200, val_rows=10, test_rows=20, seed=3))
    other = load_splits(DataSpec(train_rows=50, val_rows=10, test_rows=20, seed=4))
    ids = lambda rows: [e.row_id for e in rows]  # noqa: E731
    assert ids(a.train) == ids(b.train) and ids(a.test) == ids(b.test)
    assert ids(big.test) == ids(a.test) and ids(big.val) == ids(a.val)
    assert ids(other.test) != ids(a.test)
    assert not set(ids(a.train)) & set(ids(a.test)) and not set(ids(a.val)) & set(ids(a.test))


def test_bad_rows_are_skipped_and_counted(tmp_path):
    rows = [{"description": f"item {i}", "cost": 10 + i} for i in range(40)]
    rows += [{"description": "no price", "cost": None}, {"description": "free", "cost": 0},
             {"description": "words", "cost": "a lot"}, {"description": "", "cost": 12}]
    path = tmp_path / "items.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    spec = DataSpec(source=str(path), text_column="description", price_column="cost", train_rows=20, val_rows=5,
                    test_rows=5)
    splits = load_splits(spec)
    assert splits.skipped == {"missing_price": 1, "non_positive_price": 1, "non_numeric_price": 1, "missing_text": 1}
    assert splits.rows_read == 44 and len(splits.train) == 20
    assert splits.summary()["skipped"]["missing_price"] == 1


def test_too_many_bad_rows_stop_with_a_clear_error(tmp_path):
    rows = [{"text": f"item {i}", "price": -1 if i % 2 else 5} for i in range(40)]
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=r"20 of 40 rows are unusable .*max_bad_fraction=0.1"):
        load_splits(DataSpec(source=str(path), train_rows=5, val_rows=2, test_rows=2))


def test_missing_column_and_too_few_rows(tmp_path):
    path = tmp_path / "items.csv"
    pd.DataFrame({"name": ["a"], "price": [1.0]}).to_csv(path, index=False)
    with pytest.raises(DataError, match="no column 'text'"):
        load_splits(DataSpec(source=str(path)))
    with pytest.raises(DataError, match="usable rows, but train_rows"):
        load_splits(DataSpec(source="builtin:diamonds", train_rows=60000))


def test_course_style_text_keeps_its_own_prompt():
    spec = DataSpec()
    text = "How much does this cost to the nearest dollar?\n\nA lamp.\n\nPrice is $12.00"
    assert make_prompt(text, spec) == "How much does this cost to the nearest dollar?\n\nA lamp.\n\nPrice is $"
    assert make_prompt("A lamp.", spec) == "How much does this cost to the nearest dollar?\n\nA lamp.\n\nPrice is $"
