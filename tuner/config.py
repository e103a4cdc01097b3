"""Sweep files: YAML to a typed, validated `SweepConfig`.

Every error names the file, the dotted key and what was expected, and is raised before anything heavy is imported,
so that a typo never costs a model load. The search dimensions are `Dim`s: a fixed value, a ``{choices: [...]}``
list, or a ``{low, high, log}`` range; which one a key accepts, and its bounds, is declared next to the key.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

# Named target-module sets of Llama-style models. Resolved against the model's real module names at study start.
BUILTIN_TARGET_SETS: dict[str, list[str]] = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
    "attention+mlp": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qv": ["q_proj", "v_proj"],
}
OBJECTIVES = {"mae": "minimize", "rmsle": "minimize", "hit_rate": "maximize"}
OPTIMIZERS = ("adamw_torch", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit", "sgd")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
QUANT_BITS = (4, 8, 16)
BUILTIN_MODELS = ("builtin:smollm2-135m-instruct",)
BUILTIN_DATA = ("builtin:diamonds", "builtin:ames")
SOURCES = "builtin:diamonds, builtin:ames, hf:OWNER/NAME or a .csv/.jsonl/.parquet path"
SEED_MAX = 2**32 - 1  # numpy's and Optuna's samplers take 32-bit seeds
MAX_TRIALS = 100_000


@dataclass(frozen=True)
class Dim:
    """One search dimension: `fixed`, `choices` or a `low`/`high` range (`log` for log-uniform)."""

    kind: Literal["fixed", "choices", "range"]
    value: Any = None
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    @property
    def is_fixed(self) -> bool:
        return self.kind == "fixed"

    def values(self) -> list[Any]:
        """Every value this dimension can take where that is finite (fixed, choices), else the range's ends."""
        if self.kind == "fixed":
            return [self.value]
        if self.kind == "choices":
            return list(self.choices)
        return [self.low, self.high]

    def describe(self) -> str:
        if self.kind == "fixed":
            return repr(self.value)
        if self.kind == "choices":
            return "{choices: %s}" % list(self.choices)
        # step only when set: a signature written before steps were read stays the same.
        return "{low: %g, high: %g%s%s}" % (self.low, self.high, ", log: true" if self.log else "",
                                            "" if self.step is None else ", step: %g" % self.step)


def _dim(kind_name: str, convert: Callable[[Any], Any], check: Callable[[Any], str | None], *, ranges: bool = True):
    """A pydantic validator that turns YAML into a `Dim` of `kind_name` values, each passing `check`.

    `check(value)` returns None when the value is acceptable, else what is expected (used in the error message).
    """

    article = "an" if kind_name[0] in "aeiou" else "a"
    shapes = f"{article} {kind_name}" + (", a {low, high[, log]} range" if ranges else "") + " or a {choices: [...]} list"

    def conv(v: Any) -> Any:
        try:
            out = convert(v)
        except (TypeError, ValueError):
            raise ValueError(f"expected {shapes}, got {v!r}") from None
        problem = check(out)
        if problem:
            raise ValueError(f"expected {problem}, got {v!r}")
        return out

    def validate(raw: Any) -> Dim:
        if isinstance(raw, Dim):
            return raw
        if isinstance(raw, dict):
            keys = set(raw)
            if keys == {"choices"}:
                vals = raw["choices"]
                if not isinstance(vals, list) or not vals:
                    raise ValueError(f"expected a non-empty list under 'choices', got {vals!r}")
                return Dim("choices", choices=tuple(conv(v) for v in vals))
            if ranges and {"low", "high"} <= keys <= {"low", "high", "log", "step"}:
                low, high = conv(raw["low"]), conv(raw["high"])
                if not low < high:
                    raise ValueError(f"expected low < high, got low={low!r}, high={high!r}")
                log = raw.get("log", False)
                if not isinstance(log, bool):  # "false" as a string would read as true
                    raise _SubKeyError(".log", f"expected true or false, got {log!r}")
                if log and low <= 0:
                    raise ValueError(f"expected low > 0 for a log range, got {low!r}")
                step = _range_step(raw.get("step"), convert, low, high, log)
                return Dim("range", low=low, high=high, log=log, step=step)
            raise ValueError(f"expected {shapes}, got keys {sorted(keys)}")
        if isinstance(raw, list):
            raise ValueError(f"expected {shapes} (write a list as {{choices: {raw!r}}})")
        return Dim("fixed", value=conv(raw))

    return BeforeValidator(validate)


def _range_step(raw: Any, convert: Callable[[Any], Any], low: Any, high: Any, log: bool) -> Any:
    """A range's `step`: None, or a positive value of the range's own type no larger than the range (Optuna
    refuses a step on a log range, and a step of 0 never moves)."""
    if raw is None:
        return None
    try:
        step = convert(raw)
    except (TypeError, ValueError):
        step = None
    if step is None or not step > 0 or step > high - low:
        raise _SubKeyError(".step", f"expected a number > 0 and at most high - low ({high - low:g}), got {raw!r}")
    if log:
        raise _SubKeyError(".step", "expected no step on a log range (Optuna samples one or the other)")
    return step


