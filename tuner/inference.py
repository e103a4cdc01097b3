"""Prediction with a published adapter (`tuner predict`, `tuner.predict`): a local folder or a Hub repository (at
any revision). Named `inference`, not `predict`, so that `tuner.predict` stays the API function.

The adapter's `tuner.json` says which base model it was trained on, with which quantization, how it is prompted and
scored. The base is loaded the same way, the adapter applied with `PeftModel.from_pretrained(base, adapter,
revision=...)`, and prices are read with the project's scorer. A base model that is not the one the adapter was
trained for is refused before any weights are loaded.
"""

from __future__ import annotations

import csv
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from . import artifacts, models
from .artifacts import AdapterInfo
from .config import DataSpec, ModelSpec
from .errors import TunerError

REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


class PredictError(TunerError):
    """An adapter or base model that cannot be used as asked."""


@dataclass(frozen=True)
class AdapterSource:
    """Where the adapter is: a local folder, or a Hub repository pinned to one commit."""

    ref: str  # the folder, or OWNER/NAME
    hub: bool
    commit: str | None = None  # the commit the asked revision resolved to (Hub only)
    revision: str | None = None  # as asked

    def describe(self) -> str:
        if not self.hub:
            return self.ref
        asked = f"{self.revision} = " if self.revision and self.revision != self.commit else ""
        return f"{self.ref}@{asked}{self.commit[:12]}"


