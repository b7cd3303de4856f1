"""Layer-wise learning-rate decay, gradual unfreezing, bottleneck adapters, distillation and continual-learning
penalties on tiny in-process Llamas: exact learning rates and updates, which blocks change at which step, bit-equal
reloads, losses equal to references computed by hand.

    OMP_NUM_THREADS=1 python -m pytest -x -q tests/test_methods_extra.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import alpaca_rows, build_tiny_model, build_tiny_tokenizer, run_config, write_jsonl
from test_cli_errors import train_cli, user_error

from tunelab import load_config, train
from tunelab.data.dataset import collate, prepare_data
from tunelab.models.loading import resolve_model
from tunelab.train import loop
from tunelab.train.loss import causal_lm_loss


@pytest.fixture(scope="module")
def deep_model_dir(tmp_path_factory) -> Path:
    """A 4-layer tiny Llama + tokenizer: enough blocks to see decays and unfreezing apart."""
    out = tmp_path_factory.mktemp("tiny-llama-4")
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(len(tokenizer), layers=4).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture()
def train_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", alpaca_rows(12))


def losses(run_dir: Path) -> list[float]:
    return [r["train_loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "train_loss" in r]


def load_tiny(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay


def expected_scale(name: str, decay: float, n_blocks: int) -> float:
    if name.startswith("model.layers."):
        return decay ** (n_blocks - 1 - int(name.split(".")[2]))
    if name.startswith("model.embed_tokens"):  # the head is tied to it: one tensor
        return decay**n_blocks
    return 1.0


def test_layer_lr_decay_gives_each_block_its_learning_rate(deep_model_dir):
    model = load_tiny(deep_model_dir)
    cfg = load_config({"data": {"train": "x.jsonl"}, "training": {"learning_rate": 0.01, "layer_lr_decay": 0.5}}).training
    optimizer = loop._optimizer(model, cfg)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert set(lr_of) == {id(p) for p in names.values()}
    for name, p in names.items():
        assert lr_of[id(p)] == 0.01 * expected_scale(name, 0.5, 4), name
    assert lr_of[id(names["model.layers.0.mlp.up_proj.weight"])] == 0.01 * 0.5**3
    assert lr_of[id(names["model.embed_tokens.weight"])] == 0.01 * 0.5**4
    assert lr_of[id(names["model.norm.weight"])] == 0.01
    # Without the setting: the two groups of before (decayed, not decayed) at one learning rate.
    plain = loop._optimizer(model, cfg.model_copy(update={"layer_lr_decay": None}))
    assert [g["lr"] for g in plain.param_groups] == [0.01, 0.01]


def test_layer_lr_decay_reaches_adapter_parameters_inside_blocks(deep_model_dir):
    from tunelab.methods import attach_method

    cfg = load_config({"data": {"train": "x.jsonl"}, "method": {"name": "lora", "r": 2},
                       "training": {"learning_rate": 0.01, "layer_lr_decay": 0.5}})
    model = attach_method(load_tiny(deep_model_dir), cfg.method)
    optimizer = loop._optimizer(model, cfg.training)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(lr_of) == {id(p) for p in trained.values()}
    for name, p in trained.items():
        block = int(name.split("layers.")[1].split(".")[0])
        assert lr_of[id(p)] == 0.01 * 0.5 ** (3 - block), name


def test_layer_lr_decay_step_equals_a_hand_computed_adamw_step(deep_model_dir, train_file, tmp_path, monkeypatch):
    """One training step through the loop (warmup factor 1/2 on every group) equals AdamW's first step by hand."""
    decay, lr, wd = 0.5, 0.01, 0.1
    cfg = load_config(run_config(deep_model_dir, train_file, tmp_path / "run", method={"name": "full"}, training={
        "max_steps": 4, "batch_size": 12, "warmup_steps": 1, "schedule": "cosine", "layer_lr_decay": decay,
        "weight_decay": wd, "max_grad_norm": None, "micro_batch_tokens": None, "save_every": 1}))
    seen = {}
    save_checkpoint = loop.save_checkpoint

    def stop_after_one_step(*args, **kwargs):
        seen["model"] = args[2]
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", stop_after_one_step)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, quiet=True)
    monkeypatch.setattr(loop, "save_checkpoint", save_checkpoint)
    trained = dict(seen["model"].named_parameters())

    base = load_tiny(deep_model_dir)
    tokenizer = build_tiny_tokenizer()
    data = prepare_data(cfg.data, tokenizer, cfg.training.seed, base=resolve_model(cfg.model))
    loss, n = causal_lm_loss(base, collate(list(data.train), tokenizer.pad_token_id))
    (loss / n).backward()
    factor = 1 / 2  # warmup: (step + 1) / (warmup + 1) at step 0
    for name, p in base.named_parameters():
        g = p.grad
        step_lr = lr * expected_scale(name, decay, 4) * factor
        wd_here = 0.0 if p.ndim < 2 or "norm" in name else wd
        # AdamW step 1: m = (1-b1) g, v = (1-b2) g^2; bias-corrected m/sqrt(v) = g/|g|; decoupled weight decay first.
        m, v = 0.1 * g, 0.001 * g * g
        expected = p.detach() * (1 - step_lr * wd_here) - step_lr * (m / 0.1) / ((v.sqrt() / 0.001**0.5) + 1e-8)
        # Elements whose gradient is near eps flip with rounding: 1% of one step's size is far below the lrs' factor 2.
        torch.testing.assert_close(trained[name].detach(), expected, rtol=0, atol=0.01 * step_lr,
                                   msg=lambda m, name=name: f"{name}: {m}")
        moved = (trained[name].detach() - p.detach() * (1 - step_lr * wd_here)).abs()
        assert moved.median() == pytest.approx(step_lr, rel=0.01), name  # most weights moved by lr * sign(g)


