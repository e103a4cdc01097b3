"""tuner's LoRA layers compute what peft computes, save in peft's format, and leave the base untouched when
removed; several adapters on one batch each see only their own rows."""

from __future__ import annotations

import pytest
import torch

from tuner import lora

# How a batch of several adapters is computed: CUDA's default gathers each row's slot of the stacked weights, the
# CPU's runs each adapter on its own rows. Both run here.
PATHS = pytest.mark.parametrize("per_row", ["stacked", "segments"])


def _batch(tok, texts):
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True)
    tok.padding_side = "right"
    pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], position_ids=pos)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _randomize_b(adapter, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in adapter.weights.values():
            w.lora_B.copy_(torch.randn(w.lora_B.shape, generator=g) * 0.02)


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha-over-r", "rslora"])
def test_saved_adapter_loads_in_peft_with_identical_logits(smol, base16, tmp_path, rslora):
    from peft import PeftModel

    from tuner.models import load_base

    model, tok = base16.model, base16.tokenizer
    batch = _batch(tok, ["How much does this cost?\n\nA chair.\n\nPrice is $", "Price is $"])
    plain = _logits(model, batch)
    adapter = lora.attach(model, "a", r=8, alpha=32, dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"],
                          seed=1, use_rslora=rslora)
    assert next(iter(adapter.weights.values())).scale == (32 / 8 ** 0.5 if rslora else 32 / 8)
    _randomize_b(adapter, 0)
    lora.router_of(model).segments = [("a", 0, 2)]
    ours = _logits(model, batch)
    lora.save_adapter(adapter, tmp_path / "adapter", smol.name)
    lora.router_of(model).segments = []
    lora.detach(model, adapter)

    other = load_base(smol, 16, "cpu", cpu_bf16=False)
    peft_model = PeftModel.from_pretrained(other.model, tmp_path / "adapter").eval()
    theirs = _logits(peft_model, batch)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    assert (ours - plain).abs().max() > 1e-3  # the adapter did something, so the match means something
    cfg, tensors = lora.load_adapter_state(tmp_path / "adapter")
    assert cfg["use_rslora"] is rslora
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 32 and sorted(cfg["target_modules"]) == ["down_proj", "q_proj",
                                                                                          "v_proj"]
    assert len(tensors) == 2 * 30 * 3


def test_detach_restores_the_base_exactly(base16):
    model, tok = base16.model, base16.tokenizer
    batch = _batch(tok, ["Price is $", "How much does this cost?"])
    before = _logits(model, batch)
    modules_before = {n: type(m).__name__ for n, m in model.named_modules()}
    adapter = lora.attach(model, "x", r=16, alpha=16, dropout=0.0, target_modules=["q_proj", "o_proj"], seed=3)
    _randomize_b(adapter, 1)
    lora.router_of(model).segments = [("x", 0, 2)]
    assert not torch.equal(_logits(model, batch), before)
    lora.router_of(model).segments = []
    lora.detach(model, adapter)
    assert torch.equal(_logits(model, batch), before)
    assert {n: type(m).__name__ for n, m in model.named_modules()} == modules_before
    assert lora.adapters_attached(model) == set()


@PATHS
def test_each_adapter_sees_only_its_own_rows(base16, per_row):
    model, tok = base16.model, base16.tokenizer
    texts = ["Price is $", "How much does this cost?", "A lamp.", "Price"]
    batch = _batch(tok, texts)
    a = lora.attach(model, "a", r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"], seed=1)
    b = lora.attach(model, "b", r=16, alpha=8, dropout=0.0, target_modules=["v_proj", "gate_proj"], seed=2)
    _randomize_b(a, 5)
    _randomize_b(b, 6)
    router = lora.router_of(model)
    router.per_row = per_row
    try:
        router.segments = [("a", 0, 2), ("b", 2, 4)]
        mixed = _logits(model, batch)
        router.segments = [("a", 0, 4)]
        only_a = _logits(model, batch)
        router.segments = [("b", 0, 4)]
        only_b = _logits(model, batch)
    finally:
        router.segments, router.per_row = [], "auto"
        lora.detach(model, a)
        lora.detach(model, b)
    # Several segments take the per-row path (stacked: bmm over gathered slots), one adapter alone a plain matmul:
    # the same sums in another order, so equal to float rounding, which depends on the CPU's kernels (seen: 3e-5 on
    # logits of magnitude 20 on an AMD EPYC, 4e-4 on an Intel Xeon with AMX). Measured against how far apart the
    # two adapters' logits are, a row through the wrong adapter could not pass.
    gap = float((only_a - only_b).abs().max())
    err = max(float((mixed[:2] - only_a[:2]).abs().max()), float((mixed[2:] - only_b[2:]).abs().max()))
    print(f"adapters' logits {gap:.3g} apart; mixed batch within {err:.3g} of each alone")
    assert gap > 1.0 and err < 1e-3 * gap


@PATHS
def test_gradients_land_in_the_stacks_on_either_path(base16, per_row):
    """A trial's parameters are views of its layers' stacks, and so are their gradients: the backward must add into
    that storage whether a batch took the plain path (one adapter) or the per-row path (several), or the optimizer
    would step on gradients the other path never sees."""
    model, tok = base16.model, base16.tokenizer
    batch = _batch(tok, ["Price is $", "How much does this cost?"])
    a = lora.attach(model, "a", r=4, alpha=8, dropout=0.0, target_modules=["q_proj"], seed=1)
    b = lora.attach(model, "b", r=8, alpha=8, dropout=0.0, target_modules=["q_proj"], seed=2)
    _randomize_b(a, 3)
    _randomize_b(b, 4)
    router = lora.router_of(model)
    router.per_row = per_row
    layer = model.get_submodule(next(iter(a.weights)))
    w = a.weights[layer.path]
    try:
        for segments in ([("a", 0, 2)], [("a", 0, 1), ("b", 1, 2)]):
            a.zero_grad()
            b.zero_grad()
            router.segments = segments
            model(**batch).logits.float().pow(2).mean().backward()
            assert w.lora_A.grad.abs().sum() > 0 and w.lora_Bt.grad.abs().sum() > 0, segments
            slot = router.slots["a"]
            assert torch.equal(layer.stack_A.grad[slot, :4], w.lora_A.grad), segments
            assert w.lora_A.grad.data_ptr() == layer.stack_A.grad[slot].data_ptr(), segments
            assert w.lora_Bt.grad.data_ptr() == layer.stack_B.grad[slot].data_ptr(), segments
    finally:
        router.segments, router.per_row = [], "auto"
        lora.detach(model, a)
        lora.detach(model, b)


def test_dropout_masks_are_applied_and_change_every_forward(base16):
    """In training, each forward draws new masks (the adapter's forward count seeds them) and applies them; in eval
    nothing is dropped. An earlier version drew the masks and then handed every 3-D input None: the inverted-dropout
    scale alone still made dropout curves differ from dropout-free ones, so only this catches it."""
    model, tok = base16.model, base16.tokenizer
    batch = _batch(tok, ["Price is $", "How much does this cost?"])
    adapter = lora.attach(model, "d", r=8, alpha=16, dropout=0.5, target_modules=["q_proj", "v_proj"], seed=1)
    _randomize_b(adapter, 2)
    router = lora.router_of(model)
    router.segments = [("d", 0, 2)]
    try:
        model.train()
        outs = []
        for tick in (1, 2, 1):
            router.ticks["d"] = tick
            outs.append(_logits(model, batch))
            router.release_masks()
        model.eval()
        plain = [_logits(model, batch) for _ in range(2)]
    finally:
        model.eval()
        router.segments = []
        lora.detach(model, adapter)
    assert not torch.allclose(outs[0], outs[1], atol=1e-4)  # new masks each forward
    assert torch.equal(outs[0], outs[2])  # the same forward count draws the same masks
    assert torch.equal(plain[0], plain[1]) and not torch.allclose(plain[0], outs[0], atol=1e-4)


@pytest.mark.parametrize("dropout", [0.05, 0.3, 0.7])
def test_keep_masks_drop_at_the_asked_rate_in_every_bit_lane(dropout):
    """Masks are 16-bit draws against a threshold, four per int64 draw. int64's default random_ range leaves the
    sign bit 0, which would keep every fourth element whenever the keep rate is under one half."""
    g = torch.Generator().manual_seed(0)
    raw = lora._keep_mask((64, 100, 40), dropout, g, "cpu")
    assert raw.dtype == torch.bool and raw.shape == (64, 100, 40)
    keep = raw.view(-1, 4).float()
    p = lora.keep_probability(dropout)
    assert abs(p - (1 - dropout)) <= 1 / 65536
    for lane in keep.mean(0).tolist():
        assert abs(lane - p) < 0.01, (lane, p)  # 5 sigma of a 64,000-draw mean at p = 1/2
    again = lora._keep_mask((64, 100, 40), dropout, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(again.view(-1, 4).float(), keep)
