"""The training loop: completion-only labels, real 4-bit training whose gradients survive evaluation passes,
detection of dead and exploding trials, exact resume, and the same loss curve as trl's SFTTrainer."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch

from conftest import trial_params
from tuner import lora
from tuner.models import load_base
from tuner.scoring import PriceScorer
from tuner.batches import collate, encode, step_schedule
from tuner.loop import train_one
from tuner.train import TrialRun


# 4-bit, the recipe's weight decay and clipping, no warmup.
params = functools.partial(trial_params, dropout=0.05, quant_bits=4, warmup_ratio=0.0, weight_decay=0.001,
                           max_grad_norm=0.3, seed=7)


class Recorder:
    def __init__(self, evaluate=None):
        self.steps, self.evals = [], []
        self._evaluate = evaluate

    def on_step(self, run, record):
        self.steps.append(record)

    def on_evaluate(self, run, step):
        self.evals.append(step)
        if self._evaluate:
            self._evaluate(run)
        return False

    def on_checkpoint(self, run, step, path):
        pass


def test_labels_cover_the_price_and_nothing_of_the_prompt(tokenizer, diamonds):
    rows, too_long = encode(tokenizer, diamonds.train[:3], 182)
    assert too_long == 0
    ids, mask, pos, labels, segments, comp = collate([("x", rows)], tokenizer.pad_token_id, "cpu")
    for i, (row, ex) in enumerate(zip(rows, diamonds.train[:3])):
        kept = labels[i][labels[i] != -100].tolist()
        assert tokenizer.decode(kept) == ex.completion + tokenizer.eos_token  # '4733.00<|im_end|>'
        assert tokenizer.decode(list(row.input_ids[: row.n_prompt])) == ex.prompt
        # The labels are aligned with the last `comp` positions; everything before (the prompt) is -100.
        n = int(mask[i].sum())
        prompt_part = ids[i, ids.shape[1] - n: ids.shape[1] - row.n_completion]
        assert tokenizer.decode(prompt_part.tolist()) == ex.prompt
    assert segments == [("x", 0, 3, max(len(r.input_ids) for r in rows))]
    assert pos[0, -1] == int(mask[0].sum()) - 1  # left padding with explicit positions: as if unpadded


def test_rows_longer_than_max_length_are_dropped_and_counted(tokenizer, diamonds):
    rows, too_long = encode(tokenizer, diamonds.train[:10], 40)
    assert rows == [] and too_long == 10


def test_schedule_is_seeded_and_capped():
    p = params(batch_size=3, grad_accum=2, epochs=2, seed=1)
    s = step_schedule(20, p)
    assert len(s) == 8 and [len(x) for x in s[:4]] == [6, 6, 6, 2]
    assert sorted(i for x in s[:4] for i in x) == list(range(20))
    assert s == step_schedule(20, p) and s != step_schedule(20, params(batch_size=3, grad_accum=2, epochs=2, seed=2))
    assert len(step_schedule(20, params(max_steps=3))) == 3


def test_4bit_training_learns_and_gradients_survive_evaluation(base4, diamonds):
    """Real QLoRA on the CPU: loss falls, and the gradient check after each no-grad scoring pass stays green
    (bitsandbytes' AVX512-BF16 repacking is turned off on every Linear4bit)."""
    rows, _ = encode(base4.tokenizer, diamonds.train[:40], 182)
    scorer = PriceScorer(base4.tokenizer, max_price=18823, batch_size=8)
    rec = Recorder(evaluate=lambda run: scorer.predict(base4.model, [e.prompt for e in diamonds.val[:4]],
                                                        adapter=run.name))
    run = TrialRun("t4", params(), rows, Path("/unused"), hooks=rec, eval_every=3)
    train_one(base4, run)
    assert run.status == "completed", run.error
    assert rec.evals == [3, 6, 9, 10] and len(rec.steps) == 10  # and at the end, to compare last with best
    assert rec.steps[-1]["loss"] < rec.steps[0]["loss"] * 0.7
    assert all(torch.isfinite(torch.tensor(r["grad_norm"])) and r["grad_norm"] > 0 for r in rec.steps)
    assert lora.adapters_attached(base4.model) == set()


def _bnb_repacks() -> bool:
    """bitsandbytes' own test for the repacking path (its native library's CPU check, not /proc/cpuinfo)."""
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


@pytest.mark.skipif(not _bnb_repacks(), reason="bitsandbytes repacks 4-bit weights only where it detects AVX512-BF16")
def test_the_avx512_repacking_trap_is_caught_as_zero_gradient(smol, diamonds):
    """With bitsandbytes' default (repacking on), the first no-grad forward repacks the 4-bit weights and the
    gradients through them are cut: the run must fail with its reason, not train on. (On one AVX512-BF16 machine
    the gradients went to zero; on another they stayed nonzero but wrong, so the repack itself is what is checked.)"""
    import bitsandbytes as bnb

    base = load_base(smol, 4, "cpu", dequantize=False)  # bitsandbytes' own forward, where the repacking happens
    for m in base.model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = True  # undo tuner's protection
    rows, _ = encode(base.tokenizer, diamonds.train[:24], 182)
    scorer = PriceScorer(base.tokenizer, max_price=18823, batch_size=8)
    rec = Recorder(evaluate=lambda run: scorer.predict(base.model, [e.prompt for e in diamonds.val[:2]],
                                                        adapter=run.name))
    run = TrialRun("trap", params(), rows, Path("/unused"), hooks=rec, eval_every=2)
    train_one(base, run)
    assert run.status == "failed"
    assert run.error.reason == "repacked_base" and "after an evaluation pass at step 2" in run.error.detail
    assert run.step == 2


def test_4bit_weights_dequantized_once_train_exactly_as_bitsandbytes_per_use(smol, base4, diamonds):
    """On the CPU tuner dequantizes each 4-bit layer once instead of on every forward and backward: every step's loss
    and gradient norm (each loss depends on every update before it) must be the same bits as bitsandbytes' own
    path, and the trial records which path ran."""
    from tuner.models import dequantized_layers

    per_use = load_base(smol, 4, "cpu", dequantize=False)
    assert dequantized_layers(base4.model) == 210 and dequantized_layers(per_use.model) == 0  # 30 layers x 7
    rows, _ = encode(base4.tokenizer, diamonds.train[:12], 182)
    p = params(target_set="attention+mlp", target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"))
    runs = {}
    for name, base in (("once", base4), ("per_use", per_use)):
        rec = Recorder()
        run = TrialRun(name, p, rows, Path("/unused"), hooks=rec)
        train_one(base, run)
        assert run.status == "completed" and run.step == 3
        runs[name] = (run, rec.steps)
    (once, once_steps), (use, use_steps) = runs["once"], runs["per_use"]
    assert [s["loss"] for s in once_steps] == [s["loss"] for s in use_steps]
    assert [s["grad_norm"] for s in once_steps] == [s["grad_norm"] for s in use_steps]
    assert once_steps[-1]["loss"] != once_steps[0]["loss"]  # it trained
    assert once.plan.dequantized_once and not use.plan.dequantized_once


def test_nan_loss_fails_the_trial_with_its_reason(base16, diamonds):
    rows, _ = encode(base16.tokenizer, diamonds.train[:16], 182)
    head = base16.model.get_output_embeddings()
    hook = head.register_forward_hook(lambda mod, args, out: out * float("nan"))
    try:
        run = TrialRun("nan", params(quant_bits=16), rows, Path("/unused"))
        train_one(base16, run)
    finally:
        hook.remove()
    assert run.status == "failed" and run.error.reason == "nan_loss" and run.step == 0


def test_interrupt_then_resume_is_exact(base16, diamonds, tmp_path):
    """Stopped after 3 steps (checkpoint written), resumed in a new run object: the same losses and final
    weights as 6 uninterrupted steps, dropout included (its masks are seeded, not drawn from global state)."""
    rows, _ = encode(base16.tokenizer, diamonds.train[:24], 182)
    p = params(quant_bits=16, dropout=0.1, batch_size=4)

    straight_rec = Recorder()
    straight = TrialRun("s", p, rows, tmp_path / "straight", hooks=straight_rec)
    final = {}
    train_one(base16, straight, on_done=lambda r: final.__setitem__("s", r.adapter.state_dict()))

    rec1, rec2 = Recorder(), Recorder()
    first = TrialRun("r", p, rows, tmp_path / "resumed", hooks=rec1)
    train_one(base16, first, stop=lambda: first.step >= 3)
    assert first.status == "interrupted" and first.error.checkpoint_step == 3
    assert (tmp_path / "resumed" / "checkpoints" / "step-000003" / "adapter").is_dir()
    second = TrialRun("r", p, rows, tmp_path / "resumed", hooks=rec2)
    train_one(base16, second, on_done=lambda r: final.__setitem__("r", r.adapter.state_dict()))
    assert second.status == "completed" and second.resumed_from_step == 3
    losses = [r["loss"] for r in rec1.steps + rec2.steps]
    assert losses == pytest.approx([r["loss"] for r in straight_rec.steps], rel=1e-5)
    for k, v in final["s"].items():
        assert torch.allclose(v, final["r"][k], atol=1e-6), k


def test_corrupt_checkpoint_is_skipped_for_the_previous_one(base16, diamonds, tmp_path):
    rows, _ = encode(base16.tokenizer, diamonds.train[:24], 182)
    p = params(quant_bits=16, dropout=0.0)
    run = TrialRun("c", p, rows, tmp_path, checkpoint_every=2, keep_checkpoints=2)
    train_one(base16, run, stop=lambda: run.step >= 5)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step-000004", "step-000005"]
    (tmp_path / "checkpoints" / "step-000005" / "train_state.pt").write_bytes(b"garbage")
    again = TrialRun("c", p, rows, tmp_path)
    train_one(base16, again)
    assert again.resumed_from_step == 4 and again.status == "completed"
    assert "step-000005" in again.skipped_checkpoints[0]


def test_checkpoint_whose_optimizer_state_does_not_fit_is_skipped(base16, diamonds, tmp_path):
    """Optimizer state for B in peft's [out, r] layout (as written before B was held transposed) loads without
    complaint in torch and would fail at the first step: it is refused at resume, with the reason."""
    rows, _ = encode(base16.tokenizer, diamonds.train[:24], 182)
    p = params(quant_bits=16, dropout=0.0)
    run = TrialRun("c", p, rows, tmp_path, checkpoint_every=2, keep_checkpoints=2)
    train_one(base16, run, stop=lambda: run.step >= 5)
    path = tmp_path / "checkpoints" / "step-000005" / "train_state.pt"
    state = torch.load(path, weights_only=False)
    for index, entry in state["optimizer"]["state"].items():
        if index % 2:  # the parameters go A, B (held as [r, out]) layer by layer: B's moments as [out, r]
            for key in ("exp_avg", "exp_avg_sq"):
                entry[key] = entry[key].t().contiguous()
    torch.save(state, path)
    again = TrialRun("c", p, rows, tmp_path)
    train_one(base16, again)
    assert again.resumed_from_step == 4 and again.status == "completed"
    assert "step-000005" in again.skipped_checkpoints[0] and "optimizer state exp_avg" in again.skipped_checkpoints[0]


def test_checkpoints_of_an_earlier_study_are_not_resumed(base16, diamonds, tmp_path):
    """A study deleted and created again under the same name and output folder has the same trial numbers and
    folders: its trials must start afresh, not resume the old study's adapters, and the old checkpoints must not
    crowd out the new ones."""
    rows, _ = encode(base16.tokenizer, diamonds.train[:24], 182)
    p = params(quant_bits=16, dropout=0.0)
    old = TrialRun("t", p, rows, tmp_path, checkpoint_every=2, keep_checkpoints=2, owner="s/trial-0/10:00")
    train_one(base16, old, stop=lambda: old.step >= 5)
    assert sorted(f.name for f in (tmp_path / "checkpoints").iterdir()) == ["step-000004", "step-000005"]

    new = TrialRun("t", p, rows, tmp_path, checkpoint_every=2, keep_checkpoints=2, owner="s/trial-0/11:00")
    train_one(base16, new, stop=lambda: new.step >= 2)
    assert new.resumed_from_step == 0
    assert len(new.skipped_checkpoints) == 2 and "written by s/trial-0/10:00" in new.skipped_checkpoints[0]
    assert sorted(f.name for f in (tmp_path / "checkpoints").iterdir()) == ["step-000002"]

    retry = TrialRun("t", p, rows, tmp_path, owner="s/trial-0/11:00")  # a retry of the new trial resumes
    train_one(base16, retry)
    assert retry.resumed_from_step == 2 and retry.status == "completed" and not retry.skipped_checkpoints


def test_same_loss_curve_as_trl_sfttrainer(smol, diamonds, tmp_path):
    """The recipe's SFTTrainer (trl + peft) and tuner's loop, fp32 on the CPU, same rows in the same order, same
    initial LoRA weights, dropout 0: the per-step training losses agree."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    p = params(quant_bits=16, dropout=0.0, batch_size=4, learning_rate=1e-3, warmup_ratio=0.25,
               target_modules=("q_proj", "v_proj"), scheduler="cosine", max_grad_norm=0.3, weight_decay=0.01)
    ours_base = load_base(smol, 16, "cpu", cpu_bf16=False)
    rows, _ = encode(ours_base.tokenizer, diamonds.train[:24], 182)
    order = [i for step in step_schedule(len(rows), p) for i in step]
    ds = Dataset.from_list([{"prompt": diamonds.train[i].prompt, "completion": diamonds.train[i].completion}
                            for i in order])

    ref_base = load_base(smol, 16, "cpu", cpu_bf16=False)
    cfg = SFTConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, gradient_accumulation_steps=1,
                    num_train_epochs=1, learning_rate=p.learning_rate, lr_scheduler_type="cosine", warmup_steps=2,
                    weight_decay=p.weight_decay, max_grad_norm=p.max_grad_norm, optim="adamw_torch",
                    logging_steps=1, save_strategy="no", report_to="none", bf16=False, gradient_checkpointing=False,
                    use_cpu=True, max_length=182, seed=0, train_sampling_strategy="sequential",
                    dataloader_drop_last=False)
    trainer = SFTTrainer(model=ref_base.model, train_dataset=ds, processing_class=ref_base.tokenizer, args=cfg,
                         peft_config=LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=0.0,
                                                target_modules=list(p.target_modules), task_type="CAUSAL_LM"))
    init = {k.removeprefix("base_model.model.").replace(".default", ""): v.detach().clone()
            for k, v in trainer.model.named_parameters() if "lora_" in k}

    rec = Recorder()

    class Seeded(TrialRun):
        def start(self, model, device):  # the reference's initial LoRA weights, then the normal start
            super().start(model, device)
            self.adapter.load_state_dict(init)

    run = Seeded("eq", p, rows, tmp_path / "ours", hooks=rec)
    train_one(ours_base, run)
    trainer.train()
    theirs = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    ours = [r["loss"] for r in rec.steps]
    assert len(ours) == len(theirs) == 6
    assert ours == pytest.approx(theirs, rel=2e-3), (ours, theirs)
    assert ours[-1] < ours[0]


def test_loraplus_steps_b_at_its_ratio_of_the_learning_rate(base16, diamonds):
    """LoRA+: B (zero at the start) takes Adam's first step at ratio x lr, A at lr. On step 1 Adam moves every
    parameter with a gradient by lr times its sign, and A has no gradient yet (B = 0), so B's weights after one step
    are exactly `ratio` times plain LoRA's and A's are the same."""
    rows, _ = encode(base16.tokenizer, diamonds.train[:8], 182)
    after = {}
    for ratio in (1.0, 16.0):
        run = TrialRun(f"lp{ratio:g}", params(quant_bits=16, dropout=0.0, max_steps=1, loraplus_ratio=ratio), rows,
                       Path("/unused"), hooks=Recorder(), checkpoint_every=None)
        train_one(base16, run, on_done=lambda r: after.__setitem__(ratio, {k: v.clone() for k, v in
                                                                           r.adapter.state_dict().items()}))
        assert run.status == "completed", run.error
        assert ("LoRA+" in run.optimizer_note) == (ratio != 1.0)
    b_keys = [k for k in after[1.0] if "lora_B" in k]
    assert b_keys and all(after[1.0][k].abs().max() > 0 for k in b_keys)
    for k, plain in after[1.0].items():
        expected = plain * 16 if "lora_B" in k else plain
        assert torch.allclose(after[16.0][k], expected, rtol=1e-4, atol=1e-9), k


def test_number_loss_grades_each_digit_by_its_distance_from_the_truth(tokenizer):
    """NTL-WAS by hand: sum_d p(d) |d - y| over the ten digit tokens at a digit label, nothing elsewhere; at a row's
    first scored token (the leading digit, whose place is not yet decided) the distance is on the log-price circle."""
    from tuner.loop import digit_table, leading_digit_distance, number_token_loss

    table = digit_table(tokenizer)
    ids = [tokenizer.encode(str(d), add_special_tokens=False)[0] for d in range(10)]
    assert [int(table[i]) for i in ids] == list(range(10)) and int((table >= 0).sum()) == 10
    dot = tokenizer.encode(".", add_special_tokens=False)[0]
    lead = leading_digit_distance()
    assert torch.equal(lead, lead.T) and not lead.diagonal().any()
    # 9 (of 9,500) and 1 (of 15,000) lie closer than 1 (of 1,500) and 2 (of 2,500); 8 and 9 closer still.
    assert lead[9, 1] == pytest.approx(10 * (1 - math.log10(9.5) + math.log10(1.5)), abs=1e-5)
    assert lead[8, 9] < lead[9, 1] < lead[1, 2] and lead[0, 1:].eq(5).all()
    # Each row's completion along the last axis: a leading 1 (of 1x,xxx), then one more token.
    logits = torch.zeros(5, 2, len(table))
    logits[:, 0, ids[9]] = 60.0  # every row sure of a leading 9 where the truth is 1: 1.98, not 8
    logits[0, 1, ids[3]] = 60.0  # sure of 3, the truth 5: distance 2
    # row 1: every digit alike (the other tokens do not count): the mean distance to 5 is 2.5
    logits[2, 1, ids[5]] = 60.0  # sure of the truth: nothing
    labels = torch.tensor([[ids[1], ids[5]], [ids[1], ids[5]], [ids[1], ids[5]], [ids[1], dot], [ids[1], -100]])
    got = number_token_loss(logits, labels, table)
    l91 = float(lead[9, 1])
    assert got.flatten().tolist() == pytest.approx([l91, 2.0, l91, 2.5, l91, 0.0, l91, 0.0, l91, 0.0], abs=1e-5)
    # A shorter completion is right-aligned behind -100: its leading digit is its first scored token.
    logits = torch.zeros(2, 2, len(table))
    logits[:, :, ids[9]] = 60.0  # sure of 9 everywhere, the truth 1
    got = number_token_loss(logits, torch.tensor([[-100, ids[1]], [ids[1], ids[1]]]), table)
    assert got.flatten().tolist() == pytest.approx([0, l91, l91, 8.0], abs=1e-5)

    class Grouped:  # a tokenizer that writes some digit with two tokens cannot have the loss
        def get_vocab(self):
            return {"a": 0, "b": 1}

        def __len__(self):
            return 2

        def encode(self, text, add_special_tokens=False):
            return [0, 1] if text == "7" else [0]

    assert digit_table(Grouped()) is None


def test_a_rows_first_scored_label_is_its_prices_leading_digit(tokenizer, diamonds):
    """The number loss grades each row's first scored token as the price's leading digit (on the log-price circle):
    that holds only while collate puts the completion, and nothing before it, under the labels."""
    examples = diamonds.train[:8]
    rows, _ = encode(tokenizer, examples, 182)
    labels = collate([("a", rows)], tokenizer.pad_token_id, "cpu").labels
    assert len({int((row >= 0).sum()) for row in labels}) > 1  # some rows' completions are shorter (right-aligned)
    for ex, row in zip(examples, labels):
        assert tokenizer.decode([int(row[row >= 0][0])]) == ex.completion[0], ex.completion


def test_number_loss_adds_its_weight_times_the_digit_distance_to_the_step_loss(base16, diamonds):
    """The first step's loss (same weights, no dropout) is cross-entropy plus number_loss x the mean digit distance:
    linear in the weight, and 0 leaves the recipe's loss unchanged."""
    rows, _ = encode(base16.tokenizer, diamonds.train[:4], 182)
    first = {}
    for w in (0.0, 0.5, 1.0):
        rec = Recorder()
        run = TrialRun(f"nl{int(w * 10)}", params(quant_bits=16, dropout=0.0, max_steps=1, number_loss=w), rows,
                       Path("/unused"), hooks=rec, checkpoint_every=None)
        train_one(base16, run)
        assert run.status == "completed", run.error
        first[w] = rec.steps[0]["loss"]
    assert first[0.5] - first[0.0] > 0.05
    assert first[1.0] - first[0.0] == pytest.approx(2 * (first[0.5] - first[0.0]), rel=1e-4)