# ----------------------------------------------------------------------------------------------------------------------
# Gradual unfreezing


class Snapshots:
    """Every parameter after each optimizer step (the loop checkpoints every step with save_every: 1)."""

    def __init__(self, monkeypatch) -> None:
        self.after: dict[int, dict[str, torch.Tensor]] = {}
        self.before: dict[str, torch.Tensor] = {}
        save, attach = loop.save_checkpoint, loop.attach_method

        def save_and_copy(checkpoints, step, model, *args, **kwargs):
            self.after[step] = {n: p.detach().clone() for n, p in model.named_parameters()}
            return save(checkpoints, step, model, *args, **kwargs)

        def attach_and_copy(model, *args):
            model = attach(model, *args)
            self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
            return model

        monkeypatch.setattr(loop, "save_checkpoint", save_and_copy)
        monkeypatch.setattr(loop, "attach_method", attach_and_copy)

    def changed_blocks(self, step: int) -> set[int]:
        old = self.after.get(step - 1, self.before)
        return {int(n.split(".")[2]) for n, t in self.after[step].items()
                if n.startswith("model.layers.") and not torch.equal(t, old[n])}


UNFREEZE = {"name": "freeze", "train_top_blocks": 1, "unfreeze_every": 2}


def test_gradual_unfreezing_adds_one_block_from_the_top_every_k_steps(deep_model_dir, train_file, tmp_path, monkeypatch):
    snaps = Snapshots(monkeypatch)
    cfg = run_config(deep_model_dir, train_file, tmp_path / "run", method=UNFREEZE,
                     training={"max_steps": 7, "save_every": 1, "keep_last": 1})
    train(load_config(cfg), quiet=True)
    assert [snaps.changed_blocks(s) for s in range(1, 8)] == [{3}, {3}, {2, 3}, {2, 3}, {1, 2, 3}, {1, 2, 3}, {0, 1, 2, 3}]
    embed = "model.embed_tokens.weight"
    assert torch.equal(snaps.after[7][embed], snaps.before[embed])


