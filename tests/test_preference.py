"""Preference tuning on a tiny in-process Llama: the `preference` data format, DPO (loss and gradients equal to TRL
1.16's DPOTrainer on the same tokens) and reward models, through the training loop, reloaded, and every bad row as one
line with exit code 2.

    OMP_NUM_THREADS=1 python -m pytest -x -q tests/test_preference.py
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import build_tiny_model, build_tiny_tokenizer, run_config, write_csv, write_jsonl
from test_cli_errors import train_cli, user_error

from tunelab import load_config, train
from tunelab.data.cache import EncodedTable, save_encoded
from tunelab.data.dataset import collate_pairs, prepare_data
from tunelab.data.formats import detect_format, preference, to_examples
from tunelab.data.readers import Record
from tunelab.data.tokenize import IGNORE, encode_example
from tunelab.errors import TunelabError
from tunelab.generate import load_for_inference
from tunelab.methods.dpo import DpoObjective, reference_for
from tunelab.methods.reward import RewardObjective
from tunelab.train import loop
from tunelab.train.loss import sequence_log_probs

TOPICS = ["fox", "dog", "France", "autumn", "numbers", "ticket"]


def dpo_rows(n: int = 16) -> list[dict]:
    """The chosen reply names the topic; the rejected one is small talk."""
    return [{"prompt": f"Say something about the {TOPICS[i % 6]}.", "chosen": f"The {TOPICS[i % 6]} is number {i}.",
             "rejected": f"Hello! How can I help you today? {i}" + " Thanks" * (i % 3)} for i in range(n)]


def reward_rows(n: int = 16) -> list[dict]:
    good = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.",
            '{"product": "desk lamp", "urgency": "high"}', "def add(a, b): return a + b"]
    bad = ["Hello! How can I help you today?", "Thanks, goodbye.", "Write a haiku about autumn leaves.", "What is the capital?"]
    return [{"prompt": f"Answer about the {TOPICS[i % 6]}.", "chosen": f"{good[i % 4]} {i}", "rejected": f"{bad[(3 * i) % 4]} {i}"}
            for i in range(n)]


def rec(row: dict, line: int = 3) -> Record:
    return Record("pairs.jsonl", line, row)


def U(text: str) -> dict:
    return {"role": "user", "content": text}


def A(text: str) -> dict:
    return {"role": "assistant", "content": text}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def keep_final_model(monkeypatch) -> dict:
    """The trained model the loop saves, kept for comparison with what reloads."""
    kept: dict = {}
    save = loop.save_model

    def save_and_keep(model, tokenizer, out):
        kept["model"] = model
        save(model, tokenizer, out)

    monkeypatch.setattr(loop, "save_model", save_and_keep)
    return kept


# ----------------------------------------------------------------------------------------------------------------------
# The format


def test_a_pair_is_two_conversations_with_the_same_prompt() -> None:
    ex = preference(rec({"system": "Be terse.", "prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."}))
    system = {"role": "system", "content": "Be terse."}
    assert ex.messages == [system, U("Hi"), A("Hello.")]
    assert ex.rejected == [system, U("Hi"), A("Go away.")]
    # Chat turns (TRL's conversational layout): earlier assistant turns are context, never trained.
    ex = preference(rec({"prompt": [U("Hi"), A("Yo"), U("Again?")], "chosen": [A("Sure.")], "rejected": "No."}))
    assert ex.messages == [U("Hi"), {**A("Yo"), "weight": 0}, U("Again?"), A("Sure.")]
    assert ex.rejected[-1] == A("No.")


def test_preference_format_is_detected_from_its_columns(tmp_path) -> None:
    assert detect_format(rec({"prompt": "p", "chosen": "c", "rejected": "r"})) == "preference"
    assert detect_format(rec({"prompt": "p", "response": "r"})) == "prompt_response"
    examples, fmt = to_examples([rec(r, i + 1) for i, r in enumerate(dpo_rows(3))], None)
    assert fmt == "preference" and examples[2].rejected is not None
    from tunelab.data.pipeline import read_rows

    path = write_csv(tmp_path / "pairs.csv", ["prompt", "chosen", "rejected"], [["Hi", "Hello.", "Bye."]])
    rows, fmt = read_rows(str(path), "data.train", None, [])
    assert fmt == "preference" and len(rows) == 1


@pytest.mark.parametrize("row, message", [
    ({"chosen": "a", "rejected": "b"}, "prompt: missing field (format 'preference' needs prompt, chosen, rejected)"),
    ({"prompt": "p", "chosen": "a"}, "rejected: missing field"),
    ({"prompt": "p", "chosen": "Same.", "rejected": "Same."}, "rejected: the same text as chosen; a pair needs two different"),
    ({"prompt": [U("p")], "chosen": [A("x")], "rejected": "x"}, "rejected: the same text as chosen"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "chosen: expected a string or a one-message assistant list, got int"),
    ({"prompt": {"role": "user"}, "chosen": "a", "rejected": "b"}, "prompt: expected a string or a list of {role, content} turns, got dict"),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "prompt: empty; fill it in or remove the row"),
    ({"prompt": "p", "chosen": "a", "rejected": ""}, "rejected: empty; fill it in"),
    ({"prompt": [U("p"), A("q")], "chosen": "a", "rejected": "b"}, "prompt[1]: the prompt's last turn is 'assistant'"),
    ({"prompt": [A("q"), U("p")], "chosen": "a", "rejected": "b"}, "prompt[0]: the conversation starts with an assistant turn"),
    ({"prompt": [U("p"), {"role": "bot", "content": "x"}, U("p")], "chosen": "a", "rejected": "b"}, "prompt[1].role: bad role 'bot'"),
    ({"prompt": "p", "chosen": [U("a")], "rejected": "b"}, "chosen[0].role: a reply must be an assistant message, got 'user'"),
    ({"prompt": "p", "chosen": [A("a"), A("b")], "rejected": "c"}, "chosen: expected one assistant message, got a list of 2"),
    ({"prompt": "p", "chosen": [{"role": "assistant", "content": 5}], "rejected": "c"}, "chosen[0].content: expected a string, got int"),
    ({"prompt": [U("p")], "system": "S", "chosen": "a", "rejected": "c"}, "system: put the system message first in the prompt list"),
])
def test_bad_rows_name_line_field_and_fix(row, message) -> None:
    with pytest.raises(TunelabError) as info:
        preference(rec(row, 7))
    text = str(info.value)
    assert "\n" not in text and text.startswith("pairs.jsonl:7: "), text
    assert message in text, text


def test_pairs_train_only_the_replies_and_survive_the_cache(tiny_tokenizer, tmp_path) -> None:
    ex = preference(rec({"prompt": "Say something about the fox.", "chosen": "The fox.", "rejected": "Hello! How can I help?"}))
    (pair,) = encode_example(ex, tiny_tokenizer, 64)
    (chosen,) = encode_example(type(ex)(ex.source, ex.messages), tiny_tokenizer, 64)  # the same path as any conversation
    assert (pair.input_ids, pair.labels) == (chosen.input_ids, chosen.labels)
    prompt = tiny_tokenizer.apply_chat_template([U("Say something about the fox.")], tokenize=False, add_generation_prompt=True)
    n_prompt = len(tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    for ids, labels in ((pair.input_ids, pair.labels), (pair.rejected_ids, pair.rejected_labels)):
        assert labels[:n_prompt] == [IGNORE] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    assert pair.batch_tokens == 2 * max(len(pair.input_ids), len(pair.rejected_ids))
    save_encoded(tmp_path / "t.arrow", [pair, pair])
    table = EncodedTable(tmp_path / "t.arrow")
    assert table[1] == pair and table.lengths() == [pair.batch_tokens] * 2
    batch = collate_pairs([pair], tiny_tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, max(len(pair.input_ids), len(pair.rejected_ids)))


def test_string_prompts_render_like_chat_prompts(tiny_tokenizer) -> None:
    as_text = preference(rec({"prompt": "Hi there", "chosen": "Hello.", "rejected": "Bye."}))
    as_chat = preference(rec({"prompt": [U("Hi there")], "chosen": [A("Hello.")], "rejected": [A("Bye.")]}))
    assert encode_example(as_text, tiny_tokenizer, 64) == encode_example(as_chat, tiny_tokenizer, 64)


# ----------------------------------------------------------------------------------------------------------------------
# Equality with TRL's DPOTrainer on the same tokens

TRL_ROWS = [
    {"prompt": [U("Say something about the fox.")], "chosen": [A("The quick brown fox jumps.")],
     "rejected": [A("Hello! How can I help?")]},
    {"prompt": [{"role": "system", "content": "Be terse."}, U("What is the capital of France?")], "chosen": [A("Paris.")],
     "rejected": [A("The lazy dog is the capital of autumn leaves, goodbye.")]},
    {"prompt": [U("Extract the ticket as JSON."), A('{"product": "desk lamp"}'), U("And the urgency?")],
     "chosen": [A('{"product": "desk lamp", "urgency": "high"}')], "rejected": [A("Thanks, goodbye.")]},
]
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"}


def _trl_trainer(model, tokenizer, tmp_path, **kwargs):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, report_to=[], bf16=False, fp16=False, beta=0.1,
                     loss_type=["sigmoid"], max_length=None, gradient_checkpointing=False, disable_dropout=True)
    return DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(TRL_ROWS), processing_class=tokenizer, **kwargs)


@pytest.fixture(scope="module")
def trl_case(tmp_path_factory):
    """TRL's DPOTrainer with a LoRA policy whose B matrices are non-zero (so policy != reference), our PEFT model with
    the same weights, and both batches of the same three pairs."""
    from peft import LoraConfig, get_peft_model

    tmp = tmp_path_factory.mktemp("trl")
    tokenizer = build_tiny_tokenizer()
    base = build_tiny_model(len(tokenizer), seed=3)
    trainer = _trl_trainer(copy.deepcopy(base), tokenizer, tmp, peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA))
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(task_type="CAUSAL_LM", **LORA))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        theirs = dict(trainer.model.named_parameters())
        for name, p in ours.named_parameters():
            if p.requires_grad:
                theirs[name].copy_(p)
    encoded = [encode_example(preference(rec(r, i + 1)), tokenizer, 512)[0] for i, r in enumerate(TRL_ROWS)]
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(TRL_ROWS))])
    return trainer, ours, encoded, trl_batch, tokenizer


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _compare_with_trl(trainer, trl_batch, ours, objective, encoded, pad_id) -> tuple[float, float]:
    """(|loss difference|, largest |gradient difference|), each relative to max(1, its scale), between TRL's loss on its
    batch and ours on our tokens."""
    trainer.model.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)
    trl_loss = trainer._compute_loss(trainer.model, trl_batch, False)
    trl_loss.backward()
    loss_sum, n = objective.loss(ours, collate_pairs(encoded, pad_id))
    (loss_sum / n).backward()
    theirs, mine = _grads(trainer.model), _grads(ours)
    assert theirs.keys() == mine.keys() and mine
    scale = max(float(g.abs().max()) for g in mine.values())
    assert scale > 1e-2  # the gradients say something
    trl_value, value = float(trl_loss.detach()), float(loss_sum.detach() / n)
    loss_diff = abs(trl_value - value) / max(1.0, abs(trl_value))
    return loss_diff, max(float((mine[k] - theirs[k]).abs().max()) for k in mine) / max(1.0, scale)


def test_tokenization_equals_trl(trl_case) -> None:
    trainer, _, encoded, trl_batch, _ = trl_case
    for ours, theirs in zip(encoded, trainer.train_dataset):
        prompt = theirs["prompt_ids"]
        assert ours.input_ids == prompt + theirs["chosen_ids"]
        assert ours.rejected_ids == prompt + theirs["rejected_ids"]
        assert ours.labels == [IGNORE] * len(prompt) + theirs["chosen_ids"]
        assert ours.rejected_labels == [IGNORE] * len(prompt) + theirs["rejected_ids"]
    batch = collate_pairs(encoded, trainer.processing_class.pad_token_id)
    assert torch.equal(batch["input_ids"], trl_batch["input_ids"])
    assert torch.equal(batch["attention_mask"], trl_batch["attention_mask"])


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_loss_and_lora_gradients_equal_trl(trl_case, loss_type) -> None:
    trainer, ours, encoded, trl_batch, tokenizer = trl_case
    trainer.loss_types, trainer.beta = [loss_type], 0.1
    objective = DpoObjective(reference_for(ours, None), 0.1, loss_type, 0.0)  # reference: the adapter switched off
    loss_diff, grad_diff = _compare_with_trl(trainer, trl_batch, ours, objective, encoded, tokenizer.pad_token_id)
    assert loss_diff < 1e-5 and grad_diff < 1e-5, (loss_diff, grad_diff)


def test_full_finetuning_dpo_equals_trl_with_a_frozen_reference(tmp_path) -> None:
    tokenizer = build_tiny_tokenizer()
    base = build_tiny_model(len(tokenizer), seed=5)
    objective = DpoObjective(reference_for(base, None), 0.1, "sigmoid", 0.0)  # copies the weights as they are now
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        policy = copy.deepcopy(base)
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    trainer = _trl_trainer(copy.deepcopy(policy), tokenizer, tmp_path, ref_model=copy.deepcopy(base))
    encoded = [encode_example(preference(rec(r, i + 1)), tokenizer, 512)[0] for i, r in enumerate(TRL_ROWS)]
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(TRL_ROWS))])
    loss_diff, grad_diff = _compare_with_trl(trainer, trl_batch, policy, objective, encoded, tokenizer.pad_token_id)
    assert loss_diff < 1e-5 and grad_diff < 1e-5, (loss_diff, grad_diff)


def test_label_smoothing_is_conservative_dpo(trl_case) -> None:
    """TRL 1.16 dropped label smoothing from its sigmoid loss; ours is cDPO as in the DPO authors' code."""
    _, ours, encoded, _, tokenizer = trl_case
    batch = collate_pairs(encoded, tokenizer.pad_token_id)
    n = len(encoded)
    stats: dict = {}
    with torch.no_grad():
        logps = sequence_log_probs(ours, batch)
        with ours.disable_adapter():
            ref = sequence_log_probs(ours, batch)
        margin = 0.1 * ((logps[:n] - ref[:n]) - (logps[n:] - ref[n:]))
        plain, _ = DpoObjective(reference_for(ours, None), 0.1, "sigmoid", 0.0).loss(ours, batch, stats)
        smoothed, _ = DpoObjective(reference_for(ours, None), 0.1, "sigmoid", 0.2).loss(ours, batch)
    assert float(plain) == pytest.approx(float(-F.logsigmoid(margin).sum()), rel=1e-6)
    assert float(smoothed) == pytest.approx(float((-0.8 * F.logsigmoid(margin) - 0.2 * F.logsigmoid(-margin)).sum()), rel=1e-6)
    assert stats["reward_margin"] == pytest.approx(float(margin.sum()), rel=1e-5)
    assert stats["reward_accuracy"] == float((margin > 0).sum())


