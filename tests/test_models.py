"""The model as a sweep dimension: a second small model made here (a randomly initialised Llama saved with the
SmolLM2 tokenizer), trials that record which model they used, baselines and base reuse per model, and a model
list with an entry that cannot be resolved refused before any trial starts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import tiny_sweep, tuner_cmd
from tuner.config import load_config
from tuner.worker import WorkerOptions, run_worker


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, smol):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(smol.path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _sweep(tmp_path: Path, models: str, trials: int) -> Path:
    path = tiny_sweep(tmp_path, name="models", trials=trials, train_rows=8, test_rows=8, wandb="disabled",
                      quant="16")
    text = path.read_text().replace("study: {", "study: {sampler: {type: grid, seed: 0}, ")
    text = text.replace("r: {min: 8, max: 16}", "r: 8").replace("dropout: {low: 0.0, high: 0.1}", "dropout: 0.0")
    text = text.replace("target_modules: {choices: [attention, attention+mlp]}", "target_modules: attention")
    text = text.replace("learning_rate: {low: 1.0e-3, high: 3.0e-3, log: true}", "learning_rate: 2.0e-3")
    path.write_text(f"model: {models}\n" + text)
    return path


def test_the_model_is_sampled_recorded_and_grouped(tmp_path, tiny_llama):
    sweep = _sweep(tmp_path, f"[builtin:smollm2-135m-instruct, {tiny_llama}]", trials=2)
    url = f"sqlite:///{tmp_path}/s.db"
    run_worker(load_config(sweep), WorkerOptions(storage_url=url))
    study = optuna.load_study(study_name="models", storage=url)
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2, [t.user_attrs for t in trials]
    used = sorted(t.params["model"] for t in trials)
    assert used == sorted(["builtin:smollm2-135m-instruct", str(tiny_llama)])
    for t in trials:
        assert t.user_attrs["model"] == t.params["model"]
        # Two models never share a base: each trial trained alone despite co-training being on.
        assert t.user_attrs["execution"]["group_size"] == 1
    base = study.user_attrs["baselines"]
    assert {"base_model_smollm2_135m_instruct_16bit", f"base_model_{tiny_llama.name.replace('-', '_')}_16bit"} \
        <= set(base)
    status = subprocess.run(tuner_cmd() + ["status", "models", "--storage", url], capture_output=True, text=True,
                            env={**os.environ}, timeout=120)
    assert status.returncode == 0 and "model" in status.stdout and tiny_llama.name in status.stdout


def test_an_unresolvable_model_is_refused_before_any_trial(tmp_path, tiny_llama):
    sweep = _sweep(tmp_path, f"[{tiny_llama}, nobody/no-such-model]", trials=2)
    url = f"sqlite:///{tmp_path}/s.db"
    res = subprocess.run(tuner_cmd() + ["run", str(sweep), "--storage", url], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 2
    assert "model[1] 'nobody/no-such-model'" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s.db").exists()  # refused before the study (let alone a trial) was created
