"""The search space: an `optuna.Trial` (or any object with the same `suggest_*` methods) to `TrialParams`.

The rank is sampled as its exponent (an integer, so the sampler keeps the order 8 < 16 < 32) and recorded as `r`,
the value users see, in the trial's user attributes. Fixed settings are not suggested at all: they do not clutter
the parameter table, and changing one in the YAML is a different study (see `space_signature`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from .config import Dim, SweepConfig


class Suggester(Protocol):
    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int: ...
    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float: ...
    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


@dataclass(frozen=True)
class TrialParams:
    """Everything that defines one trial's math. `target_modules` is resolved against the model."""

    r: int
    alpha: float
    dropout: float
    target_set: str
    target_modules: tuple[str, ...]
    quant_bits: int
    learning_rate: float
    epochs: int
    batch_size: int  # rows per optimizer step per gradient-accumulation step; effective = batch_size * grad_accum
    grad_accum: int
    max_length: int
    optimizer: str
    scheduler: str
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float
    seed: int
    max_steps: int | None = None
    model: str = ""
    use_rslora: bool = False  # scale alpha/sqrt(r) instead of alpha/r
    loraplus_ratio: float = 1.0  # B's learning rate / A's (LoRA+)
    number_loss: float = 0.0  # weight of the number-token loss at the price's digits (0: cross-entropy alone)

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrialParams":
        d = dict(d)
        d["target_modules"] = tuple(d["target_modules"])
        return cls(**d)


# Every sampled setting but the model, r and alpha (which have shapes of their own), by section of the sweep file,
# with its type. Sampling, the study's signature and grid spaces are all read off these tables. The order is the
# order of the `suggest` calls, which a seeded sampler's draws depend on.
SEARCH_SETTINGS: dict[str, type] = {"target_modules": str, "dropout": float, "quant_bits": int, "learning_rate": float,
                                    "use_rslora": bool, "loraplus_ratio": float}
# Settings added after studies existed: at their default they stay out of the signature, so that a study made
# before them is still the same search.
LATER_DEFAULTS: dict[str, object] = {"use_rslora": False, "loraplus_ratio": 1.0, "number_loss": 0.0}
TRAIN_SETTINGS: dict[str, type] = {"epochs": int, "batch_size": int, "grad_accum": int, "max_length": int,
                                   "optimizer": str, "scheduler": str, "warmup_ratio": float, "weight_decay": float,
                                   "max_grad_norm": float, "number_loss": float}


def setting_dims(cfg: SweepConfig) -> dict[str, tuple[Dim, type]]:
    """Each table setting's dimension in this sweep, with its type."""
    out = {name: (getattr(cfg.search, name), kind) for name, kind in SEARCH_SETTINGS.items()}
    out.update({name: (getattr(cfg.train, name), kind) for name, kind in TRAIN_SETTINGS.items()})
    return out


def _suggest(trial: Suggester, name: str, dim: Dim, kind: type) -> Any:
    if dim.kind == "fixed":
        return kind(dim.value)
    if dim.kind == "choices":
        return kind(trial.suggest_categorical(name, list(dim.choices)))
    if kind is int:
        return trial.suggest_int(name, int(dim.low), int(dim.high), step=int(dim.step or 1), log=dim.log)
    return trial.suggest_float(name, dim.low, dim.high, step=dim.step, log=dim.log)


