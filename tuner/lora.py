"""LoRA adapters on a shared frozen base, each applied to its own rows of the batch.

One `Adapter` is one trial's LoRA: its rank, alpha, dropout and target modules. Any number of adapters can be
attached to one base at once; `Router.segments` says which rows of the current batch belong to which adapter, and
every wrapped linear layer adds each adapter's low-rank update to that adapter's rows only. With a single adapter
this is ordinary LoRA; with several it is co-training, and because an adapter's parameters only ever see its own
rows, its gradients are exactly those it would get alone.

The math and the saved format are peft's (``lora_A``: kaiming-uniform, ``lora_B``: zeros, scale alpha/r; saved as
``adapter_config.json`` + ``adapter_model.safetensors``), so a saved adapter loads with `PeftModel.from_pretrained`.
Dropout masks are drawn from a generator seeded by (adapter seed, call counter, layer), never from the global RNG,
so a trial's masks do not depend on which other trials share the batch, and recomputation under gradient
checkpointing draws the same masks again.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class Router:
    """Which rows of the batch each adapter owns: a list of (adapter name, start row, end row)."""

    segments: list[tuple[str, int, int]] = field(default_factory=list)
    # Per adapter: forward passes it took part in (bumped by the training loop), part of its dropout seed, so that
    # masks change every pass but are identical when gradient checkpointing recomputes the same forward.
    ticks: dict[str, int] = field(default_factory=dict)
    # Per adapter: the padded length its rows would have alone. Masks are drawn at that length and left-padded,
    # so an adapter's masks do not depend on longer rows of other adapters in the same batch.
    own_lengths: dict[str, int] = field(default_factory=dict)
    # Small device tensors that depend only on the batch's layout (row scales, rank-padding indices), built once and
    # reused by every layer: building one per layer costs a host-to-device copy, which waits for the GPU.
    _cache: dict = field(default_factory=dict, repr=False)

    def cached(self, key, build):
        value = self._cache.get(key)
        if value is None:
            if len(self._cache) > 256:
                self._cache.clear()
            value = self._cache[key] = build()
        return value


class LoRAWeights(nn.Module):
    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float, device,
                 generator: torch.Generator):
        super().__init__()
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.scale = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=torch.float32))
        # peft's init: nn.Linear's default (kaiming-uniform, a=sqrt(5)) for A, zeros for B.
        cpu_a = torch.empty(r, in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(cpu_a, a=math.sqrt(5), generator=generator)
        with torch.no_grad():
            self.lora_A.copy_(cpu_a)


class LoRALinear(nn.Module):
    """A frozen linear layer (nn.Linear, bnb Linear4bit or Linear8bitLt) plus per-segment LoRA updates."""

    def __init__(self, base_layer: nn.Module, router: Router, path: str):
        super().__init__()
        self.base_layer = base_layer
        self.router = router
        # Stable per module path (not per wrapping order), so that a trial's dropout masks are the same whichever
        # other adapters were attached first.
        self.layer_id = zlib.crc32(path.encode())
        self.adapters = nn.ModuleDict()
        self.seeds: dict[str, int] = {}

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def _dropout_mask(self, xin: torch.Tensor, segs: list) -> torch.Tensor:
        """Inverted-dropout mask (0 or 1/(1-p)) for every row of the batch. Each adapter's keep pattern comes from a
        generator seeded by the adapter's seed, its own forward count and this layer, drawn at the length its rows
        have alone and placed at the right (rows are left-padded), so that longer neighbours in a co-trained batch
        do not change it. Rows of adapters without dropout keep everything. Two kernels per adapter (draw, place)
        and two per layer: on a GPU, co-training many trials is bound by kernel launches."""
        mask = None
        width = xin.shape[1] if xin.dim() == 3 else None
        for w, name, s, e in segs:
            if w.dropout <= 0:
                continue
            g = torch.Generator(device=xin.device)
            tick = self.router.ticks.get(name, 0)
            g.manual_seed((self.seeds[name] * 1_000_003 + tick * 10_007 + self.layer_id) % (2**63))
            own = width if width is None else min(self.router.own_lengths.get(name, width), width)
            shape = (e - s, *xin.shape[1:]) if width is None else (e - s, own, *xin.shape[2:])
            keep = torch.empty(shape, device=xin.device, dtype=xin.dtype).bernoulli_(1.0 - w.dropout, generator=g)
            if keep.shape == xin.shape:  # one adapter over the whole batch: the draw is the mask
                mask = keep
                break
            if mask is None:
                mask = torch.ones_like(xin)
            if width is None:
                mask[s:e] = keep
            else:
                mask[s:e, width - own:] = keep
        key = ("row_scale", tuple((s, e, w.dropout) for w, _, s, e in segs), mask.shape[0], mask.dim(),
               mask.device, mask.dtype)

        def row_scale() -> torch.Tensor:
            scale = [1.0] * mask.shape[0]
            for w, _, s, e in segs:
                if w.dropout > 0:
                    scale[s:e] = [1.0 / (1.0 - w.dropout)] * (e - s)
            return torch.tensor(scale, device=mask.device, dtype=mask.dtype).view(-1, *[1] * (mask.dim() - 1))

        return mask.mul_(self.router.cached(key, row_scale))

    def _lora_input(self, x: torch.Tensor, w: "LoRAWeights") -> torch.Tensor:
        # fp32 adapters on a bf16 base compute in fp32, as peft does; under autocast (CUDA, bf16) the matmul casts.
        return x if torch.is_autocast_enabled(x.device.type) else x.to(w.lora_A.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if not self.adapters or not self.router.segments:
            return out
        segs = [(self.adapters[n], n, s, e) for n, s, e in self.router.segments if n in self.adapters]
        if not segs:
            return out
        xin = self._lora_input(x, segs[0][0])
        if self.training and any(w.dropout > 0 for w, *_ in segs):
            xin = xin * self._dropout_mask(xin, segs)
        sizes = {e - s for _, _, s, e in segs}
        if len(segs) > 1 and len(sizes) == 1 and segs[0][2] == 0 and segs[-1][3] == out.shape[0] \
                and all(a[3] == b[2] for a, b in zip(segs, segs[1:])):
            return out + self._grouped(xin, segs).to(out.dtype)
        pieces, covered = [], 0
        for w, name, start, end in segs:
            if start > covered:
                pieces.append(out.new_zeros((start - covered, *out.shape[1:])))
            xs = xin[start:end]
            pieces.append(((xs @ w.lora_A.t()) @ w.lora_B.t() * w.scale).to(out.dtype))
            covered = end
        if covered < out.shape[0]:
            pieces.append(out.new_zeros((out.shape[0] - covered, *out.shape[1:])))
        return out + torch.cat(pieces, dim=0)

    def _grouped(self, xin: torch.Tensor, segs: list) -> torch.Tensor:
        """Several adapters over equal, contiguous row segments that cover the batch: two batched matmuls instead
        of a loop of small ones. Ranks differ: A and B are zero-padded to the largest rank, which adds exact zeros.
        The padding is one concatenation and one gather per matrix (with index tensors cached per forward), not a
        copy per adapter: on a GPU, co-training many trials is bound by kernel launches."""
        k = len(segs)
        ranks = tuple(w.r for w, *_ in segs)
        r_max = max(ranks)
        a_list = [w.lora_A for w, *_ in segs]
        b_list = [w.lora_B for w, *_ in segs]
        if min(ranks) == r_max:
            a = torch.stack(a_list)  # [k, r, in]
            b = torch.stack(b_list).transpose(1, 2)  # [k, r, out]
        else:
            ref = a_list[0]

            def gather_index() -> torch.Tensor:
                # row i*r_max+j of the padded stack is row offset_i+j of the concatenation, or the zero row after it
                idx, offset = [], 0
                for r in ranks:
                    idx += list(range(offset, offset + r)) + [sum(ranks)] * (r_max - r)
                    offset += r
                return torch.tensor(idx, device=ref.device)

            idx = self.router.cached(("rank_index", ranks, ref.device), gather_index)
            zero_a = self.router.cached(("zero_row", ref.shape[1], ref.device, ref.dtype),
                                        lambda: ref.new_zeros(1, ref.shape[1]))
            zero_b = self.router.cached(("zero_col", b_list[0].shape[0], ref.device, ref.dtype),
                                        lambda: ref.new_zeros(b_list[0].shape[0], 1))
            a = torch.cat(a_list + [zero_a]).index_select(0, idx).view(k, r_max, -1)
            b = torch.cat(b_list + [zero_b], dim=1).index_select(1, idx).view(-1, k, r_max).permute(1, 2, 0)
        scale = self.router.cached(("scale", tuple(w.scale for w, *_ in segs), xin.device),
                                   lambda: torch.tensor([w.scale for w, *_ in segs], device=xin.device,
                                                        dtype=torch.float32).view(k, 1, 1))
        h = torch.bmm(xin.reshape(k, -1, xin.shape[-1]), a.transpose(1, 2))
        delta = torch.bmm(h, b) * scale
        return delta.reshape(*xin.shape[:-1], delta.shape[-1])


def _linear_types() -> tuple:
    types = [nn.Linear]
    try:
        import bitsandbytes as bnb

        types += [bnb.nn.Linear4bit, bnb.nn.Linear8bitLt]
    except ImportError:  # bitsandbytes is a dependency, but a plain-torch base must still work without it
        pass
    return tuple(types)


def router_of(model: nn.Module) -> Router:
    router = getattr(model, "_tuner_router", None)
    if router is None:
        router = Router()
        model._tuner_router = router
    return router


@dataclass
class Adapter:
    """One trial's LoRA on a base: its hyperparameters and the parameters it owns, by module path."""

    name: str
    r: int
    alpha: float
    dropout: float
    target_modules: list[str]
    seed: int
    weights: dict[str, LoRAWeights]

    def parameters(self) -> list[nn.Parameter]:
        return [p for w in self.weights.values() for p in (w.lora_A, w.lora_B)]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        out = []
        for path, w in self.weights.items():
            out.append((f"{path}.lora_A.weight", w.lora_A))
            out.append((f"{path}.lora_B.weight", w.lora_B))
        return out

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().cpu().clone() for k, p in self.named_parameters()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        mine = dict(self.named_parameters())
        if set(mine) != set(state):
            missing, extra = set(mine) - set(state), set(state) - set(mine)
            raise ValueError(f"adapter state does not match: missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]}")
        with torch.no_grad():
            for k, p in mine.items():
                p.copy_(state[k].to(p.device, p.dtype))