def _number(v: Any) -> float:
    if isinstance(v, bool):
        raise TypeError
    if isinstance(v, str):
        v = float(v)  # YAML 1.1 reads "1e-4" as a string
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        raise TypeError
    return float(v)


def _integer(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError
    return v


def _boolean(v: Any) -> bool:
    if not isinstance(v, bool):  # YAML's true/false only: "false" as a string would read as true
        raise TypeError
    return v


def _string(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError
    return v


def _between(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Callable[[float], str | None]:
    lb, hb = ("(" if lo_open else "["), (")" if hi_open else "]")

    def check(v: float) -> str | None:
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        return None if ok else f"a number in {lb}{lo:g}, {hi:g}{hb}"

    return check


def _at_least(lo: int, hi: int = 10**6) -> Callable[[int], str | None]:
    # An upper bound too: a value no run could finish (epochs: 10**20) would pass and burn the budget.
    return lambda v: None if lo <= v <= hi else f"an integer from {lo} to {hi:,}"


def _one_of(options: tuple) -> Callable[[Any], str | None]:
    return lambda v: None if v in options else f"one of {list(options)}"


def _power_of_two(v: int) -> str | None:
    return None if v >= 1 and (v & (v - 1)) == 0 else "a power of two (8, 16, 32, ...)"


FloatDim = Annotated[Dim, _dim("number", _number, lambda v: None)]
DropoutDim = Annotated[Dim, _dim("number", _number, _between(0, 1, hi_open=True))]
LearningRateDim = Annotated[Dim, _dim("number", _number, _between(0, 1, lo_open=True))]
LoraPlusDim = Annotated[Dim, _dim("number", _number, _between(1, 1024))]
NumberLossDim = Annotated[Dim, _dim("number", _number, _between(0, 100))]
WarmupDim = Annotated[Dim, _dim("number", _number, _between(0, 1, hi_open=True))]
WeightDecayDim = Annotated[Dim, _dim("number", _number, _between(0, 10))]
PositiveIntDim = Annotated[Dim, _dim("integer", _integer, _at_least(1))]
MAX_TOKENS = 1_048_576  # no model tuner can load reads a longer row
_length_dim = _dim("integer", _integer, _at_least(16, MAX_TOKENS))


def _max_length(raw: Any) -> Dim:
    """Tokens of prompt and completion together: a fixed budget, choices or a range of them, or `auto` (chosen from
    the data: the length that leaves 95% of rows uncut, or every row where that costs at most a quarter more,
    up to `max_length_cap`)."""
    if raw == "auto":
        return Dim("fixed", value="auto")
    if isinstance(raw, str):
        raise ValueError(f"expected a number of tokens, auto, a {{low, high}} range or a {{choices: [...]}} list, "
                         f"got {raw!r}")
    return _length_dim.func(raw)


MaxLengthDim = Annotated[Dim, BeforeValidator(_max_length)]
OptimizerDim = Annotated[Dim, _dim("string", _string, _one_of(OPTIMIZERS), ranges=False)]
SchedulerDim = Annotated[Dim, _dim("string", _string, _one_of(SCHEDULERS), ranges=False)]
QuantDim = Annotated[Dim, _dim("integer", _integer, _one_of(QUANT_BITS), ranges=False)]
TargetDim = Annotated[Dim, _dim("string", _string, lambda v: None if v else "a non-empty set name", ranges=False)]
BoolDim = Annotated[Dim, _dim("boolean", _boolean, lambda v: None, ranges=False)]
AlphaRatioDim = Annotated[Dim, _dim("number", _number, _between(0, 1e6, lo_open=True))]
MaxGradNormDim = Annotated[Dim, _dim("number", _number, _between(0, 1e6, lo_open=True))]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class RankSpec(_Strict):
    """LoRA rank: powers of two doubling from `min` to `max` (sampled as the exponent, so the order is kept)."""

    min: int = 8
    max: int = 64

    @field_validator("min", "max")
    @classmethod
    def _pow2(cls, v: int) -> int:
        problem = _power_of_two(v)
        if problem:
            raise ValueError(f"expected {problem}, got {v!r}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "RankSpec":
        if self.min > self.max:
            raise ValueError(f"expected r.min <= r.max, got {self.min} > {self.max}")
        return self

    def values(self) -> list[int]:
        return [2**e for e in range(int(math.log2(self.min)), int(math.log2(self.max)) + 1)]


def _rank(raw: Any) -> RankSpec:
    if isinstance(raw, RankSpec):
        return raw
    if isinstance(raw, bool) or (not isinstance(raw, (int, dict))):
        raise ValueError(f"expected a power of two or a {{min, max}} range of powers of two, got {raw!r}")
    if isinstance(raw, int):
        problem = _power_of_two(raw)
        if problem:
            raise ValueError(f"expected {problem}, got {raw!r}")
        return RankSpec(min=raw, max=raw)
    return RankSpec(**raw)


class AlphaSpec(_Strict):
    """LoRA alpha: a fixed value, or `ratio` x r (ratio fixed or sampled). Default 2r, as in the recipe."""

    value: float | None = None
    ratio: AlphaRatioDim = Dim("fixed", value=2.0)

    @field_validator("value")
    @classmethod
    def _positive(cls, v: float | None) -> float | None:
        if v is not None and not (v > 0 and math.isfinite(v) and v <= 1e6):
            raise ValueError(f"expected a finite alpha > 0 (at most 1e6), got {v!r}")
        return v


def _alpha(raw: Any) -> Any:
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        if not (raw > 0 and math.isfinite(raw) and raw <= 1e6):  # .inf would train nothing but NaNs
            raise ValueError(f"expected a finite alpha > 0 (at most 1e6), got {raw!r}")
        return AlphaSpec(value=float(raw))
    if isinstance(raw, dict) and set(raw) - {"ratio", "value"}:
        raise ValueError(f"expected a number or {{ratio: ...}}, got keys {sorted(raw)}")
    return raw


class SearchSpace(_Strict):
    r: Annotated[RankSpec, BeforeValidator(_rank)] = RankSpec()
    alpha: Annotated[AlphaSpec, BeforeValidator(_alpha)] = AlphaSpec()
    dropout: DropoutDim = Dim("fixed", value=0.1)
    target_sets: dict[str, list[str]] = Field(default_factory=dict)  # before target_modules: it is checked against it
    target_modules: TargetDim = Dim("fixed", value="attention")
    quant_bits: QuantDim = Dim("fixed", value=4)
    learning_rate: LearningRateDim = Dim("fixed", value=1e-4)
    # rsLoRA: scale the update by alpha/sqrt(r) instead of alpha/r (true, false, or {choices: [false, true]}).
    use_rslora: BoolDim = Dim("fixed", value=False)
    # LoRA+ (Hayou et al., ICML 2024, arXiv 2402.12354): B's learning rate is this many times A's (1: plain LoRA).
    loraplus_ratio: LoraPlusDim = Dim("fixed", value=1.0)

    @field_validator("target_sets")
    @classmethod
    def _sets(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, modules in v.items():
            if not modules or not all(isinstance(m, str) and m for m in modules):
                raise ValueError(f"expected target_sets.{name} to be a non-empty list of module names, got {modules!r}")
        return v

    @field_validator("target_modules")
    @classmethod
    def _targets_known(cls, v: Dim, info: Any) -> Dim:
        known = {**BUILTIN_TARGET_SETS, **(info.data.get("target_sets") or {})}
        for name in v.values():
            if name not in known:
                raise ValueError(f"expected a target set among {sorted(known)} (or one defined under "
                                 f"search.target_sets), got {name!r}")
        return v

    def target_set(self, name: str) -> list[str]:
        return {**BUILTIN_TARGET_SETS, **self.target_sets}[name]


class TrainSpace(_Strict):
    """Training settings: fixed, or sampled where a range or choices is given. Steps are optimizer steps."""

    epochs: PositiveIntDim = Dim("fixed", value=1)
    max_steps: int | None = Field(default=None, ge=1, le=10**8)
    batch_size: PositiveIntDim = Dim("fixed", value=8)
    grad_accum: PositiveIntDim = Dim("fixed", value=1)
    max_length: MaxLengthDim = Dim("fixed", value=182)
    max_length_cap: int = Field(default=512, ge=16, le=MAX_TOKENS)  # the most `max_length: auto` may pick
    optimizer: OptimizerDim = Dim("fixed", value="adamw_torch")
    scheduler: SchedulerDim = Dim("fixed", value="cosine")
    warmup_ratio: WarmupDim = Dim("fixed", value=0.03)
    weight_decay: WeightDecayDim = Dim("fixed", value=0.001)
    max_grad_norm: MaxGradNormDim = Dim("fixed", value=0.3)
    # Weight of the number-token loss added at every digit of the price (0: cross-entropy alone, the recipe's):
    # the expected distance between the predicted digit and the true one (`loop.number_token_loss`).
    number_loss: NumberLossDim = Dim("fixed", value=0.0)
    seed: int = Field(default=42, ge=0, le=SEED_MAX)
    eval_every: int | None = Field(default=None, ge=1, le=10**8)
    eval_rows: int = Field(default=32, ge=1, le=10**8)
    # Cheap for LoRA (adapter + optimizer state); what a retried trial resumes from after a crash or Ctrl-C.
    checkpoint_every: int | None = Field(default=20, ge=1, le=10**8)
    # The newest N, plus the one with the best value on the whole validation split (the best epoch's end).
    keep_checkpoints: int = Field(default=3, ge=1, le=10_000)
    # Relative drop of the training loss across an epoch boundary that flags memorisation (`overfit_epochs`).
    overfit_drop: float = Field(default=0.15, gt=0, lt=1)
    gradient_checkpointing: Literal["auto", True, False] = "auto"
    # Trials trained together on one base in one loop (each its own rows, LoRA, optimizer); `auto` sizes it.
    cotrain: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = "auto"
    # fused: the base runs once over all co-trained trials' rows; interleaved: once per trial in the same loop.
    # auto: fused (measured faster per trial than interleaved on the GPU and on the CPU, fp32 or bf16).
    cotrain_mode: Literal["auto", "fused", "interleaved"] = "auto"
    # CPU only: bf16 autocast uses the AVX512-BF16/AMX units (about 3x fp32 matmul speed where present).
    cpu_bf16: Literal["auto", True, False] = "auto"


class ModelSpec(_Strict):
    """`name`: ``builtin:smollm2-135m-instruct``, a Hub id (owner/name) or a local folder."""

    name: str = "builtin:smollm2-135m-instruct"
    revision: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v.startswith("builtin:") and v not in BUILTIN_MODELS:
            raise ValueError(f"expected one of {sorted(BUILTIN_MODELS)}, a Hub id or a local folder, got {v!r}")
        if not v.strip():
            raise ValueError("expected a model name")
        return v


    @property
    def key(self) -> str:
        """How a trial names its model: the name, with `@revision` when one is pinned."""
        return self.name if self.revision is None else f"{self.name}@{self.revision}"


class ModelSpace(_Strict):
    """One base model, or several to choose from (a sweep dimension: size, base against instruct variant)."""

    options: tuple[ModelSpec, ...]

    @property
    def is_fixed(self) -> bool:
        return len(self.options) == 1

    @property
    def name(self) -> str:
        return " | ".join(o.key for o in self.options)

    @property
    def revision(self) -> str | None:
        return self.options[0].revision if self.is_fixed else None

    def keys(self) -> list[str]:
        return [o.key for o in self.options]

    def by_key(self, key: str) -> ModelSpec:
        return next(o for o in self.options if o.key == key)


class _SubKeyError(ValueError):
    """A ValueError that knows the key below the field it was raised for (pydantic keeps it in ctx["error"])."""

    def __init__(self, sub: str, msg: str):
        super().__init__(msg)
        self.sub = sub


def _model(raw: Any) -> Any:
    """`name`, `{name, revision}`, a list of those, or `{choices: [...]}`."""
    if isinstance(raw, ModelSpace):
        return raw
    listed = isinstance(raw, list) or (isinstance(raw, dict) and set(raw) == {"choices"})
    if isinstance(raw, dict) and set(raw) == {"choices"}:
        raw = raw["choices"]
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise ValueError("expected at least one model")
    options = []
    for i, item in enumerate(items):
        where = f"[{i}]" if listed else ""
        spec = {"name": item} if isinstance(item, str) else item
        if not isinstance(spec, dict):
            raise _SubKeyError(where, f"expected a model name or {{name, revision}}, got {item!r}")
        try:
            options.append(ModelSpec(**spec))
        except ValidationError as exc:
            first = exc.errors()[0]
            msg = first["msg"].removeprefix("Value error, ")
            sub = where + "".join(f".{p}" for p in first["loc"])
            if first["type"] == "extra_forbidden":
                msg = "expected a known key (allowed here: name, revision)"
            elif not msg.startswith("expected "):
                msg = f"expected {_expected(first)}, got {first.get('input')!r}"
            raise _SubKeyError(sub, msg) from None
    keys = [o.key for o in options]
    if len(set(keys)) != len(keys):
        raise ValueError(f"expected distinct models, got {keys}")
    return ModelSpace(options=tuple(options))


class DataSpec(_Strict):
    """`source`: ``builtin:diamonds`` (short, tidy rows), ``builtin:ames`` (house sales as long listings),
    ``hf:OWNER/NAME`` (a Hub dataset) or a local .csv/.jsonl/.parquet file."""

    source: str = "builtin:diamonds"
    split: str = "train"
    test_split: str | None = None  # a Hub dataset's own held-out split; else test rows come from `split`
    text_column: str = "text"
    price_column: str = "price"
    train_rows: int = Field(default=512, ge=1, le=10**8)
    # The most tokens (prompt and price, fitted to train.max_length) one epoch of a trial trains on: train rows are
    # taken in order while they fit, so that long texts cost a trial about the time short ones do. The rows left
    # out are said in the run output and `tuner data`; the baselines fit the same rows. None: every train row.
    train_tokens: int | None = Field(default=None, ge=16, le=10**12)
    val_rows: int = Field(default=64, ge=1, le=10**8)
    test_rows: int = Field(default=128, ge=1, le=10**8)
    seed: int = Field(default=0, ge=0, le=SEED_MAX)
    max_bad_fraction: float = Field(default=0.1, ge=0, le=1)
    # A loud warning when most descriptions lose more than this fraction of their tokens to fit train.max_length.
    cut_warn_fraction: float = Field(default=0.25, gt=0, lt=1)
    question: str = "How much does this cost to the nearest dollar?"
    answer_prefix: str = "Price is $"

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if v.startswith("builtin:") and v not in BUILTIN_DATA:
            raise ValueError(f"expected {SOURCES}, got {v!r}")
        if v.startswith("hf:") and "/" not in v[3:]:
            raise ValueError(f"expected hf:OWNER/NAME, got {v!r}")
        if not (v.startswith(("builtin:", "hf:")) or v.endswith((".csv", ".jsonl", ".json", ".parquet"))):
            raise ValueError(f"expected {SOURCES}, got {v!r}")
        return v


class SamplerSpec(_Strict):
    type: Literal["tpe", "random", "grid"] = "tpe"
    seed: int | None = Field(default=0, ge=0, le=SEED_MAX)
    n_startup_trials: int = Field(default=3, ge=0, le=10**6)


class PrunerSpec(_Strict):
    type: Literal["none", "median", "successive_halving", "hyperband"] = "none"
    n_startup_trials: int = Field(default=2, ge=0, le=10**6)
    n_warmup_steps: int = Field(default=0, ge=0, le=10**8)
    min_resource: Annotated[int, Field(ge=1, le=10**8)] | Literal["auto"] = "auto"
    reduction_factor: int = Field(default=3, ge=2, le=1000)
    # The share of a trial's steps after which it is no longer pruned (1: to its end, Optuna's way). A late cut saves
    # little: stopping a trial at 80% of its steps saves a fifth of it, and a few validation rows rank close trials
    # by chance (default study, diamonds: trial 2 was cut at step 200 of 250, 25% behind on 32 validation rows, but
    # trained to its end the same settings scored 4% better than the trial kept).
    until: float = Field(default=1.0, gt=0, le=1)

    @model_validator(mode="after")
    def _keys_of_this_pruner(self) -> "PrunerSpec":
        # Optuna's successive halving and hyperband have no startup trials or warm-up steps, and the median pruner
        # has no rungs: a key the chosen pruner would ignore is refused, not dropped.
        applies = {"n_startup_trials": ("median",), "n_warmup_steps": ("median",),
                   "min_resource": ("successive_halving", "hyperband"),
                   "reduction_factor": ("successive_halving", "hyperband"),
                   "until": ("median", "successive_halving", "hyperband")}
        for key, types in applies.items():
            if key in self.model_fields_set and self.type not in types:
                names = " and ".join([", ".join(types[:-1]), types[-1]] if len(types) > 1 else types)
                raise _SubKeyError(f".{key}", f"expected no {key} with type {self.type} (it applies to "
                                              f"{names} only)")
        return self


class ExtendSpec(_Strict):
    """The minutes a deadline leaves once no whole trial fits: the study's best trial trained further, from its kept
    adapter, on train rows no trial has seen (held back by `data.train_tokens`, then rows of the source that no split
    took), for as many steps as the time left holds; recorded as one more trial (`extends`). More rows, not more
    passes: on diamonds (1,000 rows, r 8, 2026-12-08) 100 more steps on 400 new rows took a kept adapter from $1,010
    to $905 a row on 400 held-out rows, and 100 steps on 400 of its own rows again to $1,100 (README, "The default
    study")."""

    enabled: bool = False
    # Of the best trial's learning rate, with its warmup and schedule over the new steps: on that adapter 1.0 gained
    # $104 a row and 0.3 $62.
    lr_ratio: float = Field(default=1.0, gt=0, le=10)
    min_steps: int = Field(default=25, ge=1, le=10**6)


def _duration(raw: Any) -> float | None:
    """`90`, `"90s"`, `"30m"`, `"2h"` -> seconds."""
    if raw is None:
        return None
    if isinstance(raw, (int, float)) and not isinstance(raw, bool) and raw > 0:
        return float(raw)
    if isinstance(raw, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", raw)
        if m and float(m.group(1)) > 0:
            return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    raise ValueError(f"expected a duration such as 90, '90s', '30m' or '2h', got {raw!r}")


# A study name is a folder under output_dir and a key in the database (Optuna's column holds 512 characters; a
# folder name 255 bytes): one plain path component, short enough for both.
STUDY_NAME_MAX = 200


def study_name_problem(name: object) -> str | None:
    """What is wrong with a study name, or None. A name that is not one plain path component would put run folders
    outside output_dir (`../x`, `a/b`, an absolute path)."""
    if not isinstance(name, str) or not name.strip():
        return "a non-empty study name"
    if len(name) > STUDY_NAME_MAX or len(name.encode("utf-8", "surrogatepass")) > 255:
        return (f"a study name of at most {STUDY_NAME_MAX} characters and 255 bytes (it names a folder and a "
                f"database row)")
    if name in (".", "..") or any(c in name for c in "/\\") or any(ord(c) < 32 or ord(c) == 127 for c in name):
        return ("a study name that is one plain folder name (no '/', '\\', control characters, '.' or '..'), "
                "so that its run folders stay inside output_dir")
    if name != name.strip():
        return "a study name without leading or trailing spaces"
    return None


class StudySpec(_Strict):
    name: str = "default"
    trials: int = Field(default=4, ge=1, le=MAX_TRIALS)
    timeout: Annotated[float | None, BeforeValidator(_duration)] = None
    # Wall-clock time this worker may take: a new trial starts only while the longest trial it has seen end would
    # still end by then (`worker.trial_estimate`, `worker.deadline_reason`). Trials are never cut at the deadline.
    deadline: Annotated[float | None, BeforeValidator(_duration)] = None
    extend: ExtendSpec = ExtendSpec()
    objective: Literal["mae", "rmsle", "hit_rate"] = "mae"
    sampler: SamplerSpec = SamplerSpec()
    pruner: PrunerSpec = PrunerSpec()
    # Run folders (checkpoints, W&B offline runs). None: `runs/` beside the SQLite file, or ./runs for a server.
    output_dir: str | None = None
    # Optuna artifact store (a folder). None: `artifacts/` next to the SQLite file, or ./artifacts for a server.
    artifacts: str | None = None
    # Trials to run first, before the sampler chooses: each a map of searched settings to values (the rest are
    # sampled), as Optuna's `enqueue_trial`. Enqueued once, when the study is created; checked against the space.
    enqueue: list[dict[str, Any]] = Field(default_factory=list, max_length=1000)
    # A worker that dies stops sending heartbeats; after `grace_period` seconds its trial is failed and retried.
    # Bounded: a heartbeat thread waits `heartbeat_interval` seconds, and a wait past threading.TIMEOUT_MAX dies.
    heartbeat_interval: int = Field(default=30, ge=1, le=3600)
    grace_period: int = Field(default=120, ge=2, le=7 * 86400)
    max_retries: int = Field(default=3, ge=0, le=100)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        problem = study_name_problem(v)
        if problem:
            raise ValueError(f"expected {problem}, got {v[:80]!r}" + ("..." if len(v) > 80 else ""))
        return v

    @model_validator(mode="after")
    def _grace(self) -> "StudySpec":
        # Shorter than two heartbeats, one late beat makes the worker's own live trial look dead and be failed.
        if self.grace_period < 2 * self.heartbeat_interval:
            raise _SubKeyError(".grace_period", f"expected at least twice study.heartbeat_interval "
                                                f"({2 * self.heartbeat_interval} s), got {self.grace_period}")
        return self

    @model_validator(mode="after")
    def _extend_needs_deadline(self) -> "StudySpec":
        # The time left is what sizes the extension: without a deadline there is none to use.
        if self.extend.enabled and self.deadline is None:
            raise _SubKeyError(".extend.enabled", "expected study.deadline to be set too (the extension trains for "
                                                  "the time the deadline leaves), got no deadline")
        return self

    @property
    def direction(self) -> str:
        return OBJECTIVES[self.objective]


# Scoring settings that only one method reads, and that method.
_METHOD_SETTINGS = (("samples", "median"), ("branch_top_k", "branch"), ("branch_places", "branch"))


class ScoringSpec(_Strict):
    # Fixed: quantized kernels are not batch-invariant, so a row's prediction must not depend on free memory.
    batch_size: int = Field(default=32, ge=1, le=65536)
    method: Literal["greedy", "median", "expected_value", "branch"] = "greedy"
    top_k: int = Field(default=10, ge=1, le=1000)
    samples: int = Field(default=31, ge=2, le=1024)  # median: prices drawn per row
    # branch: the top `branch_top_k` tokens at each of the first `branch_places` places of the number, each branch
    # read greedily to its end; the answer is their probability-weighted mean (branch_top_k ** branch_places reads).
    branch_top_k: int = Field(default=3, ge=2, le=10)
    branch_places: int = Field(default=2, ge=1, le=3)

    @model_validator(mode="after")
    def _settings_need_their_method(self) -> "ScoringSpec":
        for key, method in _METHOD_SETTINGS:
            if key in self.model_fields_set and self.method != method:
                raise _SubKeyError(f".{key}", f"expected no {key} with method {self.method} "
                                              f"(only `method: {method}` uses it)")
        return self

    def method_settings(self) -> dict[str, Any]:
        """The settings only this spec's method reads (median's samples, branch's top k and places)."""
        return {key: getattr(self, key) for key, owner in _METHOD_SETTINGS if owner == self.method}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "ScoringSpec":
        """A saved `scoring` record (an adapter's tuner.json, perhaps from the Hub) as a validated spec. Written by
        `model_dump`, it holds every method's settings: those of other methods are dropped; keys it lacks (saved
        before they existed) take today's defaults; the rest is checked as a sweep file's would be, so a tampered
        file cannot ask the scorer for, say, a million branches per row."""
        if not isinstance(record, dict):
            raise ValueError(f"expected a mapping, got {type(record).__name__}")
        method = record.get("method", "greedy")
        others = {key for key, owner in _METHOD_SETTINGS if owner != method}
        return cls.model_validate({k: v for k, v in record.items() if k not in others})


class WandbSpec(_Strict):
    # auto: online with an API key, offline (local files, `wandb sync` later) without one.
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "tuner"
    entity: str | None = None


class HubSpec(_Strict):
    """As the original recipe did: each saved checkpoint pushed, while the trial trains, to a private repository
    `{repo}-trial-{N}`, one commit per checkpoint tagged `step-{S}`. Only with a token (HF_TOKEN or the login
    cache); without one the worker says so once and trains on."""

    push_checkpoints: bool = False
    repo: str | None = None  # OWNER/NAME prefix of the per-trial repositories

    @field_validator("repo")
    @classmethod
    def _repo(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError(f"expected OWNER/NAME, got {v!r}")
        return v


class TrackingSpec(_Strict):
    wandb: WandbSpec = WandbSpec()
    hub: HubSpec = HubSpec()


class SweepConfig(_Strict):
    study: StudySpec = StudySpec()
    model: Annotated[ModelSpace, BeforeValidator(_model)] = ModelSpace(options=(ModelSpec(),))
    data: DataSpec = DataSpec()
    search: SearchSpace = SearchSpace()
    train: TrainSpace = TrainSpace()
    scoring: ScoringSpec = ScoringSpec()
    tracking: TrackingSpec = TrackingSpec()
    source_file: str = "<memory>"


def _largest(d: Dim) -> Any:
    return max(d.values())


def _smallest(d: Dim) -> Any:
    return min(d.values())


def min_total_steps(cfg: SweepConfig, rows: int | None = None) -> int:
    """Optimizer steps of the shortest trial the space allows on `rows` train rows (data.train_rows unless given):
    largest batch and accumulation, fewest epochs."""
    t = cfg.train
    per_epoch = math.ceil((rows or cfg.data.train_rows) / (_largest(t.batch_size) * _largest(t.grad_accum)))
    steps = per_epoch * _smallest(t.epochs)
    return min(steps, t.max_steps) if t.max_steps else steps


def _cross_checks(cfg: SweepConfig) -> list[ConfigError]:
    """Checks that involve several sections; each names the key to change."""
    file, out = cfg.source_file, []
    if cfg.train.eval_every is None and cfg.study.pruner.type != "none":
        out.append(ConfigError(file, "train.eval_every", f"a number of steps, since study.pruner.type is "
                                                         f"{cfg.study.pruner.type!r} (pruning needs intermediate values)"))
    if cfg.train.eval_every is not None:
        shortest = min_total_steps(cfg)
        if cfg.train.eval_every >= shortest:
            out.append(ConfigError(file, "train.eval_every", f"fewer steps than the shortest run this sweep can "
                                   f"make ({shortest} optimizer steps), or it never evaluates", cfg.train.eval_every,
                                   has_got=True))
    if cfg.tracking.hub.push_checkpoints and cfg.tracking.hub.repo is None:
        out.append(ConfigError(file, "tracking.hub.repo", "OWNER/NAME (the prefix of the per-trial repositories) "
                               "when tracking.hub.push_checkpoints is true"))
    if cfg.tracking.hub.push_checkpoints and not cfg.train.checkpoint_every:
        out.append(ConfigError(file, "train.checkpoint_every", "a number of steps when "
                               "tracking.hub.push_checkpoints is true (no checkpoint would be saved to push)"))
    if cfg.train.eval_every is not None and cfg.train.eval_rows > cfg.data.val_rows:
        out.append(ConfigError(file, "train.eval_rows", f"at most data.val_rows ({cfg.data.val_rows})",
                               cfg.train.eval_rows, has_got=True))
    from .space import enqueue_problems  # space reads this module's types

    out += [ConfigError(file, key, expected, got, has_got=True) for key, expected, got in enqueue_problems(cfg)]
    return out


def _format_loc(loc: tuple) -> str:
    # A key that is not printable (a newline in it) is quoted, so that the message stays one line.
    return ".".join(str(p) if str(p).isprintable() else repr(p) for p in loc
                    if not (isinstance(p, str) and p.startswith(("function-", "union["))))


def errors_from(file: str, exc: ValidationError) -> list[ConfigError]:
    out = []
    for err in exc.errors():
        key = _format_loc(err["loc"]) or None
        msg = err["msg"].removeprefix("Value error, ")
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, _SubKeyError):
            key = f"{key}{cause.sub}"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(err["loc"][:-1])
            out.append(ConfigError(file, key, f"a known key (unknown key; allowed here: {', '.join(allowed)})"))
            continue
        if msg.startswith("expected "):
            out.append(ConfigError(file, key, msg[len("expected "):]))
        else:
            out.append(ConfigError(file, key, _expected(err), _short(err.get("input")), has_got=True))
    return out


def _allowed_keys(loc: tuple) -> list[str]:
    model: Any = SweepConfig
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        model = getattr(ann, "__origin__", ann)  # Annotated[X, ...] -> X
        if not hasattr(model, "model_fields"):
            args = getattr(ann, "__args__", ())
            model = next((a for a in args if hasattr(a, "model_fields")), None)
    return [k for k in getattr(model, "model_fields", {}) if k != "source_file"]


def _expected(err: dict) -> str:
    """Pydantic's own error types, said as what is expected."""
    t, ctx = err["type"], err.get("ctx") or {}
    plain = {"int_parsing": "an integer", "int_type": "an integer", "int_from_float": "an integer",
             "float_parsing": "a number", "float_type": "a number", "bool_type": "true or false",
             "bool_parsing": "true or false", "string_type": "a string", "dict_type": "a mapping",
             "model_type": "a mapping", "list_type": "a list", "missing": "a value (this key is required)"}
    if t in plain:
        return plain[t]
    if t == "literal_error":
        return "one of " + str(ctx.get("expected", "")).replace("'", "")
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if t in bounds:
        return f"a value {bounds[t]} {next(iter(ctx.values()))}"
    return err["msg"][0].lower() + err["msg"][1:]


class ConfigErrors(ConfigError):
    """All the problems of one file; the first is the headline."""

    def __init__(self, errors: list[ConfigError]):
        self.errors = errors
        first = errors[0]
        super().__init__(first.file, first.key, first.expected)
        self.args = ("\n".join(str(e) for e in errors),)


def _short(value: Any) -> Any:
    """A value as an error quotes it: long ones cut, so that a message stays one readable line."""
    text = repr(value)
    return value if len(text) <= 80 else _Cut(text[:77] + "...")


class _Cut(str):
    def __repr__(self) -> str:
        return str(self)


def parse_config(data: Any, file: str = "<memory>") -> SweepConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(file, None, "a mapping of sections (study, model, data, search, train, ...)",
                          _short(data), has_got=True)
    bad_key = _non_string_key(data)
    if bad_key:
        raise ConfigError(file, bad_key[0], "names as keys (strings)", _short(bad_key[1]), has_got=True)
    if "source_file" in data:  # tuner's own field, set from the path: not a key of the file
        allowed = ", ".join(_allowed_keys(()))
        raise ConfigError(file, "source_file", f"a known key (unknown key; allowed here: {allowed})")
    try:
        cfg = SweepConfig(**data, source_file=file)
    except ValidationError as exc:
        raise ConfigErrors(errors_from(file, exc)) from None
    problems = _cross_checks(cfg)
    if problems:
        raise ConfigErrors(problems)
    return cfg


def check_study_name(name: str | None, where: str = "--study") -> None:
    """A study name given outside the sweep file (--study, the Python API), held to the sweep file's rule."""
    problem = None if name is None else study_name_problem(name)
    if problem:
        shown = name[:80] + ("..." if len(name) > 80 else "") if isinstance(name, str) else name
        raise ConfigError(where, None, problem, shown, has_got=True)


MAX_SWEEP_BYTES = 256 * 1024  # a sweep file is a few kB; a bigger one is a mistake, and PyYAML is slow on it


class _SweepLoader(yaml.SafeLoader):
    """PyYAML's safe loader, stricter: a key given twice is an error (PyYAML keeps the last silently), and aliases
    (`*name`) are refused, since a few lines of them expand to gigabytes (a "billion laughs")."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a sweep file", mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # a list or mapping as a key: refused when the keys are checked
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _non_string_key(data: Any, where: str = "") -> tuple[str, Any] | None:
    """The first mapping key that is not a string (`1: 2`), with where it is; every key of a sweep file is a name."""
    if isinstance(data, dict):
        for k, v in data.items():
            if not isinstance(k, str):
                return where or "(top level)", k
            found = _non_string_key(v, f"{where}.{k}" if where else k)
            if found:
                return found
    elif isinstance(data, list):
        for i, v in enumerate(data):
            found = _non_string_key(v, f"{where}[{i}]")
            if found:
                return found
    return None


def read_sweep_text(path: Path) -> str:
    """The file's text: bounded in size and UTF-8, or a ConfigError that says which."""
    file = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_SWEEP_BYTES:
            raise ConfigError(file, None, f"a sweep file of at most {MAX_SWEEP_BYTES // 1024} KiB, got {size:,} bytes")
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(file, None, f"a readable sweep file ({exc.strerror or exc})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(file, None, f"UTF-8 text (byte {exc.start} on line {line} is not)") from None


def load_config(path: str | Path, overrides: "list[str] | tuple[str, ...]" = ()) -> SweepConfig:
    """The sweep file, with `--set KEY=VALUE` overrides (`tuner.overrides`) applied before validation."""
    path = Path(path)
    file = str(path)
    if not path.is_file():
        raise ConfigError(file, None, "an existing sweep file")
    text = read_sweep_text(path)
    try:
        data = yaml.load(text, Loader=_SweepLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(file, None, f"valid YAML: {problem}{where}") from None
    except RecursionError:  # thousands of nested brackets
        raise ConfigError(file, None, "valid YAML: nested too deeply") from None
    if data is None:  # an empty file would otherwise run a full default study
        raise ConfigError(file, None, "at least one section (study, model, data, search, train, ...); the file is "
                                      "empty (write `study: {name: NAME}` to run the defaults)")
    if not overrides or not isinstance(data, dict):  # the file's own error first
        return parse_config(data, file)
    from . import overrides as ov

    data = ov.apply(data, overrides, [k for k in SweepConfig.model_fields if k != "source_file"])
    try:
        return parse_config(data, file)
    except ConfigErrors as exc:
        raise ConfigErrors(ov.relabel(exc.errors, overrides)) from None
