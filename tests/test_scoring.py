"""Scoring: the original evaluator's metrics, the batched constrained scorer against plain one-row `generate`,
unparseable generations, and the expected-value read-out on a tokenizer with multi-digit number tokens."""

from __future__ import annotations

import math

import pytest
import torch

from tuner.scoring import (PriceScorer, answer_spread, collapse_line, color_of, constant_baseline,
                           max_integer_digits, one_row_generate, parse_price, price_metrics)


def test_metrics_match_the_original_evaluator_by_hand():
    truths = [100.0, 1000.0, 50.0, 2000.0]
    preds = [130.0, 1500.0, None, 2300.0]  # hit (<$40), miss (50%), unparseable -> 0, hit (15%)
    m = price_metrics(preds, truths)
    errs = [30, 500, 50, 300]
    assert m["mae"] == pytest.approx(sum(errs) / 4)
    sle = [(math.log(t + 1) - math.log(p + 1)) ** 2 for p, t in zip([130, 1500, 0, 2300], truths)]
    assert m["rmsle"] == pytest.approx(math.sqrt(sum(sle) / 4))
    assert m["hit_rate"] == 0.5 and m["parse_fail_rate"] == 0.25 and m["n"] == 4
    assert [color_of(p, t) for p, t in [(130, 100), (1300, 1000), (1500, 1000)]] == ["green", "orange", "red"]
    assert constant_baseline(100.0, truths)["mae"] == pytest.approx((0 + 900 + 50 + 1900) / 4)


def test_parse_is_the_originals_but_a_miss_is_none():
    assert parse_price("1,234.00 dollars") == 1234.0
    assert parse_price("about 12") == 12.0
    assert parse_price("") is None and parse_price("no idea") is None
    assert max_integer_digits(18823) == 6


def test_collapsed_answers_are_counted_and_said():
    # The shape measured on a default trial: two prices for every row, one of them on most rows.
    values = [1333.0] * 74 + [13333.0] * 21 + [13332.0] * 3 + [13331.0] * 2
    spread = answer_spread(values)
    assert spread == {"distinct_answers": 4, "top_answer": 1333.0, "top_answer_share": 0.74}
    assert collapse_line(spread, 100) == ("74 of 100 test answers are $1,333 (4 distinct answers): the adapter "
                                          "barely reads the descriptions")
    # Unparseable answers are one answer among the others, and can be the collapse.
    assert answer_spread([None, None, 5.0])["top_answer"] is None
    assert "no parseable price" in collapse_line(answer_spread([None, None, 5.0]), 3)
    # Half the rows on one answer is the threshold; below it, and varied answers, nothing is said.
    assert collapse_line(answer_spread([7.0, 7.0, 1.0, 2.0]), 4) is not None
    assert collapse_line(answer_spread([7.0, 7.0, 1.0, 2.0, 3.0]), 5) is None
    assert collapse_line(answer_spread([float(v) for v in range(100)]), 100) is None
    with pytest.raises(ValueError):
        answer_spread([])


@pytest.fixture(scope="module")
def prompts(diamonds):
    return [e.prompt for e in diamonds.test[:20]]


def test_batched_scorer_equals_one_row_generate_on_unquantized_model(base16, prompts):
    model, tok = base16.model, base16.tokenizer
    scorer = PriceScorer(tok, max_price=18823, batch_size=8)
    run = scorer.predict(model, prompts)
    budget = scorer.max_int_digits + 3
    for pred, prompt in zip(run.predictions, prompts):
        assert pred.value == parse_price(one_row_generate(model, tok, prompt, budget)), prompt
    # Same rows, other batch size and no shared prefix: same predictions (fp32, unquantized).
    again = PriceScorer(tok, max_price=18823, batch_size=3, share_prefix=False).predict(model, prompts)
    assert [p.value for p in again.predictions] == [p.value for p in run.predictions]
    assert run.rows_per_s > 0 and run.new_tokens > 0


