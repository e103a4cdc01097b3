"""tuner: sweep orchestrator and experiment tracker for LoRA/QLoRA price-prediction fine-tunes."""

from __future__ import annotations

import logging
import os
import warnings

__version__ = "0.1.0"

# Library chatter that says nothing actionable to a tuner user; real problems still surface as exceptions.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("WANDB_SILENT", "true")
# bitsandbytes looks for a Hub kernel used only by its AVX512-BF16 repacking path, which tuner turns off.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# 8-bit layers cast their input to float16 by design; said once per forward, per layer.
logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r".*is experimental \(supported from")
warnings.filterwarnings("ignore", message=r"Argument ``.*`` is an experimental feature")