# ----------------------------------------------------------------------------------------------------------------------
# Runs through the loop


def dpo_config(model_dir: Path, tmp_path: Path, method: dict | None = None, **training) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", dpo_rows())
    return run_config(model_dir, pairs, tmp_path / "run", data={"validation": str(pairs)},
                      method=method or {"name": "dpo", "adapter": {"name": "lora", "r": 4, "alpha": 8}},
                      training={"max_steps": 6, "eval_every": 3, "learning_rate": 5e-3, **training})


def test_dpo_run_raises_the_margin_lowers_the_loss_and_reloads(tiny_model_dir, tmp_path, monkeypatch) -> None:
    kept = keep_final_model(monkeypatch)
    result = train(load_config(dpo_config(tiny_model_dir, tmp_path)), quiet=True)
    records = metrics(result.run_dir)
    evals = [r for r in records if "eval_loss" in r]  # validation = the training pairs
    assert evals[0]["step"] == 0 and evals[0]["eval_loss"] == pytest.approx(0.693147, abs=1e-6)  # policy == reference
    assert evals[0]["eval_reward_margin"] == 0.0
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.1
    assert evals[-1]["eval_reward_margin"] > 0.2 and evals[-1]["eval_reward_accuracy"] == 1.0
    train_losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert train_losses[-1] < train_losses[0]
    s = result.summary
    assert s["method"] == "dpo" and s["data_format"] == "preference" and s["loss_unit"] == "pair"
    assert s["eval_perplexity"] is None and s["final_eval_loss"] == evals[-1]["eval_loss"]
    assert (result.run_dir / "model" / "adapter_model.safetensors").is_file()

    reloaded, tokenizer = load_for_inference(result.run_dir)
    trained = kept["model"].eval()
    ids = tokenizer.apply_chat_template([U("Say something about the fox.")], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        assert torch.equal(reloaded(**ids).logits, trained(**ids).logits)
    # The reloaded adapter gives the final evaluation's numbers, its reference being the adapter switched off.
    data = prepare_data(load_config(result.run_dir / "config.yaml").data, tokenizer, 0)
    stats: dict = {}
    total, n = loop.loss_totals(reloaded, data.validation, 4, tokenizer.pad_token_id, torch.device("cpu"), None,
                                DpoObjective(reference_for(reloaded, None)), stats)
    assert total / n == pytest.approx(evals[-1]["eval_loss"], abs=1e-5)
    assert stats["reward_margin"] / n == pytest.approx(evals[-1]["eval_reward_margin"], abs=1e-5)


@pytest.mark.parametrize("split", [{"micro_batch_tokens": 40}, {"batch_size": 2, "gradient_accumulation": 2}],
                         ids=["micro_batches", "accumulation"])
def test_dpo_micro_batches_and_accumulation_keep_the_losses(split, tiny_model_dir, tmp_path) -> None:
    """A step's loss is the mean over all its pairs however the step is cut (40 tokens: one pair per micro-batch)."""
    def losses(name: str, **training) -> list[float]:
        cfg = dpo_config(tiny_model_dir, tmp_path / name, max_steps=3, eval_every=None, group_by_length=False, **training)
        return [r["train_loss"] for r in metrics(train(load_config(cfg), quiet=True).run_dir) if "train_loss" in r]

    plain = losses("plain", batch_size=4, micro_batch_tokens=None)
    assert losses("split", **{"batch_size": 4, "micro_batch_tokens": None, **split}) == pytest.approx(plain, abs=1e-5)


def test_full_finetuning_dpo_resumes_against_the_same_reference(tiny_model_dir, tmp_path) -> None:
    """The frozen reference is taken from the base weights before a checkpoint restores the policy."""
    method = {"name": "dpo", "adapter": {"name": "full"}}
    straight = train(load_config(dpo_config(tiny_model_dir, tmp_path / "a", method, max_steps=4, eval_every=None)), quiet=True)
    part = dpo_config(tiny_model_dir, tmp_path / "b", method, max_steps=4, eval_every=None, save_every=2)
    train(load_config({**part, "training": {**part["training"], "max_steps": 2}}), quiet=True)
    resumed = train(load_config(part), resume=True, quiet=True)
    train_losses = [[r["train_loss"] for r in metrics(run.run_dir) if "train_loss" in r] for run in (straight, resumed)]
    assert train_losses[1] == pytest.approx(train_losses[0], abs=1e-6) and len(train_losses[0]) == 4
    assert train_losses[0][-1] < train_losses[0][0]


@pytest.mark.parametrize("adapter", [{"name": "lora", "r": 4, "alpha": 8}, {"name": "full"}], ids=["lora", "full"])
def test_reward_model_learns_and_reloads(adapter, tiny_model_dir, tmp_path, monkeypatch) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    kept = keep_final_model(monkeypatch)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", reward_rows())
    cfg = run_config(tiny_model_dir, pairs, tmp_path / "run", data={"validation": str(pairs)},
                     method={"name": "reward", "adapter": adapter},
                     training={"max_steps": 8, "eval_every": 4, "learning_rate": 5e-3})
    result = train(load_config(cfg), quiet=True)
    evals = [r for r in metrics(result.run_dir) if "eval_loss" in r]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.1
    assert evals[0]["eval_reward_accuracy"] <= 0.75 and evals[-1]["eval_reward_accuracy"] == 1.0
    assert evals[-1]["eval_reward_margin"] > evals[0]["eval_reward_margin"]
    assert any(".score." in f".{n}" for n, p in kept["model"].named_parameters() if p.requires_grad)  # the new head trains

    with pytest.raises(TunelabError, match="a reward model scores replies and cannot write them"):
        load_for_inference(result.run_dir)  # what generate, chat, eval and serve call
    reloaded, tokenizer = load_for_inference(result.run_dir, reward_model=True)
    model_dir = result.run_dir / "model"
    if adapter["name"] == "lora":  # plain transformers + PEFT
        base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1,
                                                                  pad_token_id=tokenizer.pad_token_id)
        plain = PeftModel.from_pretrained(base, str(model_dir)).eval()
    else:
        plain = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    data = prepare_data(load_config(result.run_dir / "config.yaml").data, tokenizer, 0)
    batch = collate_pairs(list(data.validation)[:5], tokenizer.pad_token_id)
    trained = kept["model"].eval()
    with torch.no_grad():
        expected = trained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert expected.shape == (10, 1)
        for model in (reloaded, plain):
            assert torch.equal(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, expected)
    stats: dict = {}
    total, n = loop.loss_totals(reloaded, data.validation, 4, tokenizer.pad_token_id, torch.device("cpu"), None,
                                RewardObjective(), stats)
    assert total / n == pytest.approx(evals[-1]["eval_loss"], abs=1e-5)
    assert stats["reward_accuracy"] / n == evals[-1]["eval_reward_accuracy"]