def test_gradual_unfreezing_resumes_with_the_right_frozen_set(deep_model_dir, train_file, tmp_path):
    common = {"method": UNFREEZE, "training": {"max_steps": 6, "save_every": 2}}
    straight = train(load_config(run_config(deep_model_dir, train_file, tmp_path / "straight", **common)), quiet=True)
    part = run_config(deep_model_dir, train_file, tmp_path / "part", **common)
    train(load_config({**part, "training": {**part["training"], "max_steps": 4}}), quiet=True)  # stops at a boundary
    resumed = train(load_config(part), resume=True, quiet=True)
    assert losses(resumed.run_dir) == losses(straight.run_dir)
    from safetensors.torch import load_file

    final = load_file(resumed.run_dir / "model" / "model.safetensors")
    assert all(torch.equal(t, final[n]) for n, t in load_file(straight.run_dir / "model" / "model.safetensors").items())


def test_gradual_unfreezing_by_epochs(deep_model_dir):
    from tunelab.methods.freeze import GradualUnfreezing

    model = load_tiny(deep_model_dir)
    cfg = load_config({"data": {"train": "x.jsonl"}, "method": {**UNFREEZE, "unfreeze_unit": "epochs", "unfreeze_every": 1,
                                                                 "train_modules": ["model.layers.0.input_layernorm.*"]}})
    schedule = GradualUnfreezing(model, cfg.method)
    assert [schedule.blocks_trained(step=100, epoch=e) for e in range(5)] == [1, 2, 3, 4, 4]
    schedule.apply(step=100, epoch=1)
    trained = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("model.layers.")}
    assert {int(n.split(".")[2]) for n in trained} == {0, 2, 3}
    assert {n for n in trained if n.startswith("model.layers.0.")} == {"model.layers.0.input_layernorm.weight"}


def test_gradual_unfreezing_refuses_early_stopping(tiny_model_dir, train_file, tmp_path):
    cfg = run_config(tiny_model_dir, train_file, tmp_path / "out", method=UNFREEZE, training={"early_stopping": {}})
    user_error(train_cli(tmp_path, cfg), "training.early_stopping", "unfreeze_every")


# ----------------------------------------------------------------------------------------------------------------------
# Bottleneck adapters


def fixed_input(tokenizer) -> dict:
    return tokenizer(["The quick brown fox jumps over", "Hello! How can I"], return_tensors="pt", padding=True)


@pytest.mark.parametrize("non_linearity", ["gelu", "relu", "silu"])
def test_adapter_model_starts_bit_identical_to_the_base(tiny_model_dir, non_linearity):
    from tunelab.methods import attach_method

    tokenizer = build_tiny_tokenizer()
    base, adapted = load_tiny(tiny_model_dir).eval(), load_tiny(tiny_model_dir)
    cfg = load_config({"data": {"train": "x.jsonl"}, "method": {"name": "adapter", "non_linearity": non_linearity,
                                                                "reduction_factor": 4}}).method
    adapted = attach_method(adapted, cfg).eval()
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 2 * 4  # 2 blocks x (attention, mlp) x (down, up) x (weight, bias)
    assert all(".adapter_attention." in n or ".adapter_mlp." in n for n in trainable)
    assert adapted.base_model.model.layers[0].adapter_mlp.down.out_features == 32 // 4
    with torch.no_grad():
        assert torch.equal(adapted(**fixed_input(tokenizer)).logits, base(**fixed_input(tokenizer)).logits)


