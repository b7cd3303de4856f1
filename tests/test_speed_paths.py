"""The fast paths of a training step give the same numbers as the plain ones: chunked linear cross-entropy, shared
autocast input casts, micro-batches, token-budget batches, gradient checkpointing; and the memory plan behind them."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import alpaca_rows, build_tiny_model, run_config, write_jsonl

from tunelab import load_config, train
from tunelab.config import LoraMethod
from tunelab.data.dataset import collate, micro_batches, token_budget_batches
from tunelab.methods import attach_method
from tunelab.train import loss as loss_module
from tunelab.train.loss import causal_lm_loss, linear_cross_entropy
from tunelab.train.memory import CPU_MICRO_BATCH_TOKENS, activation_bytes_per_token, plan_memory
from tunelab.train.precision import can_pack_weights, packed_linears, share_input_casts, store_frozen_in


def naive_loss(hidden, weight, targets, softcap=None):
    logits = F.linear(hidden, weight)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.float(), targets, reduction="sum")


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("chunk_elements", [1, 7 * 500, 1 << 24])  # one row per chunk, 7 rows, everything at once
@pytest.mark.parametrize("softmax_rows", [1, 3, 100])  # log-softmax slices within each chunk's rows
def test_linear_cross_entropy_equals_the_naive_loss_and_gradients_and_without_them(softcap, chunk_elements, softmax_rows, monkeypatch):
    monkeypatch.setattr(loss_module, "SOFTMAX_ELEMENTS", softmax_rows * 500)
    torch.manual_seed(0)
    hidden = torch.randn(60, 32, requires_grad=True)
    weight = torch.randn(500, 32, requires_grad=True)
    targets = torch.randint(0, 500, (60,))
    ref = naive_loss(hidden, weight, targets, softcap)
    ref.backward()
    ref_h, ref_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    loss = linear_cross_entropy(hidden, weight, targets, softcap, chunk_elements=chunk_elements)
    (3 * loss).backward()  # a scaled upstream gradient reaches both inputs
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    torch.testing.assert_close(hidden.grad / 3, ref_h, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weight.grad / 3, ref_w, rtol=1e-4, atol=1e-5)  # summed chunk by chunk
    # without gradients (evaluation): the same chunks and slices outside autograd, in fp32 and under bf16 autocast
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, softcap, chunk_elements=chunk_elements)
        ref16 = naive_loss(hidden.bfloat16(), weight.bfloat16(), targets, softcap)  # the softcap in bf16 here
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss16 = linear_cross_entropy(hidden, weight, targets, softcap, chunk_elements=chunk_elements)
    assert loss.grad_fn is None and loss.dtype == torch.float32
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)
    # the same bf16 logits, the softcap and loss in fp32
    assert float(loss16) == pytest.approx(float(ref16), rel=1e-3 if softcap else 1e-5)
    # nothing requires a gradient: the same path with grad mode on
    assert float(linear_cross_entropy(hidden.detach(), weight.detach(), targets, softcap)) == pytest.approx(float(ref), rel=1e-6)


def test_linear_cross_entropy_never_keeps_a_rows_x_vocab_tensor():
    hidden = torch.randn(64, 16, requires_grad=True)
    weight = torch.randn(4000, 16)  # frozen head: no weight gradient is computed or kept
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = linear_cross_entropy(hidden, weight, torch.randint(0, 4000, (64,)), chunk_elements=8 * 4000)
    loss.backward()
    assert max(saved) <= 64 * 16  # only the hidden-state gradient, never 64 x 4000 logits
    assert weight.grad is None and hidden.grad.shape == hidden.shape


def test_linear_cross_entropy_under_no_grad_computes_no_gradients():
    # Evaluation of a model whose weights require grad (full fine-tuning, `tunelab eval`) must not pay for gradients.
    from torch.profiler import profile

    torch.manual_seed(0)
    hidden, weight = torch.randn(64, 16, requires_grad=True), torch.randn(4000, 16, requires_grad=True)
    targets = torch.randint(0, 4000, (64,))
    with torch.no_grad(), profile() as prof:
        loss = linear_cross_entropy(hidden, weight, targets, chunk_elements=8 * 4000)
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls["aten::mm"] == 8  # one logits matmul per 8-row chunk; with gradients 3 (logits, d_hidden, d_weight)
    assert "aten::zeros_like" not in calls  # no weight-gradient buffer
    assert float(loss) == pytest.approx(float(naive_loss(hidden, weight, targets)), rel=1e-5)


def test_linear_cross_entropy_under_bf16_autocast_matches_autocast_reference():
    torch.manual_seed(0)
    hidden = torch.randn(40, 32, requires_grad=True)
    weight = torch.randn(300, 32)
    targets = torch.randint(0, 300, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = naive_loss(hidden, weight, targets)
        loss = linear_cross_entropy(hidden, weight, targets, chunk_elements=300 * 9)
    ref.backward()
    ref_h, hidden.grad = hidden.grad.clone(), None
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-3)
    torch.testing.assert_close(hidden.grad, ref_h, rtol=2e-2, atol=2e-2)


def _lora_model(vocab: int, seed: int = 0):
    model = build_tiny_model(vocab, seed=seed)
    torch.manual_seed(seed)
    model = attach_method(model, LoraMethod(name="lora", r=4, alpha=8, dropout=0.0))
    # Non-zero B matrices, so the adapters take part in the gradients compared below.
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


def _step(model, batch) -> tuple[float, dict[str, torch.Tensor], int]:
    """(loss, gradients of trained parameters, distinct bf16 activation storages autograd kept)."""
    storages: set[int] = set()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if t.dtype == torch.bfloat16 and ptr not in params:
            storages.add(ptr)
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = causal_lm_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads, len(storages)


def test_shared_input_casts_change_no_number_and_store_each_input_once(tiny_tokenizer):
    from tunelab.data.formats import Example
    from tunelab.data.tokenize import encode_example

    rows = [Example(f"r{i}", [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"The {w} is here."}])
            for i, w in enumerate(["fox", "dog", "France"])]
    batch = collate([encode_example(r, tiny_tokenizer, 64)[0] for r in rows], tiny_tokenizer.pad_token_id)
    plain = _lora_model(len(tiny_tokenizer))
    store_frozen_in(plain, torch.bfloat16)
    shared = _lora_model(len(tiny_tokenizer))
    store_frozen_in(shared, torch.bfloat16)
    share_input_casts(shared, torch.bfloat16)
    loss_a, grads_a, kept_a = _step(plain, batch)
    loss_b, grads_b, kept_b = _step(shared, batch)
    assert loss_b == loss_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=0)
    # Per layer the q, k, v adapters read one normed input and the gate, up adapters another: autograd kept five bf16
    # casts of them (plus PEFT's copy of the down adapter's input), now two. Two layers: eight fewer.
    assert kept_b <= kept_a - 2 * 4


def test_micro_batches_respect_the_budget_and_keep_every_example():
    lengths = [50, 10, 30, 30, 5, 64, 12]
    batch = [0, 1, 2, 3, 4, 5, 6]
    parts = micro_batches(batch, lengths, 100)
    assert sorted(i for p in parts for i in p) == batch
    assert all(len(p) == 1 or len(p) * max(lengths[i] for i in p) <= 100 for p in parts)
    assert micro_batches(batch, lengths, None) == [batch] and micro_batches(batch, lengths, 10_000) == [batch]
    assert micro_batches([5], lengths, 8) == [[5]]  # a row longer than the budget still gets its micro-batch


def test_token_budget_batches_are_fixed_per_run_and_shuffled_per_epoch():
    lengths = [(i * 37) % 120 + 4 for i in range(200)]
    e0, e1 = token_budget_batches(lengths, 256, seed=0, epoch=0), token_budget_batches(lengths, 256, seed=0, epoch=1)
    assert sorted(i for b in e0 for i in b) == list(range(200))
    assert all(len(b) * max(lengths[i] for i in b) <= 256 for b in e0)
    assert sorted(map(sorted, e0)) == sorted(map(sorted, e1)) and e0 != e1
    assert len({len(b) for b in e0}) > 3  # short rows share a batch, long rows get few companions


def _losses(run_dir: Path) -> list[float]:
    return [r["train_loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "train_loss" in r]


def test_micro_batches_and_checkpointing_reproduce_the_plain_losses(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(24))

    def run(name: str, **training) -> tuple[list[float], dict]:
        cfg = run_config(tiny_model_dir, data, tmp_path / name, training={"max_steps": 4, "batch_size": 8, **training})
        result = train(load_config(cfg), quiet=True)
        return _losses(result.run_dir), result.summary

    plain, summary = run("plain", micro_batch_tokens=None, gradient_checkpointing=False)
    split, split_summary = run("split", micro_batch_tokens=40)
    recomputed, ckpt_summary = run("ckpt", micro_batch_tokens=None, gradient_checkpointing=True)
    assert summary["micro_batch_tokens"] is None and split_summary["micro_batch_tokens"] == 40
    assert ckpt_summary["gradient_checkpointing"] is True and summary["gradient_checkpointing"] is False
    assert split == pytest.approx(plain, rel=1e-5)
    assert recomputed == pytest.approx(plain, rel=1e-5)


def test_token_budget_run_plans_its_steps(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(24))
    cfg = run_config(tiny_model_dir, data, tmp_path / "run", training={"max_steps": None, "epochs": 2, "max_tokens_per_batch": 120})
    summary = train(load_config(cfg), quiet=True).summary
    batches = summary["steps"] / 2
    assert batches == int(batches) and 2 <= batches < 24  # several rows per batch, the same batches in both epochs


def test_memory_plan():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30)
    per_token = activation_bytes_per_token(cfg, torch.bfloat16)
    assert per_token == 30 * (20 * 576 + 8 * 1536) and activation_bytes_per_token(cfg, None) == 2 * per_token
    cpu, gib = torch.device("cpu"), 1 << 30
    assert plan_memory("auto", "auto", cfg, torch.bfloat16, cpu, 512, free=16 * gib)[:2] == (CPU_MICRO_BATCH_TOKENS, False)
    tokens, ckpt, _ = plan_memory("auto", "auto", cfg, torch.bfloat16, cpu, 256, free=gib)  # 1 GiB: fewer tokens fit
    assert 0 < tokens < CPU_MICRO_BATCH_TOKENS and ckpt is False
    tokens, ckpt, reason = plan_memory("auto", "auto", cfg, torch.bfloat16, cpu, 4096, free=gib)  # one row does not fit
    assert ckpt is True and "checkpointing" in reason
    assert plan_memory(None, False, cfg, torch.bfloat16, cpu, 4096, free=gib)[:2] == (None, False)  # explicit wins
    assert plan_memory(2048, True, cfg, None, cpu, 8, free=64 * gib)[:2] == (2048, True)
    # micro-batches side by side share the memory: the auto budget is each one's share, the reason says how many
    one, _, _ = plan_memory("auto", "auto", cfg, torch.bfloat16, cpu, 256, free=gib)
    two, ckpt, reason = plan_memory("auto", "auto", cfg, torch.bfloat16, cpu, 256, free=gib, threads=2)
    assert two == one // 2 and ckpt is False and "2 at once" in reason
    assert plan_memory("auto", "auto", cfg, torch.bfloat16, cpu, 512, free=16 * gib, threads=2)[0] == CPU_MICRO_BATCH_TOKENS
    # `one` is all that fits at 1 GiB: an explicit budget that large, four at a time, needs checkpointing
    assert plan_memory(one, "auto", cfg, torch.bfloat16, cpu, 8, free=gib)[1] is False
    assert plan_memory(one, "auto", cfg, torch.bfloat16, cpu, 8, free=gib, threads=4)[1] is True


def test_micro_batch_tokens_must_be_positive(tiny_model_dir, tmp_path):
    from tunelab.errors import TunelabError

    cfg = run_config(tiny_model_dir, tmp_path / "x.jsonl", tmp_path / "run", training={"micro_batch_tokens": 0})
    with pytest.raises(TunelabError, match="micro_batch_tokens"):
        load_config(cfg)


def test_micro_batches_side_by_side_reproduce_one_thread(tiny_model_dir, tmp_path):
    """training.micro_batch_threads: two micro-batches at once give the one-thread losses, and repeat bit for bit."""
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(24))

    def run(name: str, threads: int) -> tuple[list[dict], dict]:
        cfg = run_config(tiny_model_dir, data, tmp_path / name,
                         training={"max_steps": 4, "batch_size": 8, "micro_batch_tokens": 40, "micro_batch_threads": threads})
        result = train(load_config(cfg), quiet=True)
        records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r for r in records if "train_loss" in r], result.summary

    one, one_summary = run("one", 1)
    two, two_summary = run("two", 2)
    again, _ = run("again", 2)
    assert one_summary["micro_batch_threads"] == 1 and two_summary["micro_batch_threads"] == 2
    assert [r["train_loss"] for r in two] == pytest.approx([r["train_loss"] for r in one], rel=1e-5)
    assert [r["grad_norm"] for r in two] == pytest.approx([r["grad_norm"] for r in one], rel=1e-5)
    assert [(r["train_loss"], r["grad_norm"]) for r in again] == [(r["train_loss"], r["grad_norm"]) for r in two]
    assert two_summary["final_eval_loss"] == pytest.approx(one_summary["final_eval_loss"], rel=1e-5)


def test_backward_in_threads_sums_every_gradient_like_one_thread():
    from tunelab.train.parallel import Workers, backward_in_threads

    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    unused = torch.nn.Parameter(torch.ones(3))  # no micro-batch reaches it: its grad stays None
    params = [*layer.parameters(), unused]
    batches = [{"input_ids": torch.randn(n, 8)} for n in (5, 3, 7, 2, 4)]

    def loss_of(batch):
        loss = layer(batch["input_ids"]).pow(2).sum()
        return loss, float(loss.detach())

    reference = []
    for b in batches:
        loss, value = loss_of(b)
        loss.backward()
        reference.append(value)
    expected = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad(set_to_none=True)
    values = backward_in_threads(loss_of, batches, params, Workers(2))
    assert values == reference  # reported in batch order
    for p, g in zip(layer.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-7)
    assert unused.grad is None


def test_backward_in_threads_runs_the_given_groups():
    """`groups` says which micro-batches each thread runs; the summed gradients are the same whichever split."""
    from tunelab.train.parallel import Workers, backward_in_threads

    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 1)
    batches = [{"input_ids": torch.randn(n, 8)} for n in (5, 3, 7, 2)]
    ran: list[tuple[str, int]] = []

    def loss_of(batch):
        ran.append((threading.current_thread().name, len(batch["input_ids"])))
        loss = layer(batch["input_ids"]).pow(2).sum()
        return loss, float(loss.detach())

    for b in batches:
        loss_of(b)[0].backward()
    expected = layer.weight.grad.clone()
    layer.zero_grad(set_to_none=True)
    ran.clear()
    values = backward_in_threads(loss_of, batches, list(layer.parameters()), Workers(2), groups=[[0, 3], [1, 2]])
    assert len(values) == 4
    torch.testing.assert_close(layer.weight.grad, expected, rtol=1e-6, atol=1e-7)
    by_thread = {}
    for name, n in ran:
        by_thread.setdefault(name, []).append(n)
    assert sorted(by_thread.values()) == [[3, 7], [5, 2]]  # 5 and 2 rows on one thread, 3 and 7 on the other


def test_split_step_balances_rows_across_threads_in_few_micro_batches():
    from tunelab.train.parallel import row_cost, split_step

    # long rows: each thread gets four, in micro-batches of two (the budget), about the same cost on each thread
    lengths = [392, 488, 403, 418, 395, 488, 407, 403]
    plan = split_step(list(range(8)), lengths, 2, 1000)
    assert sorted(i for group in plan for mb in group for i in mb) == list(range(8))  # every row once
    assert [len(group) for group in plan] == [2, 2]
    assert all(len(mb) * max(lengths[i] for i in mb) <= 1000 for group in plan for mb in group)
    costs = [sum(row_cost(lengths[i]) for mb in group for i in mb) for group in plan]
    assert max(costs) / min(costs) < 1.05
    assert split_step(list(range(8)), lengths, 2, 1000) == plan  # deterministic
    # short rows: one micro-batch per thread (dealing ready-made micro-batches left one thread idle here)
    short = [61, 59, 58, 56, 54, 51, 51, 50]
    assert [len(group) for group in split_step(list(range(8)), short, 2, 512)] == [1, 1]
    # a row longer than the budget still gets its own micro-batch; one row is one thread's work
    assert split_step([3], [1, 1, 1, 900], 2, 512) == [[[3]]]
    # rows name examples of the whole data set: the plan holds those indices
    assert sorted(i for group in split_step([7, 2, 5], [10] * 8, 2, None) for mb in group for i in mb) == [2, 5, 7]


def test_workers_keep_grad_mode_and_raise_a_threads_error():
    from tunelab.train.parallel import Workers, deal

    assert deal([5, 1, 4, 4, 2], 2) == [[0, 1, 4], [2, 3]]  # 5+2+1 against 4+4: largest first to the lighter side
    assert deal([3], 4) == [[0]]
    with torch.no_grad():
        modes = Workers(3).run(lambda g, group: (g, torch.is_grad_enabled()), [[1], [2], [3]])
    assert modes == [(0, False), (1, False), (2, False)]

    def fails_on_thread_one(g, group):
        if g == 1:
            raise ValueError("thread one broke")
        return g

    before = torch.get_num_threads()
    with pytest.raises(ValueError, match="thread one broke"):
        Workers(2).run(fails_on_thread_one, [[1], [2]])
    assert torch.get_num_threads() == before  # the intra-op thread count is restored


def test_workers_share_one_queue_so_threads_end_together():
    import time

    from tunelab.train.parallel import Workers

    def work(g, queue):
        taken = []
        for item in queue:
            if item == 0:
                time.sleep(0.5)  # one slow item: the other thread takes all the rest meanwhile
            taken.append(item)
        return g, taken

    with Workers(2) as pool:
        (g0, first), (g1, second) = pool.share(work, range(20))
        assert (g0, g1) == (0, 1) and sorted(first + second) == list(range(20))  # every item once
        assert [0] in (first, second) and sorted(max(first, second, key=len)) == list(range(1, 20))
        assert pool.share(work, range(5), threads=1) == [(0, [0, 1, 2, 3, 4])]  # one thread: in order, on the caller
        assert pool.share(work, [7]) == [(0, [7])]  # never more threads than items


def test_micro_batch_threads_only_where_thread_order_cannot_matter(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tunelab.train.parallel import step_threads

    cpu = torch.device("cpu")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert step_threads(2, cpu, model, thread_safe=True) == 2
    assert step_threads("auto", cpu, model, thread_safe=True) == max(1, torch.get_num_threads())
    assert step_threads(1, cpu, model, thread_safe=True) == 1
    assert step_threads(2, torch.device("cuda"), model, thread_safe=True) == 1
    assert step_threads(2, cpu, model, thread_safe=False) == 1  # e.g. DPO's reference pass
    assert step_threads(2, cpu, model, thread_safe=True, processes=2) == 1
    dropout = attach_method(model, LoraMethod(name="lora", r=4, alpha=8, dropout=0.1))
    assert step_threads(2, cpu, dropout, thread_safe=True) == 1  # dropout masks would depend on thread timing


def test_evaluation_side_by_side_equals_one_thread(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from tunelab.data.formats import Example
    from tunelab.data.tokenize import encode_example
    from tunelab.train.loop import loss_totals

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = alpaca_rows(30)
    examples = [encode_example(Example(f"r{i}", [{"role": "user", "content": r["instruction"] * (1 + i % 7)},
                                                 {"role": "assistant", "content": r["output"]}]), tiny_tokenizer, 256)[0]
                for i, r in enumerate(rows)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = loss_totals(model, examples, 4, tiny_tokenizer.pad_token_id, torch.device("cpu"), None)
        torch.set_num_threads(2)
        two = loss_totals(model, examples, 4, tiny_tokenizer.pad_token_id, torch.device("cpu"), None)
    finally:
        torch.set_num_threads(before)
    assert two[1] == one[1] and two[0] == pytest.approx(one[0], rel=1e-6)


def test_cached_cast_is_made_once_per_weight_value():
    from tunelab.train.precision import cached_cast

    weight = torch.randn(10, 4)
    first = cached_cast(weight, torch.bfloat16)
    assert cached_cast(weight, torch.bfloat16) is first and torch.equal(first, weight.to(torch.bfloat16))
    with torch.no_grad():
        weight.add_(1.0)  # an optimizer step: the version moves, the cast is made again
    again = cached_cast(weight, torch.bfloat16)
    assert again is not first and torch.equal(again, weight.to(torch.bfloat16))
    assert cached_cast(weight, torch.float32) is weight


def test_import_sets_the_allocator_settings_a_user_has_not_set():
    import subprocess
    import sys

    code = "import os, tunelab; print(os.environ['THP_MEM_ALLOC_ENABLE'], os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout.split()
    assert out == ["1", "128"]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**env, "THP_MEM_ALLOC_ENABLE": "0", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"}).stdout.split()
    assert out == ["0", "1024"]


def test_exact_dedupe_does_not_import_datasketch():
    import subprocess
    import sys

    code = ("import sys; from tunelab.data.dedupe import exact_duplicates, cross_split_matches; "
            "exact_duplicates(['a b', 'a b', 'c']); cross_split_matches(['a b'], ['a b', 'x'], threshold=None); "
            "print('datasketch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


needs_packing = pytest.mark.skipif(not can_pack_weights(), reason="needs a torch built with oneDNN (mkldnn)")


@needs_packing
def test_packed_linears_score_the_same_and_leave_nothing_behind():
    """Inside the block the linear layers (and the loss head, through the weight) read oneDNN-packed bf16 weights: the
    same logits and loss as autocast's own casts, no bf16 copy of the head cached on its weight; after it, the layers'
    forwards (an instance forward set before included) and the weights are as they were."""
    torch.manual_seed(0)
    model = build_tiny_model(vocab_size=300).eval()
    marker = model.model.layers[0].mlp.down_proj
    own = marker.forward  # a wrapper set on the instance, as accelerate's hooks do
    marker.forward = lambda x: own(x)
    wrapper = marker.forward
    ids = torch.randint(3, 300, (3, 40))
    labels = ids.clone()
    labels[:, :10] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    head = model.get_output_embeddings().weight
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits
        loss, n = causal_lm_loss(model, batch)
        head.__dict__.pop("_tunelab_cast", None)
        with packed_linears(model, torch.bfloat16):
            assert hasattr(head, "_tunelab_packed") and "forward" in model.model.layers[1].self_attn.q_proj.__dict__
            packed_logits = model(input_ids=ids).logits
            packed_loss, packed_n = causal_lm_loss(model, batch)
            assert not hasattr(head, "_tunelab_cast")  # the loss read the packed head, not a cached bf16 copy
    torch.testing.assert_close(packed_logits, logits, rtol=1e-2, atol=1e-2)  # bf16 logits, summed in another order
    assert packed_n == n and abs(float(packed_loss) - float(loss)) <= 1e-4 * float(loss)
    assert marker.forward is wrapper and "forward" not in model.model.layers[1].self_attn.q_proj.__dict__
    assert not any(hasattr(p, "_tunelab_packed") for p in model.parameters())


@needs_packing
def test_packed_linears_leave_training_and_fp32_alone():
    torch.manual_seed(0)
    model = build_tiny_model(vocab_size=300)
    ids = torch.randint(3, 300, (2, 20))
    with packed_linears(model, None):  # fp32 evaluation: nothing is packed
        assert not any(hasattr(p, "_tunelab_packed") for p in model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(input_ids=ids, labels=ids).loss
        plain.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        with packed_linears(model, torch.bfloat16):  # with gradients the layers run as before
            packed = model(input_ids=ids, labels=ids).loss
            packed.backward()
    assert torch.equal(packed, plain)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