def sample(trial: Suggester, cfg: SweepConfig, available_modules: "set[str] | dict[str, set[str]] | None" = None,
           max_lengths: dict[str, int] | None = None) -> TrialParams:
    """Draw one trial's parameters. `available_modules` (the model's linear layer names, or per model key) resolves
    target sets; a set that matches nothing was refused at study start, so here it only narrows the list.
    `max_lengths`: per model key, what `max_length: auto` resolved to on the data (`prepare`)."""
    s, t = cfg.search, cfg.train
    model = cfg.model.keys()[0] if cfg.model.is_fixed else trial.suggest_categorical("model", cfg.model.keys())
    ranks = s.r.values()
    if len(ranks) == 1:
        r = ranks[0]
    else:
        # Sampled as `r` itself, one choice per doubling: the value every tool shows (optuna-dashboard, importances)
        # is the rank trained. TPE loses the order 8 < 16 < 32 (it had it when this was the exponent `r_exp`); over
        # the few doublings a sweep spans that costs little, and studies made with `r_exp` still read as `r`.
        r = int(trial.suggest_categorical("r", list(ranks)))
    if s.alpha.value is not None:
        alpha = float(s.alpha.value)
    else:
        alpha = float(_suggest(trial, "alpha_ratio", s.alpha.ratio, float)) * r
    dims = setting_dims(cfg)
    auto = dims["max_length"][0].value == "auto"
    if auto:  # resolved from the data, not drawn
        del dims["max_length"]
    values = {name: _suggest(trial, name, dim, kind) for name, (dim, kind) in dims.items()}
    if auto:
        if not max_lengths or model not in max_lengths:
            raise ValueError("train.max_length auto has not been resolved on the data (prepare.prepare does that)")
        values["max_length"] = int(max_lengths[model])
    target_set = values.pop("target_modules")
    wanted = s.target_set(target_set)
    if isinstance(available_modules, dict):
        available_modules = available_modules[model]
    modules = tuple(m for m in wanted if available_modules is None or m in available_modules)
    return TrialParams(r=r, alpha=alpha, target_set=target_set, target_modules=modules, **values, seed=t.seed,
                       max_steps=t.max_steps, model=model)


def searched_dims(cfg: SweepConfig) -> dict[str, tuple[Dim, type]]:
    """The settings this sweep samples (not fixed), by the parameter name a trial records: what `study.enqueue`
    may name."""
    dims = {name: dim for name, dim in setting_dims(cfg).items() if not dim[0].is_fixed}  # max_length auto: fixed
    if not cfg.model.is_fixed:
        dims["model"] = (Dim("choices", choices=tuple(cfg.model.keys())), str)
    if len(cfg.search.r.values()) > 1:
        dims["r"] = (Dim("choices", choices=tuple(cfg.search.r.values())), int)
    if cfg.search.alpha.value is None and not cfg.search.alpha.ratio.is_fixed:
        dims["alpha_ratio"] = (cfg.search.alpha.ratio, float)
    return dims


def enqueue_problems(cfg: SweepConfig) -> list[tuple[str, str, Any]]:
    """(key, expected, got) for each `study.enqueue` value that the search space could not have drawn."""
    dims, out = searched_dims(cfg), []
    names = ", ".join(sorted(dims)) or "none: every setting is fixed"
    if len(cfg.study.enqueue) > cfg.study.trials:  # a queued trial runs even past the budget: keep them within it
        out.append(("study.enqueue", f"at most study.trials ({cfg.study.trials}) first trials",
                    len(cfg.study.enqueue)))
    for i, entry in enumerate(cfg.study.enqueue):
        for name, value in entry.items():
            key = f"study.enqueue[{i}].{name}"
            if name not in dims:
                out.append((key, f"a setting this sweep searches ({names})", value))
                continue
            dim, kind = dims[name]
            if name == "learning_rate" and isinstance(value, dict):
                out += _scaled_rate_problems(cfg, entry, key, dim, value)
                continue
            if dim.kind == "choices":
                if _choice(dim, value) is None:
                    out.append((key, f"one of {list(dim.choices)}", value))
                continue
            number = _in_range(kind, value)
            if number is None:
                out.append((key, f"{'an integer' if kind is int else 'a number'} in [{dim.low:g}, {dim.high:g}]",
                            value))
            elif not dim.low <= number <= dim.high:
                out.append((key, f"a value in [{dim.low:g}, {dim.high:g}]", value))
    return out


def _in_range(kind: type, value: Any) -> Any:
    """A range's value read as the range's own keys are ("2e-3", which YAML 1.1 leaves a string, is a number), or
    None."""
    from .config import _integer, _number

    try:
        return (_integer if kind is int else _number)(value)
    except (TypeError, ValueError):
        return None