def test_adapter_trains_only_adapters_and_reloads_bit_equal(tiny_model_dir, train_file, tmp_path, monkeypatch):
    from tunelab.generate import generate, load_for_inference

    snaps = Snapshots(monkeypatch)
    method = {"name": "adapter", "reduction_factor": 8, "non_linearity": "relu"}
    cfg = run_config(tiny_model_dir, train_file, tmp_path / "run", method=method, data={"validation": 0.25},
                     training={"max_steps": 3, "save_every": 1})
    result = train(load_config(cfg), quiet=True)
    assert result.summary["final_eval_loss"] < result.summary["initial_eval_loss"]
    final = snaps.after[3]
    changed = {n for n, t in final.items() if not torch.equal(t, snaps.before[n])}
    assert changed and all(".adapter_" in n for n in changed), sorted(changed)[:5]
    assert any(".adapter_mlp.up.weight" in n for n in changed)  # the zero-initialised side moved
    files = {p.name for p in (result.run_dir / "model").iterdir()}
    assert {"bottleneck_adapter.json", "bottleneck_adapter.safetensors"} <= files
    assert not {"model.safetensors", "config.json", "adapter_config.json"} & files  # no base weights saved

    reloaded, tokenizer = load_for_inference(result.run_dir)
    trained = load_tiny(tiny_model_dir)
    from tunelab.methods import bottleneck

    with torch.no_grad():  # the trained weights put back by hand into a fresh model: the reference
        trained = bottleneck.attach(trained, load_config(cfg).method)
        params = dict(trained.named_parameters())
        for name, tensor in final.items():
            params[name].copy_(tensor)
        expected = trained.eval()(**fixed_input(tokenizer)).logits
        got = reloaded(**fixed_input(tokenizer)).logits
        base = load_tiny(tiny_model_dir).eval()(**fixed_input(tokenizer)).logits
    assert torch.equal(got, expected)
    assert not torch.equal(got, base)
    assert len(generate(reloaded, tokenizer, ["Say something about the fox."], max_new_tokens=3)) == 1


def test_adapter_placement_subset_and_export_merge_refused(tiny_model_dir, train_file, tmp_path):
    from typer.testing import CliRunner

    from tunelab.cli import app

    cfg = run_config(tiny_model_dir, train_file, tmp_path / "run", training={"max_steps": 1},
                     method={"name": "adapter", "placement": ["attention"]})
    run = train(load_config(cfg), quiet=True).run_dir
    from safetensors.torch import load_file

    names = set(load_file(run / "model" / "bottleneck_adapter.safetensors"))
    assert names and all(".adapter_attention." in n for n in names)
    result = CliRunner().invoke(app, ["export", str(run), "--to", str(tmp_path / "exported"), "--merge"])
    user_error(result, "bottleneck adapters", "cannot be merged")


def test_adapter_bad_placement_is_a_config_error(tiny_model_dir, train_file, tmp_path):
    cfg = run_config(tiny_model_dir, train_file, tmp_path / "out", method={"name": "adapter", "placement": ["ffn"]})
    user_error(train_cli(tmp_path, cfg), "method.placement")


def test_adapter_run_is_served(tiny_model_dir, train_file, tmp_path):
    from tunelab.serve.models import ServedModels

    cfg = run_config(tiny_model_dir, train_file, tmp_path / "run", training={"max_steps": 1}, method={"name": "adapter"})
    run = train(load_config(cfg), quiet=True).run_dir
    served = ServedModels.load(str(run))
    assert list(served.entries) == ["run"] and type(served.model).__name__ == "BottleneckModel"


# ----------------------------------------------------------------------------------------------------------------------
# Knowledge distillation


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """Another 2-layer tiny Llama (other weights), same tokenizer as tiny_model_dir."""
    out = tmp_path_factory.mktemp("tiny-teacher")
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(len(tokenizer), seed=1).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def encoded_batch(model_dir: Path, train_file: Path, tmp_path: Path) -> dict:
    cfg = load_config(run_config(model_dir, train_file, tmp_path / "unused"))
    tokenizer = build_tiny_tokenizer()
    data = prepare_data(cfg.data, tokenizer, 0, base=resolve_model(cfg.model))
    return collate(list(data.train)[:6], tokenizer.pad_token_id)