def attach(model: nn.Module, name: str, *, r: int, alpha: float, dropout: float, target_modules: list[str],
           seed: int) -> Adapter:
    """Add adapter `name` to every linear layer whose short name is in `target_modules`."""
    router = router_of(model)
    generator = torch.Generator().manual_seed(seed)
    linear_types = _linear_types()
    weights: dict[str, LoRAWeights] = {}
    # Collect first: the module tree is edited while wrapping.
    found = [(path, mod) for path, mod in model.named_modules()
             if path.rsplit(".", 1)[-1] in target_modules and not path.endswith("lm_head")
             and (isinstance(mod, LoRALinear) or (isinstance(mod, linear_types) and ".base_layer" not in path))]
    for path, mod in found:
        if not isinstance(mod, LoRALinear):
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            wrapper = LoRALinear(mod, router, path)
            wrapper.train(mod.training)  # a new module starts in training mode; keep the model's mode
            setattr(parent, child, wrapper)
            mod = wrapper
        if name in mod.adapters:
            raise ValueError(f"adapter {name!r} is already attached")
        device = next(mod.base_layer.parameters()).device
        w = LoRAWeights(mod.in_features, mod.out_features, r, alpha, dropout, device, generator)
        w.train(mod.training)
        mod.adapters[name] = w
        mod.seeds[name] = seed
        weights[path] = w
    if not weights:
        raise ValueError(f"target modules {target_modules} match no linear layer of the model")
    return Adapter(name, r, float(alpha), float(dropout), list(target_modules), seed, weights)