def test_scorer_equals_generate_with_a_trained_adapter(base16, diamonds, prompts):
    """After a short fine-tune the model writes real prices ('4733.00'): still identical to plain generate."""
    from pathlib import Path

    from tuner import lora
    from tuner.space import TrialParams
    from tuner.batches import encode
    from tuner.loop import train_one
    from tuner.train import TrialRun

    rows, _ = encode(base16.tokenizer, diamonds.train[:48], 182)
    params = TrialParams(r=8, alpha=16, dropout=0.0, target_set="attention", target_modules=("q_proj", "v_proj"),
                         quant_bits=16, learning_rate=3e-3, epochs=1, batch_size=8, grad_accum=1, max_length=182,
                         optimizer="adamw_torch", scheduler="constant", warmup_ratio=0.0, weight_decay=0.0,
                         max_grad_norm=1.0, seed=0)
    checked = {}

    def compare(run):
        scorer = PriceScorer(base16.tokenizer, max_price=18823, batch_size=8)
        preds = scorer.predict(base16.model, prompts[:10], adapter=run.name).predictions
        router = lora.router_of(base16.model)
        for pred, prompt in zip(preds, prompts[:10]):
            router.segments = [(run.name, 0, 1)]
            ref = one_row_generate(base16.model, base16.tokenizer, prompt, scorer.max_int_digits + 3)
            router.segments = []
            assert pred.value == parse_price(ref), (pred, ref)
        checked["values"] = [p.value for p in preds]
        # The branch read-out on real attention and caches (each row's prompt read once, its cache copied to 3 and
        # then 9 branches, left-padded behind the shared prefix) against one row at a time, every branch's prompt
        # and forced tokens read afresh and its tail by plain generate.
        branch = PriceScorer(base16.tokenizer, max_price=18823, batch_size=32, method="branch")
        got = branch.predict(base16.model, prompts[:4], adapter=run.name).predictions
        router.segments = [(run.name, 0, 1)]
        try:
            for pred, prompt, greedy in zip(got, prompts[:4], preds):
                assert pred.text == greedy.text  # the first branch is the greedy read
                assert pred.value == pytest.approx(_branch_reference(base16, branch, prompt), rel=1e-4)
        finally:
            router.segments = []

    run = TrialRun("t", params, rows, Path("/nonexistent/unused"))
    train_one(base16, run, on_done=compare)
    assert run.status == "completed"
    assert all(v is not None and v >= 100 for v in checked["values"]), checked  # dollars, not '1.20'