def test_distill_loss_equals_a_reference_on_full_logits(tiny_model_dir, teacher_dir, train_file, tmp_path):
    from tunelab.data.tokenize import IGNORE
    from tunelab.methods.distill import DistillObjective

    alpha, temp = 0.3, 2.0
    batch = encoded_batch(tiny_model_dir, train_file, tmp_path)
    student, teacher = load_tiny(tiny_model_dir), load_tiny(teacher_dir).eval().requires_grad_(False)
    objective = DistillObjective(teacher, alpha, temp, chunk_elements=7 * 400)  # 7 rows per chunk: several chunks
    loss, n = objective.loss(student, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in student.named_parameters()}
    student.zero_grad()

    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    s_logits = student(**inputs).logits[:, :-1][keep]
    with torch.no_grad():
        t_logits = teacher(**inputs).logits[:, :-1][keep]
    p_t = torch.softmax(t_logits / temp, -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s_logits / temp, -1))).sum()
    ce = -torch.log_softmax(s_logits, -1).gather(1, labels[keep][:, None]).sum()
    expected = alpha * ce + (1 - alpha) * temp**2 * kl
    expected.backward()
    assert n == int(keep.sum()) > 7
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for name, p in student.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    stats = {}
    with torch.no_grad():
        objective.loss(student, batch, stats)
    assert stats["kl"] == pytest.approx(kl.item(), rel=1e-5) and stats["ce"] == pytest.approx(ce.item(), rel=1e-5)


def test_distill_training_lowers_kl_to_the_teacher_on_held_out_rows(tiny_model_dir, teacher_dir, train_file, tmp_path):
    method = {"name": "distill", "teacher": str(teacher_dir), "alpha": 0.0, "temperature": 1.0,
              "adapter": {"name": "full"}}
    cfg = run_config(tiny_model_dir, train_file, tmp_path / "run", method=method, data={"validation": 0.25},
                     training={"max_steps": 6, "learning_rate": 3e-3})
    result = train(load_config(cfg), quiet=True)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_kl" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 6
    assert evals[-1]["eval_kl"] < 0.5 * evals[0]["eval_kl"]  # alpha 0: the loss is the KL alone
    assert evals[-1]["eval_loss"] == pytest.approx(evals[-1]["eval_kl"], rel=1e-4)


def test_distill_from_a_teacher_with_another_tokenizer_is_refused(tiny_model_dir, train_file, tmp_path):
    other = tmp_path / "other-teacher"
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens(["<extra-token>"])
    build_tiny_model(len(tokenizer)).save_pretrained(other)
    tokenizer.save_pretrained(other)
    cfg = run_config(tiny_model_dir, train_file, tmp_path / "out", method={"name": "distill", "teacher": str(other)})
    user_error(train_cli(tmp_path, cfg), "method.teacher", "another tokenizer", "401 tokens")
    missing = run_config(tiny_model_dir, train_file, tmp_path / "out2", method={"name": "distill", "teacher": "nope/x"})
    user_error(train_cli(tmp_path, missing), "method.teacher")


# ----------------------------------------------------------------------------------------------------------------------
# Continual-learning penalties


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def hand_fisher(model_dir: Path, cfg, rows: int) -> dict[str, torch.Tensor]:
    model = load_tiny(model_dir).eval()
    tokenizer = build_tiny_tokenizer()
    data = prepare_data(cfg.data, tokenizer, cfg.training.seed, base=resolve_model(cfg.model))
    fisher = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for example in list(data.train)[:rows]:
        model.zero_grad()
        loss, n = causal_lm_loss(model, collate([example], tokenizer.pad_token_id))
        (loss / n).backward()
        for name, p in model.named_parameters():
            fisher[name] += p.grad**2
    return {n: f / rows for n, f in fisher.items()}


