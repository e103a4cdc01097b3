"""LoRA adapters on a shared frozen base, each applied to its own rows of the batch.

One `Adapter` is one trial's LoRA: its rank, alpha, dropout and target modules. Any number of adapters can be
attached to one base at once; `Router.segments` says which rows of the current batch belong to which adapter, and
every wrapped linear layer adds each adapter's low-rank update to that adapter's rows only. With a single adapter
this is ordinary LoRA; with several it is co-training, and because an adapter's parameters only ever see its own
rows, its gradients are exactly those it would get alone.

The math and the saved format are peft's (``lora_A``: kaiming-uniform, ``lora_B``: zeros, scale alpha/r, or alpha/sqrt(r) with rsLoRA; saved as
``adapter_config.json`` + ``adapter_model.safetensors``), so a saved adapter loads with `PeftModel.from_pretrained`.
Dropout masks are drawn from a generator seeded by (adapter seed, forward count, input width), never from the
global RNG, so a trial's masks do not depend on which other trials share the batch; they are drawn once per forward,
so recomputation under gradient checkpointing uses the same masks.

Co-training K trials must cost about what one trial costs in kernel launches, because on a GPU a step of small
per-trial batches is bound by them: each layer holds all its adapters' weights as one stacked autograd leaf (each
trial's parameters are views of it), a batch runs two batched matmuls per layer whatever K is ("stacked"), and all
dropout masks of a forward are drawn in a few calls per adapter. `python bench/launches.py` counts operators per
training tick: K=1 9.9k, K=16 11.1k (before this layout: 11.1k and 32.5k). On a CPU a kernel call costs
microseconds and arithmetic is what counts, so there each adapter runs a plain LoRA on its own rows at its own rank
("segments").
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class Router:
    """Which rows of the batch each adapter owns, and what every wrapped layer shares for one forward pass."""

    segments: list[tuple[str, int, int]] = field(default_factory=list)  # (adapter name, start row, end row)
    # Per adapter: forward passes it took part in (bumped by the training loop), part of its dropout seed, so that
    # masks change every pass.
    ticks: dict[str, int] = field(default_factory=dict)
    # Per adapter: the padded length its rows would have alone. Masks are drawn at that length and left-padded,
    # so an adapter's masks do not depend on longer rows of other adapters in the same batch.
    own_lengths: dict[str, int] = field(default_factory=dict)
    # Per adapter: its slot in every layer's weight stacks (1, 2, ...; slot 0 is all zeros and serves rows whose
    # adapter does not adapt that layer).
    slots: dict[str, int] = field(default_factory=dict)
    layers: dict[str, "LoRALinear"] = field(default_factory=dict)  # every wrapped layer, by module path
    dropouts: dict[str, tuple[float, int]] = field(default_factory=dict)  # per adapter: (dropout, seed)
    # How a batch of several adapters' rows is computed: "stacked" (each row gathers its slot, two batched matmuls
    # per layer whatever K is: a GPU is bound by kernel launches), "segments" (one plain LoRA per adapter on its
    # own rows, at its own rank: on a CPU a kernel call costs microseconds and the stacked path's padding to the
    # largest rank and its gathers cost more), or "auto" (stacked on CUDA, segments elsewhere).
    per_row: str = "auto"
    # Small device tensors that depend only on the batch's layout (row slots, row scales), built once and reused by
    # every layer: a host-to-device copy per layer would wait for the GPU each time.
    _cache: dict = field(default_factory=dict, repr=False)
    _masks: tuple | None = field(default=None, repr=False)  # (forward's key, {layer path: keep mask})

    def cached(self, key, build):
        value = self._cache.get(key)
        if value is None:
            if len(self._cache) > 256:
                self._cache.clear()
            value = self._cache[key] = build()
        return value

    def free_slot(self) -> int:
        used = set(self.slots.values())
        return next(i for i in range(1, len(used) + 2) if i not in used)

    def dropout_mask(self, path: str, x: torch.Tensor, name: str | None = None) -> torch.Tensor | None:
        """Layer `path`'s keep mask (bool) for this forward, or None when nothing is dropped there: adapter `name`'s
        for its own rows ([its rows, width, in]), or with no name the whole batch's (shaped like x, ones on rows
        whose adapter does not drop), for the stacked path.

        Every adapter draws the masks of all its layers of one input width in a single call, from a generator
        seeded by its seed and forward count, at the length its rows have alone: its masks are the same whoever
        shares the batch, and the same when gradient checkpointing recomputes the forward (they are drawn once per
        forward and cached). A few kernels per adapter and forward, instead of some per adapter and layer: on a
        GPU, co-training many trials is bound by kernel launches."""
        segs = tuple(self.segments)
        width = x.shape[1] if x.dim() == 3 else 1
        whole = name is None
        key = (segs, tuple(self.ticks.get(n, 0) for n, _, _ in segs), x.shape[0], width, x.device, whole)
        if self._masks is None or self._masks[0] != key:
            # One forward's masks at a time: for an 8B model and 16 trials they take gigabytes.
            self._masks = None
            self._masks = (key, self._draw_masks(segs, x.shape[0], width, x.device, whole))
        mask = self._masks[1].get(path if whole else (name, path))
        return mask if mask is None or x.dim() == 3 else mask[..., 0, :]

    def release_masks(self) -> None:
        """After the backward (which may recompute forwards that need them), the masks are garbage."""
        self._masks = None

    def _draw_masks(self, segs, rows: int, width: int, device, whole: bool) -> dict:
        """{path: the batch's mask} when `whole`, else {(adapter, path): the adapter's mask}. Per adapter, no
        batch-sized buffer is filled with ones first: on a CPU that fill (90 MB for 4 trials on SmolLM2) cost
        more than drawing the masks."""
        dropping = [(n, s, e) for n, s, e in segs if n in self.dropouts and self.dropouts[n][0] > 0]
        if not dropping:
            return {}
        out: dict = {}
        by_width: dict[int, list[str]] = {}
        for path in sorted(self.layers):
            by_width.setdefault(self.layers[path].in_features, []).append(path)
        for in_features, paths in by_width.items():
            batch = torch.ones(len(paths), rows, width, in_features, dtype=torch.bool, device=device) if whole \
                else None
            for name, s, e in dropping:
                mine = [i for i, p in enumerate(paths) if name in self.layers[p].adapters]
                if not mine:
                    continue
                p_drop, seed = self.dropouts[name]
                own = min(self.own_lengths.get(name, width), width)
                g = torch.Generator(device=device)
                g.manual_seed((seed * 1_000_003 + self.ticks.get(name, 0) * 10_007 + in_features) % (2**63))
                shape = (len(mine), e - s, own, in_features)
                if whole:
                    target = batch[:, s:e, width - own:]
                    if len(mine) == len(paths):
                        _keep_mask(shape, p_drop, g, device, out=target)
                    else:
                        target.index_copy_(0, torch.tensor(mine, device=device), _keep_mask(shape, p_drop, g, device))
                    continue
                masks = torch.empty(len(mine), e - s, width, in_features, dtype=torch.bool, device=device)
                masks[:, :, :width - own] = True  # left padding: what it gets is never read
                _keep_mask(shape, p_drop, g, device, out=masks[:, :, width - own:])
                out.update({(name, paths[i]): masks[j] for j, i in enumerate(mine)})
            if whole:
                out.update({p: batch[i] for i, p in enumerate(paths)})
        return out


_MASK_LEVELS = 65536


def keep_probability(dropout: float) -> float:
    """The probability a dropout mask keeps an input, as `_keep_mask` realises it: a multiple of 1/65536 (within
    7.7e-6 of 1 - dropout). The inverted-dropout scale divides by this, so the update stays unbiased."""
    return max(1, round((1.0 - dropout) * _MASK_LEVELS)) / _MASK_LEVELS


def _keep_mask(shape: tuple[int, ...], dropout: float, generator: torch.Generator, device,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """A bool keep mask: 16 random bits per element, compared with a threshold. Measured on a 2-core CPU for one
    forward's masks (19M elements): 13 ms, against 97 ms for `bernoulli_` on bool, which draws a double per
    element serially; a step of four trials drew masks for 12% of its time that way."""
    n = math.prod(shape)
    # The full int64 range (from=min, to=None) makes every bit uniform; the default range leaves the sign bit 0.
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None, generator=generator)
    threshold = round(keep_probability(dropout) * _MASK_LEVELS) - _MASK_LEVELS // 2
    draws = bits.view(torch.int16)[:n].view(shape)
    return draws < threshold if out is None else torch.lt(draws, threshold, out=out)


def _lora_scale(w: "LoRAWeights", training: bool) -> float:
    """alpha/r, and in training the inverted-dropout factor, folded in so the masked input needs no rescaling."""
    return w.scale / keep_probability(w.dropout) if training and w.dropout > 0 else w.scale


class LoRAWeights(nn.Module):
    """One adapter's A and B in one layer: contiguous views of the layer's stacks (its slot, its first r ranks).
    The optimizer steps them in place, and the gradients it reads are views of the stacks' gradients. B is held
    transposed (`lora_Bt`, [r, out]) so that it too is a contiguous view: bitsandbytes' optimizers replace a
    non-contiguous parameter with a contiguous copy, which would cut it from the stack."""

    def __init__(self, r: int, alpha: float, dropout: float, a: torch.Tensor, bt: torch.Tensor,
                 rslora: bool = False):
        super().__init__()
        self.r, self.alpha, self.dropout = r, alpha, dropout
        # rsLoRA (arXiv 2312.03732): alpha/sqrt(r) keeps the update's scale stable as r grows, so high ranks help.
        self.scale = alpha / math.sqrt(r) if rslora else alpha / r
        self.lora_A = nn.Parameter(a)  # [r, in]
        self.lora_Bt = nn.Parameter(bt)  # [r, out]

    @property
    def lora_B(self) -> torch.Tensor:
        """peft's B, [out, r]: a view, so writing into it writes the adapter's weights."""
        return self.lora_Bt.t()


class LoRALinear(nn.Module):
    """A frozen linear layer (nn.Linear, bnb Linear4bit or Linear8bitLt) plus per-row LoRA updates.

    Every adapter attached here owns one slot of two stacks: A as [slots, ranks, in] and B transposed as
    [slots, ranks, out], zero beyond each adapter's own rank (zeros add exact zeros and get exact-zero gradients).
    Each stack is one autograd leaf, so a batch of K adapters costs the same kernels as one: a gather of each row's
    A and B, two batched matmuls and a per-row scale. A lone adapter over every row takes a plain matmul on its own
    ranks."""

    def __init__(self, base_layer: nn.Module, router: Router, path: str):
        super().__init__()
        self.base_layer = base_layer
        self.router = router
        self.path = path
        self.adapters = nn.ModuleDict()
        self.stack_A: torch.Tensor | None = None
        self.stack_B: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    # -- slots -----------------------------------------------------------------------------------------------------
    def _ensure(self, slots: int, ranks: int, device) -> None:
        """Grow the stacks to at least `slots` x `ranks`; every adapter's parameters and gradients are pointed at
        the new storage (the Parameter objects, and so the optimizers' states, stay)."""
        old_a, old_b = self.stack_A, self.stack_B
        if old_a is not None and old_a.shape[0] >= slots and old_a.shape[1] >= ranks:
            return
        if old_a is not None:
            slots, ranks = max(slots, old_a.shape[0]), max(ranks, old_a.shape[1])
        a = torch.zeros(slots, ranks, self.in_features, device=device, dtype=torch.float32)
        b = torch.zeros(slots, ranks, self.out_features, device=device, dtype=torch.float32)
        a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)
        if old_a is not None:
            s, r = old_a.shape[:2]
            with torch.no_grad():
                a[:s, :r].copy_(old_a)
                b[:s, :r].copy_(old_b)
                a.grad[:s, :r].copy_(old_a.grad)
                b.grad[:s, :r].copy_(old_b.grad)
        a.requires_grad_(True)
        b.requires_grad_(True)
        self.stack_A, self.stack_B = a, b
        for name, w in self.adapters.items():
            self._point(w, self.router.slots[name])

    def _point(self, w: LoRAWeights, slot: int) -> None:
        a, b = self.stack_A, self.stack_B
        w.lora_A.data = a.detach()[slot, :w.r]
        w.lora_Bt.data = b.detach()[slot, :w.r]
        w.lora_A.grad = a.grad[slot, :w.r]
        w.lora_Bt.grad = b.grad[slot, :w.r]

    def add(self, name: str, r: int, alpha: float, dropout: float, init_a: torch.Tensor,
            rslora: bool = False) -> LoRAWeights:
        slot = self.router.slots[name]
        device = next(self.base_layer.parameters()).device
        self._ensure(slot + 1, r, device)
        self._clear(slot)
        a, b = self.stack_A.detach(), self.stack_B.detach()
        w = LoRAWeights(r, alpha, dropout, a[slot, :r], b[slot, :r], rslora)
        w.train(self.training)
        self.adapters[name] = w
        self._point(w, slot)
        with torch.no_grad():
            w.lora_A.copy_(init_a)
        return w

    def remove(self, name: str) -> None:
        if name in self.adapters:
            del self.adapters[name]
            self._clear(self.router.slots[name])

    def _clear(self, slot: int) -> None:
        with torch.no_grad():
            for t in (self.stack_A, self.stack_B, self.stack_A.grad, self.stack_B.grad):
                t[slot].zero_()

    # -- forward -----------------------------------------------------------------------------------------------------
    def _lora_input(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 adapters on a bf16 base compute in fp32, as peft does; under autocast (CUDA, bf16) the matmul casts.
        return x if torch.is_autocast_enabled(x.device.type) else x.to(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        segs = [(n, s, e) for n, s, e in self.router.segments if n in self.adapters]
        if not segs:
            return out
        xin = self._lora_input(x)
        if len(self.router.segments) == 1:  # one adapter over every row (one trial, or scoring): plain LoRA
            return out + self._delta(segs[0][0], xin, xin).to(out.dtype)
        mode = self.router.per_row
        if mode == "stacked" or (mode == "auto" and xin.device.type == "cuda"):
            mask = self.router.dropout_mask(self.path, xin) if self.training else None
            if mask is not None:
                xin = xin * mask
            return out + self._per_row(xin).to(out.dtype)
        return self._per_segment(out, xin)

    def _delta(self, name: str, x: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """Adapter `name`'s update for its rows `x` of the batch `batch`, on its own parameters, not slices of the
        stacks: their gradients are views of the stacks' gradients and the backward adds into them in place,
        without a stack-sized zero fill per layer."""
        w = self.adapters[name]
        mask = self.router.dropout_mask(self.path, batch, name) if self.training else None
        if mask is not None:
            x = x * mask
        return (x @ w.lora_A.t()) @ w.lora_Bt * _lora_scale(w, self.training)

    def _per_segment(self, out: torch.Tensor, xin: torch.Tensor) -> torch.Tensor:
        """Each adapter's rows through its own parameters, as if it were alone; rows of adapters not here, and rows
        outside every segment, keep the base output. `split`, not slicing: a slice's backward fills a zero tensor
        of the whole batch per segment (K x the batch per layer; measured: fills took 7% of a 4-trial step)."""
        sizes, owners, pos = [], [], 0
        for n, s, e in self.router.segments:
            if s > pos:
                sizes.append(s - pos)
                owners.append(None)
            sizes.append(e - s)
            owners.append(n if n in self.adapters else None)
            pos = e
        if pos < out.shape[0]:
            sizes.append(out.shape[0] - pos)
            owners.append(None)
        return torch.cat([o if name is None else o + self._delta(name, x, xin).to(o.dtype)
                          for name, o, x in zip(owners, out.split(sizes), xin.split(sizes))])

    def _per_row(self, xin: torch.Tensor) -> torch.Tensor:
        """Each row through its own adapter's A and B (gathered from the stacks by the row's slot), in two batched
        matmuls over the rows; ranks are cut to the largest one in the batch."""
        rows = xin.shape[0]
        segs = tuple(self.router.segments)
        present = tuple(n in self.adapters for n, _, _ in segs)
        ranks = max(self.adapters[n].r for n, _, _ in segs if n in self.adapters)
        training = self.training

        def layout():
            slot = [0] * rows
            scale = [0.0] * rows
            for (n, s, e), here in zip(segs, present):
                if here:
                    w = self.adapters[n]
                    slot[s:e] = [self.router.slots[n]] * (e - s)
                    scale[s:e] = [_lora_scale(w, training)] * (e - s)
            return (torch.tensor(slot, device=xin.device),
                    torch.tensor(scale, device=xin.device, dtype=torch.float32).view(rows, 1, 1))

        # An adapter's slot, scale and dropout are fixed while it is attached, and detach clears the cache.
        key = ("rows", segs, present, rows, training, xin.device)
        slot, scale = self.router.cached(key, layout)
        a, b = self.stack_A, self.stack_B
        if ranks < a.shape[1]:
            a, b = a[:, :ranks], b[:, :ranks]
        if torch.is_autocast_enabled(xin.device.type):  # cast the slots, not the rows gathered from them
            dtype = torch.get_autocast_dtype(xin.device.type)
            a, b = a.to(dtype), b.to(dtype)
        a, b = a.index_select(0, slot), b.index_select(0, slot)  # [rows, ranks, in], [rows, ranks, out]
        x3 = xin.reshape(rows, -1, xin.shape[-1])
        delta = torch.bmm(torch.bmm(x3, a.transpose(1, 2)), b) * scale
        return delta.reshape(*xin.shape[:-1], delta.shape[-1])


def _linear_types() -> tuple:
    types = [nn.Linear]
    try:
        import bitsandbytes as bnb

        types += [bnb.nn.Linear4bit, bnb.nn.Linear8bitLt]
    except ImportError:  # bitsandbytes is a dependency, but a plain-torch base must still work without it
        pass
    return tuple(types)


# Each model's router, kept beside the model rather than on it: `routing` is how callers say which rows are whose.
_ROUTERS: "weakref.WeakKeyDictionary[nn.Module, Router]" = weakref.WeakKeyDictionary()


def router_of(model: nn.Module) -> Router:
    """The model's router, made by the first `attach`. Training and scoring set its rows through `routing`."""
    router = _ROUTERS.get(model)
    if router is None:
        router = _ROUTERS[model] = Router()
    return router


@contextlib.contextmanager
def routing(model: nn.Module, segments: list[tuple], *, ticks: dict[str, int] | None = None):
    """Which adapter owns which rows in the forwards and backwards inside the block, as peft's `adapter_names`
    says it per row. `segments`: (adapter, first row, end row[, the length its rows pad to alone]); rows in no
    segment, or of an adapter not attached to a layer, get the base output. `ticks`: each adapter's forward
    count, part of its dropout seed. A model without tuner adapters has nothing to route."""
    router = _ROUTERS.get(model)
    if router is None:
        yield None
        return
    router.segments = [(seg[0], seg[1], seg[2]) for seg in segments]
    router.own_lengths = {seg[0]: seg[3] for seg in segments if len(seg) > 3}
    router.ticks.update(ticks or {})
    try:
        yield router
    finally:
        router.segments = []
        router.release_masks()  # after the backward (which may recompute forwards that need them) they are garbage


def release_masks(model: nn.Module) -> None:
    router = _ROUTERS.get(model)
    if router is not None:
        router.segments = []
        router.release_masks()


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
    use_rslora: bool = False

    def parameters(self) -> list[nn.Parameter]:
        """What the optimizer steps: A and B transposed (see `LoRAWeights`)."""
        return [p for w in self.weights.values() for p in (w.lora_A, w.lora_Bt)]

    def b_parameters(self) -> list[nn.Parameter]:
        """The B matrices alone (transposed): LoRA+ steps them at a higher learning rate."""
        return [w.lora_Bt for w in self.weights.values()]

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """In peft's names and shapes (B as [out, r])."""
        out = []
        for path, w in self.weights.items():
            out.append((f"{path}.lora_A.weight", w.lora_A))
            out.append((f"{path}.lora_B.weight", w.lora_B))
        return out

    def zero_grad(self) -> None:
        """In place: the gradients are views of the layers' stacked gradients, which the backward adds into."""
        grads = [p.grad for p in self.parameters()]
        if grads:
            torch._foreach_zero_(grads)

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().cpu().clone(memory_format=torch.contiguous_format) for k, p in self.named_parameters()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        mine = dict(self.named_parameters())
        if set(mine) != set(state):
            missing, extra = set(mine) - set(state), set(state) - set(mine)
            raise ValueError(f"adapter state does not match: missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]}")
        with torch.no_grad():
            for k, p in mine.items():
                p.copy_(state[k].to(p.device, p.dtype))


def attach(model: nn.Module, name: str, *, r: int, alpha: float, dropout: float, target_modules: list[str],
           seed: int, use_rslora: bool = False) -> Adapter:
    """Add adapter `name` to every linear layer whose short name is in `target_modules`."""
    router = router_of(model)
    if name in router.slots:
        raise ValueError(f"adapter {name!r} is already attached")
    generator = torch.Generator().manual_seed(seed)
    linear_types = _linear_types()
    # Collect first: the module tree is edited while wrapping.
    found = [(path, mod) for path, mod in model.named_modules()
             if path.rsplit(".", 1)[-1] in target_modules and not path.endswith("lm_head")
             and (isinstance(mod, LoRALinear) or (isinstance(mod, linear_types) and ".base_layer" not in path))]
    if not found:
        raise ValueError(f"target modules {target_modules} match no linear layer of the model")
    router.slots[name] = router.free_slot()
    router.dropouts[name] = (float(dropout), seed)
    weights: dict[str, LoRAWeights] = {}
    for path, mod in found:
        if not isinstance(mod, LoRALinear):
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            wrapper = LoRALinear(mod, router, path)
            wrapper.train(mod.training)  # a new module starts in training mode; keep the model's mode
            setattr(parent, child, wrapper)
            router.layers[path] = wrapper
            mod = wrapper
        # peft's init: nn.Linear's default (kaiming-uniform, a=sqrt(5)) for A, zeros for B; drawn on the CPU from
        # the adapter's own generator, so that it does not depend on the device or on other adapters.
        init_a = torch.empty(r, mod.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(init_a, a=math.sqrt(5), generator=generator)
        weights[path] = mod.add(name, r, alpha, dropout, init_a, use_rslora)
    return Adapter(name, r, float(alpha), float(dropout), list(target_modules), seed, weights, use_rslora)


def detach(model: nn.Module, adapter: Adapter) -> None:
    """Remove the adapter; layers left with no adapter get their original module back, so the base is pristine."""
    router = router_of(model)
    for path in list(adapter.weights):
        mod = model.get_submodule(path)
        if isinstance(mod, LoRALinear):
            mod.remove(adapter.name)
            if not len(mod.adapters):
                parent_path, _, child = path.rpartition(".")
                parent = model.get_submodule(parent_path) if parent_path else model
                setattr(parent, child, mod.base_layer)
                router.layers.pop(path, None)
    router.slots.pop(adapter.name, None)
    router.dropouts.pop(adapter.name, None)
    router.ticks.pop(adapter.name, None)
    router.own_lengths.pop(adapter.name, None)
    router._cache.clear()
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
                        use_rslora=adapter.use_rslora,
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