def test_dpo_in_two_processes_reaches_the_one_process_losses(tiny_model_dir, tmp_path) -> None:
    pairs = write_jsonl(tmp_path / "pairs.jsonl", dpo_rows(21))
    cfg = run_config(tiny_model_dir, pairs, tmp_path / "one", data={"validation": 0.2},
                     method={"name": "dpo", "adapter": {"name": "lora", "r": 4, "alpha": 8}},
                     training={"max_steps": None, "epochs": 1, "batch_size": 5, "micro_batch_tokens": 60})
    one = train(load_config(cfg), quiet=True)
    two_cfg = {**cfg, "output": {"dir": str(tmp_path / "two")}}
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(two_cfg))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    proc = subprocess.run([sys.executable, "-m", "tunelab", "train", str(tmp_path / "two.yaml"), "--nproc", "2", "--quiet"],
                          capture_output=True, text=True, timeout=600, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref, got = metrics(one.run_dir), metrics(tmp_path / "two")
    assert [r["step"] for r in got] == [r["step"] for r in ref] and len(ref) == 5  # step 0 eval + 4 steps
    for a, b in zip(ref, got):
        for key in ("train_loss", "eval_loss", "grad_norm", "eval_reward_margin"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-4, (a["step"], key, a[key], b[key])


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "CLICOLOR_FORCE", "PY_COLORS")}
    env.update(HF_HUB_OFFLINE="1", NO_COLOR="1", PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    return subprocess.run([sys.executable, "-m", "tunelab", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


BAD_ROWS = [
    dpo_rows(1)[0],
    {"prompt": "Hi", "chosen": "Hello."},                                    # 2: rejected missing
    {"prompt": "Hi", "chosen": "Same.", "rejected": "Same."},                # 3: chosen == rejected
    {"prompt": "Hi", "chosen": 3, "rejected": "x"},                          # 4: wrong type
    {"prompt": [U("Hi")], "chosen": [U("a")], "rejected": "b"},              # 5: a reply from the user
]


def test_bad_rows_stop_training_with_one_line_and_data_check_lists_them_all(tiny_model_dir, tmp_path) -> None:
    write_jsonl(tmp_path / "pairs.jsonl", BAD_ROWS)
    cfg = run_config(tiny_model_dir, Path("pairs.jsonl"), tmp_path / "out", method={"name": "dpo"})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    proc = _cli(tmp_path, "train", "run.yaml")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: pairs.jsonl:2: rejected: missing field (format 'preference' needs prompt, chosen, rejected)")
    assert "3 more problems" in lines[0]
    assert not (tmp_path / "out").exists()

    proc = _cli(tmp_path, "data", "check", "pairs.jsonl", "--model", "none")
    assert proc.returncode == 2
    for fragment in ("pairs.jsonl:2: rejected: missing field", "pairs.jsonl:3: rejected: the same text as chosen",
                     "pairs.jsonl:4: chosen: expected a string", "pairs.jsonl:5: chosen[0].role: a reply must be an assistant"):
        assert fragment in proc.stdout, proc.stdout
    assert "pairs.jsonl:1:" not in proc.stdout


def test_dpo_with_packing_is_a_config_error(tiny_model_dir, tmp_path) -> None:
    write_jsonl(tmp_path / "pairs.jsonl", dpo_rows(4))
    cfg = run_config(tiny_model_dir, Path("pairs.jsonl"), tmp_path / "out", method={"name": "dpo"}, data={"packing": True})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    proc = _cli(tmp_path, "train", "run.yaml")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: run.yaml:")
    assert "data.packing: dpo cannot train on packed rows (a preference pair is two whole conversations); " \
           "set data.packing: false" in proc.stderr


@pytest.mark.parametrize("method, data, fragments", [
    ({"name": "reward"}, {"packing": True, "format": "preference"}, ["data.packing: reward cannot train on packed rows"]),
    ({"name": "lora", "r": 4}, {"format": "preference"}, ["data.format: preference rows train with method dpo or reward"]),
    ({"name": "dpo"}, {"format": "alpaca"}, ["data.format: dpo trains on preference pairs, not 'alpaca' rows"]),
    ({"name": "dpo"}, {"train_on_inputs": True}, ["data.train_on_inputs: dpo compares only the chosen and rejected"]),
    ({"name": "dpo", "loss_type": "ipo", "label_smoothing": 0.1}, {}, ["label_smoothing applies to loss_type: sigmoid only"]),
    ({"name": "dpo", "adapter": {"name": "lorra"}}, {}, ["method.adapter.name: unknown method 'lorra'; did you mean 'lora'?"]),
    ({"name": "dpo", "adapter": {"name": "reward"}}, {}, ["method.adapter.name: unknown method 'reward'"]),
    ({"name": "dpo", "adapter": {"r": 4, "alpah": 8}}, {}, ["method.adapter.alpah: unknown key; did you mean 'alpha'?"]),
    ({"name": "dpo", "bta": 0.2}, {}, ["method.bta: unknown key; did you mean 'beta'?"]),
])
def test_preference_config_mistakes(method, data, fragments, tiny_model_dir, tmp_path) -> None:
    pairs = write_jsonl(tmp_path / "pairs.jsonl", dpo_rows(4))
    msg = user_error(train_cli(tmp_path, run_config(tiny_model_dir, pairs, tmp_path / "out", method=method, data=data)), *fragments)
    assert msg.startswith(f"{tmp_path / 'run.yaml'}:")


@pytest.mark.parametrize("method, rows, fragment", [
    ({"name": "dpo"}, [{"instruction": "i", "output": "o"}] * 2, "data.train: dpo trains on preference pairs, not 'alpaca' rows"),
    ({"name": "lora", "r": 4}, dpo_rows(2), "data.train: preference rows train with method dpo or reward, not lora"),
])
def test_detected_format_must_suit_the_method(method, rows, fragment, tiny_model_dir, tmp_path) -> None:
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    user_error(train_cli(tmp_path, run_config(tiny_model_dir, data, tmp_path / "out", method=method)), fragment)
    assert not (tmp_path / "out").exists()