@pytest.mark.parametrize("penalty", ["l2sp", "ewc"])
def test_penalty_equals_the_hand_computed_value(penalty, tiny_model_dir, train_file, tmp_path, monkeypatch):
    snaps = Snapshots(monkeypatch)
    strength = 2.0 if penalty == "l2sp" else 1000.0
    cfg = load_config(run_config(tiny_model_dir, train_file, tmp_path / "run", method={"name": "full"},
                                 continual={"penalty": penalty, "penalty_strength": strength, "ewc_rows": 5},
                                 training={"max_steps": 3, "save_every": 1}))
    run = train(cfg, quiet=True).run_dir
    logged = {r["step"]: r["penalty"] for r in records(run) if "penalty" in r}
    assert logged[1] == 0.0  # the first step starts at the anchor
    weight = hand_fisher(tiny_model_dir, cfg, 5) if penalty == "ewc" else None
    for step in (2, 3):  # step k's penalty is computed on the weights after step k - 1, before its update
        previous = snaps.after[step - 1]
        expected = 0.5 * strength * sum(
            (((previous[n] - w0) ** 2) * (weight[n] if weight is not None else 1)).sum() for n, w0 in snaps.before.items())
        assert logged[step] == pytest.approx(float(expected), rel=1e-4, abs=1e-6)
        assert logged[step] > 0.01


OLD_ROWS = alpaca_rows(12)
NEW_ROWS = [{"prompt": f"Count from {i} to {i + 3} in words.", "response": " ".join(["one", "two", "three", "four",
            "five", "six", "seven", "eight", "nine", "ten"][i % 6 : i % 6 + 4])} for i in range(12)]


@pytest.fixture(scope="module")
def old_task(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """(a full fine-tune of the tiny model on the 'old' task, that task's data file)."""
    tmp = tmp_path_factory.mktemp("old-task")
    old_file = write_jsonl(tmp / "old.jsonl", OLD_ROWS)
    cfg = run_config(tiny_model_dir, old_file, tmp / "old-run", method={"name": "full"},
                     training={"max_steps": 30, "learning_rate": 1e-2})
    return train(load_config(cfg), quiet=True).run_dir / "model", old_file


def old_loss_and_drift(run_dir: Path, old_model: Path, old_file: Path) -> tuple[float, float]:
    tokenizer = build_tiny_tokenizer()
    cfg = load_config(run_config(old_model, old_file, run_dir / "unused"))
    data = prepare_data(cfg.data, tokenizer, 0, base=resolve_model(str(old_model)))
    model, start = load_tiny(run_dir / "model"), load_tiny(old_model)
    with torch.no_grad():
        loss, n = causal_lm_loss(model, collate(list(data.train), tokenizer.pad_token_id))
        drift = sum(((p - q) ** 2).sum() for p, q in zip(model.parameters(), start.parameters())) ** 0.5
    return float(loss / n), float(drift)


def test_penalties_reduce_forgetting_of_the_old_task(old_task, tmp_path):
    old_model, old_file = old_task
    new_file = write_jsonl(tmp_path / "new.jsonl", NEW_ROWS)

    def run_new(name: str, continual: dict) -> tuple[float, float]:
        cfg = run_config(old_model, new_file, tmp_path / name, method={"name": "full"}, continual=continual,
                         training={"max_steps": 10, "learning_rate": 1e-2})
        return old_loss_and_drift(train(load_config(cfg), quiet=True).run_dir, old_model, old_file)

    start_loss = old_loss_and_drift(old_model.parent, old_model, old_file)[0]
    plain_loss, plain_drift = run_new("plain", {})
    l2sp_loss, l2sp_drift = run_new("l2sp", {"penalty": "l2sp", "penalty_strength": 50.0})
    ewc_loss, ewc_drift = run_new("ewc", {"penalty": "ewc", "penalty_strength": 1e5, "fisher_data": str(old_file)})
    assert plain_loss > start_loss  # training on the new task forgets the old one
    assert l2sp_drift < plain_drift and ewc_drift < plain_drift
    assert l2sp_loss - start_loss < plain_loss - start_loss
    assert ewc_loss - start_loss < plain_loss - start_loss
    print(f"old-task loss {start_loss:.4f} -> plain {plain_loss:.4f} (drift {plain_drift:.3f}), l2sp {l2sp_loss:.4f} "
          f"(drift {l2sp_drift:.3f}), ewc {ewc_loss:.4f} (drift {ewc_drift:.3f})")