def locate(adapter: str, revision: str | None = None) -> AdapterSource:
    """A local folder if one exists at `adapter`, else a Hub id; a Hub revision (branch, tag or commit) is resolved
    to its commit once, so that the config and the weights come from the same commit."""
    path = Path(adapter).expanduser()
    if path.is_dir():
        if revision is not None:
            raise PredictError(f"--revision {revision!r}: only a Hub adapter has revisions; {adapter} is a folder")
        return AdapterSource(str(path.resolve()), hub=False)
    if not REPO_ID.fullmatch(adapter):
        raise PredictError(f"--adapter {adapter!r}: no such folder, and not a Hub id OWNER/NAME")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi().model_info(adapter, revision=revision)
    except RevisionNotFoundError:
        raise PredictError(f"--revision {revision!r}: no such branch, tag or commit in {adapter}") from None
    except RepositoryNotFoundError:
        raise PredictError(f"--adapter {adapter}: no such repository on the Hub, or it is private and no token with "
                           f"access was found (set HF_TOKEN or run `hf auth login`)") from None
    except HfHubHTTPError as exc:
        raise PredictError(f"--adapter {adapter}: the Hub answered {str(exc).splitlines()[0][:200]}") from None
    except Exception as exc:  # connection errors come in many types; the user needs the endpoint and the reason
        from huggingface_hub import constants

        raise PredictError(f"--adapter {adapter}: cannot reach the Hub at {constants.ENDPOINT} ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    return AdapterSource(adapter, hub=True, commit=info.sha, revision=revision)


def read_info(src: AdapterSource) -> AdapterInfo:
    if not src.hub:
        path = Path(src.ref) / artifacts.INFO_FILE
        if not path.is_file():
            raise PredictError(f"{src.ref}: no {artifacts.INFO_FILE}; not an adapter published by tuner (use "
                               f"`tuner promote STUDY --to DIR` to get one)")
        return AdapterInfo.read(path, src.ref)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        path = hf_hub_download(src.ref, artifacts.INFO_FILE, revision=src.commit)
    except EntryNotFoundError:
        raise PredictError(f"{src.describe()}: no {artifacts.INFO_FILE}; not an adapter published by tuner") from None
    return AdapterInfo.read(Path(path), src.describe())


def resolve_base(info: AdapterInfo, base: str | None, src: AdapterSource) -> tuple[models.ResolvedModel, str | None]:
    """The base to load, and a note when it is not the adapter's own base by name. A base whose architecture
    differs from the one the adapter was trained on is refused."""
    from transformers import AutoConfig

    name = base or info.base_model
    revision = info.base_revision if base is None or base == info.base_model else None
    resolved = models.resolve_model(ModelSpec(name=name, revision=revision))
    try:
        config = AutoConfig.from_pretrained(resolved.path, revision=resolved.revision)
    except Exception as exc:
        raise PredictError(f"base model {name!r}: cannot read its config ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:200]})") from None
    found = artifacts.base_fingerprint(config)
    if found != info.base_fingerprint:
        diff = ", ".join(f"{k} {info.base_fingerprint.get(k)} vs {found.get(k)}" for k in artifacts.FINGERPRINT_KEYS
                         if found.get(k) != info.base_fingerprint.get(k))
        raise PredictError(f"adapter {src.describe()} was trained for base model {info.base_model!r}; {name!r} is "
                           f"another model ({diff})")
    note = None
    if name != info.base_model:
        note = (f"--base {name} is not the adapter's base {info.base_model!r} by name; its architecture matches "
                f"({', '.join(f'{k}={v}' for k, v in found.items() if v is not None)})")
    return resolved, note


@dataclass
class Predictor:
    source: AdapterSource
    info: AdapterInfo
    base: models.Base
    model: object  # the base model with the adapter's LoRA layers in it
    scorer: object
    note: str | None = None

    def prompts(self, texts: Sequence[str]) -> list[str]:
        from .data import make_prompt

        spec = DataSpec(question=self.info.question, answer_prefix=self.info.answer_prefix)
        return [make_prompt(t, spec) for t in texts]

    def predict(self, texts: Sequence[str]) -> list:
        return self.scorer.predict(self.model, self.prompts(texts)).predictions


def load(adapter: str, *, revision: str | None = None, base: str | None = None, device: str | None = None,
         batch_size: int | None = None) -> Predictor:
    src = locate(adapter, revision)
    info = read_info(src)
    resolved, note = resolve_base(info, base, src)
    # Heavy imports only once the request is known to be good: a refusal should be quick.
    from peft import PeftModel

    from .scoring import PriceScorer

    device = models.pick_device(device)
    # The adapter's quantization and compute dtype, not whatever this machine would pick.
    compute = info.quantization.get("compute_dtype") or info.quantization.get("dtype")
    loaded = models.load_base(resolved, info.bits, device, cpu_bf16=compute == "bfloat16")
    kwargs = {"revision": src.commit} if src.hub else {}
    with warnings.catch_warnings():
        # peft asks transformers about gradient checkpointing through a name transformers has deprecated.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = PeftModel.from_pretrained(loaded.model, src.ref, **kwargs).eval()
    # Validated and completed with today's defaults by AdapterInfo: ScoringSpec's fields, PriceScorer's arguments.
    scorer = PriceScorer(loaded.tokenizer, max_price=info.max_price,
                         **(info.scoring | {"batch_size": batch_size or info.scoring["batch_size"]}))
    # The scorer drives the transformers model directly (its cache argument is named per transformers version,
    # which PeftModel's generic forward hides); peft's LoRA layers live inside that model.
    return Predictor(src, info, loaded, peft_model.get_base_model(), scorer, note)


def read_rows(path: str, text_column: str = "text",
              price_column: str = "price") -> tuple[list[str], list[float] | None]:
    """Descriptions (and prices, when the file has them) from a CSV file."""
    p = Path(path)
    if not p.is_file():
        raise PredictError(f"--file {path}: no such file")
    with open(p, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or text_column not in reader.fieldnames:
            raise PredictError(f"--file {path}: no column {text_column!r} (columns: {reader.fieldnames}); "
                               f"set --text-column")
        rows = list(reader)
    if not rows:
        raise PredictError(f"--file {path}: no rows")
    texts = [r[text_column] for r in rows]
    for i, t in enumerate(texts):
        if not t or not t.strip():
            raise PredictError(f"--file {path}: row {i + 1} has an empty {text_column!r}")
    if price_column not in (reader.fieldnames or []):
        return texts, None
    try:
        prices = [float(r[price_column]) for r in rows]
    except ValueError as exc:
        raise PredictError(f"--file {path}: column {price_column!r} is not all numbers ({exc})") from None
    return texts, prices


def write_rows(path: str, texts: Sequence[str], predictions: Sequence, prices: Sequence[float] | None) -> Path:
    p = Path(path)
    with open(p, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "prediction", "decoded"] + (["price"] if prices is not None else []))
        for i, (t, pr) in enumerate(zip(texts, predictions)):
            w.writerow([t, "" if pr.value is None else f"{pr.value:g}", pr.text]
                       + ([f"{prices[i]:g}"] if prices is not None else []))
    return p


def describe(info: AdapterInfo) -> str:
    return (f"study {info.study}, trial {info.trial}; base {info.base_model}"
            f"{'@' + info.base_revision if info.base_revision else ''}, {info.bits}-bit; "
            f"r={info.params.get('r')} alpha={info.params.get('alpha')} {json.dumps(info.params.get('target_set'))}")