def detach(model: nn.Module, adapter: Adapter) -> None:
    """Remove the adapter; layers left with no adapter get their original module back, so the base is pristine."""
    for path in list(adapter.weights):
        mod = model.get_submodule(path)
        if isinstance(mod, LoRALinear):
            if adapter.name in mod.adapters:
                del mod.adapters[adapter.name]
            mod.seeds.pop(adapter.name, None)
            if not len(mod.adapters):
                parent_path, _, child = path.rpartition(".")
                parent = model.get_submodule(parent_path) if parent_path else model
                setattr(parent, child, mod.base_layer)
    adapter.weights.clear()


def adapters_attached(model: nn.Module) -> set[str]:
    return {n for m in model.modules() if isinstance(m, LoRALinear) for n in m.adapters}


def save_adapter(adapter: Adapter, folder: str | Path, base_model_name: str, revision: str | None = None) -> Path:
    """peft's on-disk format. Written to a temporary folder and renamed into place: the folder a study records
    is never half-written."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    config = LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                        target_modules=sorted(adapter.target_modules), bias="none", task_type="CAUSAL_LM",
                        base_model_name_or_path=base_model_name, revision=revision)
    config.save_pretrained(tmp)
    state = {f"base_model.model.{k}": v.contiguous() for k, v in adapter.state_dict().items()}
    save_file(state, str(tmp / ADAPTER_WEIGHTS))
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def load_adapter_state(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, tensors keyed like `Adapter.named_parameters`)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    raw = load_file(str(folder / ADAPTER_WEIGHTS))
    return config, {k.removeprefix("base_model.model."): v for k, v in raw.items()}