def _branch_reference(base, scorer, prompt: str) -> float:
    """The branch mean of one row, the slow way: the top 3 tokens a price may start with, the top 3 that may follow
    each, every branch's prompt read again with its two tokens and finished by plain greedy `generate`."""
    model, tok, vocab = base.model, base.tokenizer, scorer.vocab
    eos = torch.zeros_like(vocab.digit_len, dtype=torch.bool)
    eos[vocab.eos_ids] = True

    def top3(ids: list[int], allowed: torch.Tensor) -> list[tuple[int, float]]:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        p, i = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1).topk(3)
        return list(zip(i.tolist(), p.tolist()))

    ids = tok(prompt)["input_ids"]
    room = scorer.max_int_digits
    num, den = 0.0, 0.0
    for t1, p1 in top3(ids, ((vocab.digit_len > 0) & (vocab.digit_len <= room)) | eos):
        if eos[t1]:
            continue  # no number: left out
        left = room - int(vocab.digit_len[t1])
        second = ((vocab.digit_len > 0) & (vocab.digit_len <= left)) | (vocab.dot_digits >= 0) | eos
        for t2, p2 in top3(ids + [t1], second):
            text = vocab.text[t1]
            if not eos[t2]:
                forced = torch.tensor([ids + [t1, t2]])
                out = model.generate(input_ids=forced, max_new_tokens=room + 3, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
                text += tok.decode(out[0, forced.shape[1] - 1:], skip_special_tokens=True)
            num, den = num + p1 * p2 * parse_price(text), den + p1 * p2
    return num / den


def test_no_number_is_a_parse_failure_not_a_crash(smol, prompts):
    """A real model whose final norm is zeroed gives flat logits; the first allowed token by id is the end token,
    so nothing is decoded: recorded as unparseable, scored as 0."""
    from tuner.models import load_base

    base = load_base(smol, 16, "cpu", cpu_bf16=False)
    with torch.no_grad():
        base.model.model.norm.weight.zero_()
    run = PriceScorer(base.tokenizer, max_price=18823, batch_size=4).predict(base.model, prompts[:5])
    assert all(p.value is None and p.text == "" for p in run.predictions)
    m = price_metrics([p.value for p in run.predictions], [100.0] * 5)
    assert m["parse_fail_rate"] == 1.0 and m["mae"] == 100.0


def _multi_digit_tokenizer():
    """Whole numbers up to 999 are single tokens, as in Llama 3's tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", "How", "much", "does", "this", "cost", "?", "Price", "is", "$", "a",
             "lamp", "chair", "table", "."] + [str(i) for i in range(1000)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def test_expected_value_readout_with_multi_digit_tokens():
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _multi_digit_tokenizer()
    assert len(tok("Price is $ 512")["input_ids"]) == 4  # '512' is one token
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1)
    model = LlamaForCausalLM(cfg).eval()
    prompts = ["How much does this cost ? a lamp . Price is $", "How much does this cost ? table . Price is $",
               "How much ? chair . Price is $"]
    scorer = PriceScorer(tok, max_price=999, method="expected_value", top_k=50, batch_size=2)
    preds = scorer.predict(model, prompts).predictions
    for prompt, pred in zip(prompts, preds):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            probs = torch.softmax(model(input_ids=ids).logits[0, -1].float(), -1)
        p, i = probs.topk(50)
        num = den = 0.0
        for pp, ii in zip(p.tolist(), i.tolist()):
            s = tok.decode([ii]).strip()
            if s.isdigit():
                num, den = num + pp * int(s), den + pp
        assert den > 0 and pred.value == pytest.approx(num / den, rel=1e-4)



def test_median_readout_answers_the_median_of_sampled_prices_not_the_mode():
    """A model whose price is 1 (p 0.4), 3 (0.3) or 9 (0.3), then the end: greedy reads the mode, 1; the median
    read-out samples prices and answers their median, 3, which is what minimises the expected absolute error. The
    prompt is read once per row, so the rows' samples must each get their own draw after the cache is copied."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _multi_digit_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1)
    model = LlamaForCausalLM(cfg).eval()
    dollar, eos = tok.convert_tokens_to_ids("$"), tok.eos_token_id
    after_dollar = torch.full((len(tok),), -1e9)
    for word, p in (("1", 0.4), ("3", 0.3), ("9", 0.3)):
        after_dollar[tok.convert_tokens_to_ids(word)] = math.log(p)
    after_digit = torch.full((len(tok),), -1e9)
    after_digit[eos] = 0.0

    fed: list[list[int]] = []  # the first digit each decoded sequence was given, per batch

    def fixed_logits(module, args, kwargs, out):
        last = kwargs["input_ids"][:, -1:]  # [rows, 1]: the token each row's next one follows
        if kwargs["input_ids"].shape[1] == 1 and not bool((last == dollar).any()):
            fed.append(last[:, 0].tolist())
        out.logits = torch.where((last == dollar)[..., None], after_dollar, after_digit).expand(-1, 1, -1).clone()
        return out

    model.register_forward_hook(fixed_logits, with_kwargs=True)
    prompts = ["How much does this cost ? a lamp . Price is $", "How much does this cost ? table . Price is $",
               "How much ? chair . Price is $"]
    greedy = PriceScorer(tok, max_price=999, batch_size=2).predict(model, prompts).predictions
    assert [p.value for p in greedy] == [1.0, 1.0, 1.0]
    fed.clear()
    scorer = PriceScorer(tok, max_price=999, batch_size=32, method="median", samples=301)
    median = scorer.predict(model, prompts).predictions
    assert [(p.value, p.text) for p in median] == [(3.0, "3")] * 3
    # Drawn, not copied: each row's 301 samples (rows follow each other in the batch) hold the three prices in
    # about their proportions.
    draws = [b[r * 301:(r + 1) * 301] for b in fed for r in range(len(b) // 301)]
    assert [len(b) for b in fed] == [301] * 3 and len(draws) == 3  # batch_size counts sequences: a row at a time
    one = tok.convert_tokens_to_ids("1")
    assert all(len(set(d)) == 3 and 0.3 < d.count(one) / 301 < 0.5 for d in draws)
    assert [p.value for p in scorer.predict(model, prompts).predictions] == [3.0] * 3  # seeded: the same again
    # Several rows a batch (10 sequences: two rows of 5 samples): each row's samples are its own, in order.
    lamp, table = tok.convert_tokens_to_ids("lamp"), tok.convert_tokens_to_ids("table")
    certain = {lamp: "9", table: "3"}

    def per_row(module, args, kwargs, out):
        ids = kwargs["input_ids"]
        if ids.shape[1] > 1:  # a prompt's pass: a lamp is surely $9, a table $3
            for r in range(ids.shape[0]):
                for word, price in certain.items():
                    if bool((ids[r] == word).any()):
                        out.logits[r, -1] = -1e9
                        out.logits[r, -1, tok.convert_tokens_to_ids(price)] = 0.0
        return out

    handle = model.register_forward_hook(per_row, with_kwargs=True)
    two = PriceScorer(tok, max_price=999, batch_size=10, method="median", samples=5)
    assert [p.value for p in two.predict(model, prompts).predictions][:2] == [9.0, 3.0]
    handle.remove()
    # Validation reads greedily under any method (it only ranks trials for the pruner).
    assert [p.value for p in scorer.predict(model, prompts, greedy=True).predictions] == [1.0] * 3


def test_branch_readout_is_the_probability_weighted_mean_of_its_branches():
    """A model whose price starts 1 (p 0.5), 3 (0.3) or ends at once (0.2); after a first number it ends (0.6) or
    adds 50 (0.4); after 50 it ends. Greedy reads 1. The branch read-out (top 3 at each of the first 2 places, each
    branch read greedily to its end) answers the weighted mean of 1, 150, 3 and 350 (weights 0.3, 0.2, 0.18, 0.12):
    the branch that ended with no number is left out, and the third branch after a number has probability 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuner.config import parse_config

    tok = _multi_digit_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1)
    model = LlamaForCausalLM(cfg).eval()
    ids = tok.convert_tokens_to_ids
    eos = tok.eos_token_id

    def dist(pairs):
        out = torch.full((len(tok),), -1e9)
        for token, p in pairs:
            out[token] = math.log(p)
        return out

    after = {ids("$"): dist([(ids("1"), 0.5), (ids("3"), 0.3), (eos, 0.2)]),
             ids("1"): dist([(eos, 0.6), (ids("50"), 0.4)]), ids("3"): dist([(eos, 0.6), (ids("50"), 0.4)])}
    ends = dist([(eos, 1.0)])
    widths: list[int] = []

    def fixed_logits(module, args, kwargs, out):
        last = kwargs["input_ids"][:, -1].tolist()
        widths.append(len(last))
        out.logits = torch.stack([after.get(t, ends) for t in last])[:, None, :].clone()
        return out

    model.register_forward_hook(fixed_logits, with_kwargs=True)
    prompts = ["How much does this cost ? a lamp . Price is $", "How much does this cost ? table . Price is $",
               "How much ? chair . Price is $", "How much ? lamp . Price is $"]
    assert [p.value for p in PriceScorer(tok, max_price=999).predict(model, prompts).predictions] == [1.0] * 4
    spec = parse_config({"scoring": {"method": "branch"}}, "s.yaml").scoring
    scorer = PriceScorer(tok, max_price=999, batch_size=spec.batch_size, method=spec.method,
                         branch_top_k=spec.branch_top_k, branch_places=spec.branch_places)
    widths.clear()
    preds = scorer.predict(model, prompts).predictions
    mean = (0.3 * 1 + 0.2 * 150 + 0.18 * 3 + 0.12 * 350) / 0.8
    assert [p.value for p in preds] == pytest.approx([mean] * 4, rel=1e-4)
    assert [p.text for p in preds] == ["1"] * 4  # the first branch is the greedy read
    # batch_size counts decoded sequences: 32 // 9 = 3 rows a batch, then 1. After the shared prefix (1 row), each
    # prompt is read once (3 rows), then its first place's 3 branches each (9), then the 9 each 3 again (27).
    assert widths == [1, 3, 9, 27, 1, 3, 9]
    # Validation reads greedily under any method.
    assert [p.value for p in scorer.predict(model, prompts, greedy=True).predictions] == [1.0] * 4
    # One place: 1 (0.5) and 3 (0.3), each read greedily (1 and 3).
    one = PriceScorer(tok, max_price=999, method="branch", branch_top_k=3, branch_places=1)
    assert [p.value for p in one.predict(model, prompts).predictions] == pytest.approx([(0.5 + 0.9) / 0.8] * 4)


def test_median_samples_are_validated_with_the_method():
    from tuner.config import parse_config
    from tuner.errors import ConfigError

    assert parse_config({"scoring": {"method": "median"}}, "s.yaml").scoring.samples == 31
    with pytest.raises(ConfigError, match=r"s.yaml: scoring.samples: expected no samples with method greedy"):
        parse_config({"scoring": {"samples": 5}}, "s.yaml")
    with pytest.raises(ConfigError, match=r"scoring.samples: expected a value >= 2"):
        parse_config({"scoring": {"method": "median", "samples": 1}}, "s.yaml")
    with pytest.raises(ConfigError, match=r"s.yaml: scoring.branch_top_k: expected no branch_top_k with method "
                                          r"median \(only `method: branch` uses it\)"):
        parse_config({"scoring": {"method": "median", "branch_top_k": 4}}, "s.yaml")


def test_the_read_out_is_part_of_a_studys_signature():
    """Greedy and median readings of one adapter differ, so a study cannot mix them; greedy, the default, leaves
    the signature as it was before the median existed."""
    from tuner.config import parse_config
    from tuner.space import space_signature

    greedy = space_signature(parse_config({}, "s.yaml"))
    assert "scoring" not in greedy
    median = space_signature(parse_config({"scoring": {"method": "median"}}, "s.yaml"))
    assert median["scoring"] == {"method": "median", "samples": 31}
    assert median != space_signature(parse_config({"scoring": {"method": "median", "samples": 15}}, "s.yaml"))
    branch = space_signature(parse_config({"scoring": {"method": "branch"}}, "s.yaml"))
    assert branch["scoring"] == {"method": "branch", "branch_top_k": 3, "branch_places": 2}