def _choice(dim: Dim, value: Any) -> Any:
    """The choice `value` names (4 names 4.0, but true never names 1), or None."""
    for c in dim.choices:
        if value == c and isinstance(value, bool) == isinstance(c, bool):
            return c
    return None


def _scaled_rate_problems(cfg: SweepConfig, entry: dict, key: str, dim: Dim, value: dict) -> list:
    """Problems of `learning_rate: {value: RATE, at_steps: STEPS}` in a queued trial (see `scaled_rate`)."""
    if dim.kind == "choices":  # a rate moved to the data's steps would not be one of the choices
        return [(key, f"one of {list(dim.choices)} (a scaled rate needs a range)", value)]
    expected = (f"a number in [{dim.low:g}, {dim.high:g}], or {{value: RATE, at_steps: STEPS}} (RATE at STEPS "
                f"optimizer steps, scaled to this data's steps)")
    rate = _in_range(float, value.get("value"))
    steps = _in_range(int, value.get("at_steps"))
    if set(value) != {"value", "at_steps"} or rate is None or steps is None or steps < 1:
        return [(key, expected, value)]
    if not dim.low <= rate <= dim.high:
        return [(key + ".value", f"a value in [{dim.low:g}, {dim.high:g}]", rate)]
    # The trial's steps must be known before it runs: from the entry or fixed in train.
    loose = [n for n in ("batch_size", "grad_accum", "epochs") if n not in entry and not getattr(cfg.train, n).is_fixed]
    if loose:
        return [(key, f"a fixed rate, since train.{loose[0]} is searched and this trial does not set it (a scaled "
                      f"rate needs the trial's optimizer steps)", value)]
    return []


def queued_steps(cfg: SweepConfig, entry: dict, train_rows: int) -> int:
    """Optimizer steps of a queued trial on `train_rows` rows: its own batch, accumulation and epochs where it sets
    them, else the fixed ones (checked at parse time)."""
    def get(name: str) -> int:
        return int(entry[name]) if name in entry else int(getattr(cfg.train, name).value)

    steps = math.ceil(train_rows / (get("batch_size") * get("grad_accum"))) * get("epochs")
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps


def scaled_rate(rate: float, at_steps: int, steps: int, low: float, high: float) -> float:
    """`rate`, measured best at `at_steps` optimizer steps, moved to `steps`: times sqrt(at_steps / steps), held to
    the searched range. Why the square root: for a fixed horizon of T steps the best constant SGD step size scales as
    1/sqrt(T), and here it fits what was measured: about 1.5e-3 best for diamonds' 250 steps, 2.3e-3 to 2.5e-3 for
    the Ames listings' 88 (sqrt(250/88) is 1.69; README, "The default study")."""
    return min(high, max(low, rate * math.sqrt(at_steps / steps)))


def enqueued_params(cfg: SweepConfig, train_rows: int | None = None) -> list[dict[str, Any]]:
    """`study.enqueue`, each value as the space holds it (a choice as the choice itself). Checked at parse time.
    A scaled learning rate is resolved on `train_rows` (the rows a trial trains on, after data.train_tokens)."""
    dims, out = searched_dims(cfg), []
    for entry in cfg.study.enqueue:
        params = {}
        for name, v in entry.items():
            dim, kind = dims[name]
            if isinstance(v, dict):  # {value, at_steps}: only learning_rate takes it (enqueue_problems)
                if train_rows is None:
                    raise ValueError("a scaled learning_rate in study.enqueue needs the train rows")
                params[name] = _queued_rate(cfg, entry, train_rows)[0]
            else:
                params[name] = _choice(dim, v) if dim.kind == "choices" else _in_range(kind, v)
        out.append(params)
    return out


def _queued_rate(cfg: SweepConfig, entry: dict, train_rows: int) -> tuple[float, float, int]:
    """A queued trial's scaled learning rate: (the rate it trains at, the rate before the searched range held it,
    its optimizer steps)."""
    v, dim = entry["learning_rate"], cfg.search.learning_rate
    rate, at = _in_range(float, v["value"]), _in_range(int, v["at_steps"])
    steps = queued_steps(cfg, entry, train_rows)
    return scaled_rate(rate, at, steps, dim.low, dim.high), scaled_rate(rate, at, steps, 0.0, math.inf), steps


def scaled_rate_notes(cfg: SweepConfig, train_rows: int) -> list[str]:
    """One line per scaled learning rate in `study.enqueue`, for the run output and `tuner data`."""
    out = []
    for i, entry in enumerate(cfg.study.enqueue):
        v = entry.get("learning_rate")
        if isinstance(v, dict):
            rate, raw, steps = _queued_rate(cfg, entry, train_rows)
            at = int(_in_range(int, v["at_steps"]))
            held = ("within the searched range" if rate == raw else
                    f"{raw:.3g}, held to search.learning_rate's {'high' if raw > rate else 'low'} {rate:g}")
            out.append(f"study.enqueue[{i}].learning_rate: {float(v['value']):g} at {at} steps is {rate:.3g} at "
                       f"this data's {steps} (times sqrt({at}/{steps}), {held})")
    return out


def space_signature(cfg: SweepConfig) -> dict:
    """What makes two studies comparable: the search space, the fixed training settings, the model and the data.
    Stored on the study; a run whose file differs is refused (unless forced) with the difference named."""
    def dim(d: Dim) -> Any:
        return d.describe()

    s, t, data = cfg.search, cfg.train, cfg.data

    def later(section, k: str) -> bool:  # a setting added after studies existed, at its default
        d = getattr(section, k)
        return d.is_fixed and LATER_DEFAULTS.get(k, object()) == d.value

    return {
        "model": cfg.model.keys() if not cfg.model.is_fixed else cfg.model.options[0].name,
        "model_revision": cfg.model.revision,
        "data": {"source": data.source, "train_rows": data.train_rows, "val_rows": data.val_rows,
                 "test_rows": data.test_rows, "seed": data.seed, "text_column": data.text_column,
                 "price_column": data.price_column}
        | ({"train_tokens": data.train_tokens} if data.train_tokens is not None else {}),  # absent: studies before it
        "objective": cfg.study.objective,
        "r": [s.r.min, s.r.max],
        "alpha": s.alpha.value if s.alpha.value is not None else {"ratio": dim(s.alpha.ratio)},
        **{k: dim(getattr(s, k)) for k in SEARCH_SETTINGS if not later(s, k)},
        "target_sets": {k: s.target_set(k) for k in s.target_modules.values()},
        "train": {k: dim(getattr(t, k)) for k in TRAIN_SETTINGS if not later(t, k)}
        | {"seed": t.seed, "max_steps": t.max_steps},
        # How a price is read decides the objective's value. Greedy (the default) is absent: studies before it.
        **({"scoring": {"method": cfg.scoring.method} | cfg.scoring.method_settings()}
           if cfg.scoring.method != "greedy" else {}),
    }


def grid_space(cfg: SweepConfig) -> dict[str, list]:
    """Optuna's GridSampler space: every sampled setting must be fixed or a list of choices."""
    from .config import ConfigError

    space: dict[str, list] = {}
    if not cfg.model.is_fixed:
        space["model"] = cfg.model.keys()
    ranks = cfg.search.r.values()
    if len(ranks) > 1:
        space["r"] = list(ranks)
    dims = {name: dim for name, (dim, _) in setting_dims(cfg).items()}
    if cfg.search.alpha.value is None:
        dims["alpha_ratio"] = cfg.search.alpha.ratio
    for name, dim in dims.items():
        if dim.kind == "range":
            raise ConfigError(cfg.source_file, name, "a fixed value or {choices: [...]} with study.sampler.type grid")
        if dim.kind == "choices":
            space[name] = list(dim.choices)
    return space


def signature_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two signatures: 'search.r: [8, 64] -> [8, 32]'."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += signature_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {json.dumps(a)} -> {json.dumps(b)}")
    return out


def signature_hash(sig: dict) -> str:
    return hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:12]
