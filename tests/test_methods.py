"""The PEFT-family methods and QLoRA on a tiny in-process Llama: each trains through the loop, changes only its own
parameters, and reloads through `load_for_inference` to the same logits; every bad input is one line and exit 2.

    OMP_NUM_THREADS=1 python -m pytest -x -q tests/test_methods.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import alpaca_rows, build_tiny_tokenizer, run_config, write_jsonl
from test_cli_errors import train_cli, user_error

from tunelab import load_config, train
from tunelab.config import METHOD_NAMES
from tunelab.data.dataset import collate
from tunelab.errors import TunelabError
from tunelab.generate import generate, load_for_inference
from tunelab.train import loop
from tunelab.train.loss import causal_lm_loss
from tunelab.train.precision import cpu_supports_bf16

# name -> (method section, fragments of the parameter names the method trains), as in peft's TEST_CASES.
CASES = {
    "rslora": ({"name": "rslora", "r": 4, "alpha": 8}, ("lora_A", "lora_B")),
    "dora": ({"name": "dora", "r": 4, "alpha": 8}, ("lora_A", "lora_B", "lora_magnitude_vector")),
    "ia3": ({"name": "ia3"}, ("ia3_l",)),
    "loha": ({"name": "loha", "r": 4, "alpha": 8}, ("hada_",)),
    "lokr": ({"name": "lokr", "r": 4, "alpha": 8}, ("lokr_",)),
    "prefix_tuning": ({"name": "prefix_tuning", "num_virtual_tokens": 4}, ("prompt_encoder",)),
    "prompt_tuning": ({"name": "prompt_tuning", "num_virtual_tokens": 4}, ("prompt_encoder",)),
    "prompt_tuning_text_init": ({"name": "prompt_tuning", "num_virtual_tokens": 4, "init_text": "Say something"},
                                ("prompt_encoder",)),
    "qlora": ({"name": "qlora", "r": 4, "alpha": 8}, ("lora_A", "lora_B")),
    "qlora_adamw_8bit": ({"name": "qlora", "r": 4, "alpha": 8, "optim": "adamw_8bit"}, ("lora_A", "lora_B")),
}


@pytest.fixture()
def train_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", alpaca_rows(12))


class Recorder:
    """Wraps the loop's attach_method and save_model: a copy of every tensor right after attach, and the final model."""

    def __init__(self, monkeypatch) -> None:
        self.before: dict[str, torch.Tensor] = {}
        self.model = None
        attach, save = loop.attach_method, loop.save_model

        def attach_and_copy(model, *args):  # (model, method config[, task])
            model = attach(model, *args)
            self.before = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
            return model

        def save_and_keep(model, tokenizer, out):
            self.model = model
            save(model, tokenizer, out)

        monkeypatch.setattr(loop, "attach_method", attach_and_copy)
        monkeypatch.setattr(loop, "save_model", save_and_keep)


def train_method(model_dir: Path, train_file: Path, out: Path, method: dict, monkeypatch, **training):
    recorder = Recorder(monkeypatch)
    cfg = run_config(model_dir, train_file, out, method=method, data={"validation": 0.25},
                     training={"max_steps": 3, "eval_every": 3, **training})
    result = train(load_config(cfg), quiet=True)
    return result, recorder


def fixed_input(tokenizer) -> dict:
    return tokenizer(["The quick brown fox jumps over", "Hello! How can I"], return_tensors="pt", padding=True)


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_method_trains_only_its_parameters_and_reloads_identically(case, tiny_model_dir, train_file, tmp_path, monkeypatch):
    method, trained = CASES[case]
    result, recorder = train_method(tiny_model_dir, train_file, tmp_path / "run", method, monkeypatch)
    model = recorder.model
    losses = [r["train_loss"] for r in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines())
              if "train_loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert math.isfinite(result.summary["final_eval_loss"])

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(any(f in n for f in trained) for n in trainable), sorted(trainable)[:5]
    after = dict([*model.named_parameters(), *model.named_buffers()])
    assert after.keys() == recorder.before.keys()
    changed = {n for n, t in after.items() if not torch.equal(t, recorder.before[n])}
    assert changed and changed <= trainable, sorted(changed - trainable)[:5]  # base weights untouched
    if method["name"] == "qlora":
        q_proj = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
        assert type(q_proj).__name__ == "Linear4bit" and q_proj.weight.dtype == torch.uint8

    reloaded, tokenizer = load_for_inference(result.run_dir)
    assert type(reloaded).__name__ == type(model).__name__
    batch = fixed_input(tokenizer)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
        got = reloaded(**batch).logits
    assert torch.equal(got, expected), (got - expected).abs().max()
    replies = generate(reloaded, tokenizer, ["Say something about the fox."], max_new_tokens=3)
    assert len(replies) == 1 and isinstance(replies[0], str)


@pytest.mark.parametrize("method", [{"name": "qlora", "r": 4, "optim": "adamw_8bit"}, {"name": "prompt_tuning", "num_virtual_tokens": 4}],
                         ids=["qlora_adamw_8bit", "prompt_tuning"])
def test_resumed_run_repeats_the_straight_run(method, tiny_model_dir, train_file, tmp_path):
    def losses(run: Path) -> list[float]:
        return [r["train_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "train_loss" in r]

    common = {"method": method, "training": {"max_steps": 4, "save_every": 2}}
    straight = train(load_config(run_config(tiny_model_dir, train_file, tmp_path / "straight", **common)), quiet=True)
    part = run_config(tiny_model_dir, train_file, tmp_path / "part", **common)
    train(load_config({**part, "training": {**part["training"], "max_steps": 2}}), quiet=True)
    resumed = train(load_config(part), resume=True, quiet=True)
    assert losses(resumed.run_dir) == losses(straight.run_dir)


def test_qlora_8bit_optimizer_is_used(tiny_model_dir, train_file, tmp_path, monkeypatch):
    import bitsandbytes as bnb

    used = []
    build = loop._optimizer
    monkeypatch.setattr(loop, "_optimizer", lambda *a, **k: used.append(build(*a, **k)) or used[-1])
    train_method(tiny_model_dir, train_file, tmp_path / "run", {"name": "qlora", "r": 4, "optim": "adamw_8bit"}, monkeypatch,
                 max_steps=1)
    assert isinstance(used[0], bnb.optim.AdamW8bit)


@pytest.mark.parametrize("name", ["prefix_tuning", "prompt_tuning"])
def test_virtual_token_loss_equals_the_models_own_loss(name, tiny_model_dir, tiny_tokenizer):
    """causal_lm_loss runs the PEFT model's own forward for prefix/prompt tuning: the same loss as transformers'."""
    from tunelab.config import METHOD_SECTIONS
    from tunelab.data.tokenize import Encoded
    from tunelab.methods import attach_method
    from tunelab.models.loading import load_model, resolve_model

    torch.manual_seed(0)
    model = attach_method(load_model(resolve_model(str(tiny_model_dir))), METHOD_SECTIONS[name](name=name, num_virtual_tokens=3))
    rows = [tiny_tokenizer("Say something about the fox. The fox is number 1.")["input_ids"],
            tiny_tokenizer("Hello! How can I help you today?")["input_ids"]]
    examples = [Encoded(input_ids=r, labels=[-100] * 4 + r[4:], source="test") for r in rows]
    batch = collate(examples, tiny_tokenizer.pad_token_id)
    loss, n = causal_lm_loss(model, batch)
    reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(loss / n, reference, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert model.prompt_encoder["default"].embedding.weight.grad.abs().sum() > 0


def test_qlora_gradients_do_not_change_after_an_evaluation(tiny_model_dir):
    """bitsandbytes repacks 4-bit weights for inference on its first no-grad eval pass on AVX512-BF16 CPUs, and that
    layout has no backward; load_model prevents it, so gradients after the loop's first eval are the same as before."""
    from tunelab.config import QLoraMethod
    from tunelab.methods import attach_method, method_load_kwargs
    from tunelab.models.loading import load_model, resolve_model

    source = resolve_model(str(tiny_model_dir))
    cfg = QLoraMethod(name="qlora", r=4, alpha=8, compute_dtype="fp32")
    torch.manual_seed(0)
    model = attach_method(load_model(source, **method_load_kwargs(cfg, source, torch.device("cpu"))), cfg)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(3, 300, (2, 10))

    def lora_grads():
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = lora_grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    after = lora_grads()
    for name in before:
        torch.testing.assert_close(after[name], before[name], msg=name)


@pytest.mark.skipif(not cpu_supports_bf16(), reason="needs a CPU with native bf16")
@pytest.mark.parametrize("name", [n for n in CASES if n in METHOD_NAMES])
def test_bf16_run_trains_every_method(name, tiny_model_dir, train_file, tmp_path, monkeypatch):
    """bf16 autocast with frozen weights stored in bf16 and shared input casts (4-bit layers are left as they are)."""
    result, recorder = train_method(tiny_model_dir, train_file, tmp_path / "run", CASES[name][0], monkeypatch,
                                    precision="bf16", max_steps=2)
    assert result.summary["precision"] == "bf16" and math.isfinite(result.summary["final_train_loss"])
    assert all(p.dtype == torch.float32 for p in recorder.model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, before the model loads where possible


@pytest.fixture(scope="module")
def tiny_mamba_dir(tmp_path_factory) -> Path:
    """A model PEFT cannot prefix- or prompt-tune (its config has no attention heads)."""
    from transformers import MambaConfig, MambaForCausalLM

    out = tmp_path_factory.mktemp("tiny-mamba")
    tokenizer = build_tiny_tokenizer()
    MambaForCausalLM(MambaConfig(vocab_size=len(tokenizer), hidden_size=16, state_size=4, num_hidden_layers=1)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("name", ["prefix_tuning", "prompt_tuning"])
def test_virtual_tokens_on_an_architecture_peft_rejects(name, tiny_mamba_dir, train_file, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the method was checked")

    monkeypatch.setattr(loop, "load_model", no_loading)
    cfg = run_config(tiny_mamba_dir, train_file, tmp_path / "out", method={"name": name})
    user_error(train_cli(tmp_path, cfg), f"method.name: {name} does not work with mamba models",
               "num_attention_heads", "use lora, ia3, loha or lokr")
    assert not (tmp_path / "out").exists()


def test_qlora_without_bitsandbytes(tiny_model_dir, train_file, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    cfg = run_config(tiny_model_dir, train_file, tmp_path / "out", method={"name": "qlora"})
    user_error(train_cli(tmp_path, cfg), "method.name: qlora needs bitsandbytes", "pip install bitsandbytes")
    assert not (tmp_path / "out").exists()


def test_qlora_without_4bit_support(tiny_model_dir, train_file, tmp_path, monkeypatch):
    import bitsandbytes.functional as bnbf

    def unsupported(*args, **kwargs):
        raise NotImplementedError("no kernel")

    monkeypatch.setattr(bnbf, "quantize_4bit", unsupported)
    cfg = run_config(tiny_model_dir, train_file, tmp_path / "out", method={"name": "qlora"})
    user_error(train_cli(tmp_path, cfg), "method.name: qlora: this bitsandbytes has no 4-bit support on cpu",
               "pip install -U bitsandbytes")


@pytest.mark.parametrize(("method", "fragments"), [
    ({"name": "rslora", "r": 0}, ["method.r: Input should be greater than or equal to 1 (got 0)"]),
    ({"name": "dora", "dropout": 1.0}, ["method.dropout: Input should be less than 1"]),
    ({"name": "qlora", "r": 0}, ["method.r: Input should be greater than or equal to 1"]),
    ({"name": "qlora", "compute_dtype": "fp16"}, ["method.compute_dtype: Input should be 'auto', 'bf16' or 'fp32'"]),
    ({"name": "qlora", "optim": "sgd"}, ["method.optim: Input should be 'adamw', 'adamw_8bit' or 'paged_adamw_8bit'"]),
    ({"name": "loha", "r": 0}, ["method.r: Input should be greater than or equal to 1"]),
    ({"name": "lokr", "alpha": 0}, ["method.alpha: Input should be greater than 0"]),
    ({"name": "prefix_tuning", "num_virtual_tokens": 0}, ["method.num_virtual_tokens: Input should be greater than or equal to 1"]),
    ({"name": "prompt_tuning", "num_virtual_token": 8}, ["method.num_virtual_token: unknown key; did you mean 'num_virtual_tokens'?"]),
    ({"name": "lokr", "decompose_bot": True}, ["method.decompose_bot: unknown key; did you mean 'decompose_both'?"]),
    ({"name": "ia3", "r": 4}, ["method.r: unknown key"]),
    ({"name": "dorra"}, ["method.name: unknown method 'dorra'; did you mean 'dora'?"]),
])
def test_bad_method_settings_are_config_errors(method, fragments, tiny_model_dir, train_file, tmp_path):
    msg = user_error(train_cli(tmp_path, run_config(tiny_model_dir, train_file, tmp_path / "out", method=method)), *fragments)
    assert msg.startswith(str(tmp_path / "run.yaml") + ":")


@pytest.mark.parametrize(("name", "section", "key", "value"), [
    ("prompt_tuning", "data", "packing", True),
    ("prefix_tuning", "data", "packing", True),
    ("prefix_tuning", "training", "gradient_checkpointing", True),
])
def test_settings_a_method_cannot_train_with(name, section, key, value, tiny_model_dir, train_file, tmp_path):
    cfg = run_config(tiny_model_dir, train_file, tmp_path / "out", method={"name": name}, **{section: {key: value}})
    msg = user_error(train_cli(tmp_path, cfg), f"{section}.{key}: {name} ")
    assert msg.startswith(f"{tmp_path / 'run.yaml'}:")
    assert "override" in user_error(train_cli(tmp_path, run_config(tiny_model_dir, train_file, tmp_path / "out",
                                                                   method={"name": name}), f"{section}.{key}={value}"))


def test_prefix_tuning_never_turns_on_gradient_checkpointing(tiny_model_dir, train_file, tmp_path, monkeypatch):
    from tunelab.train import memory

    monkeypatch.setattr(memory, "available_memory", lambda device: 1)  # auto would turn it on
    result, _ = train_method(tiny_model_dir, train_file, tmp_path / "run", {"name": "prefix_tuning"}, monkeypatch, max_steps=1)
    assert result.summary["gradient_checkpointing"] is False


@pytest.mark.parametrize(("method", "fragments"), [
    ({"name": "loha", "target_modules": ["nope_proj"]}, ["method.target_modules: ", "q_proj"]),
    ({"name": "ia3", "target_modules": ["k_proj", "v_proj"], "feedforward_modules": ["down_proj"]},
     ["method.feedforward_modules: "]),
])
def test_peft_rejections_name_the_field(method, fragments, tiny_model_dir, train_file, tmp_path):
    user_error(train_cli(tmp_path, run_config(tiny_model_dir, train_file, tmp_path / "out", method=method)), *fragments)


def test_every_method_has_an_example_config():
    configs = Path(__file__).resolve().parents[1] / "configs"
    shipped = {load_config(p).method.name for p in configs.glob("*.yaml") if "method" in (p.read_text())}
    assert set(METHOD_NAMES) - {"full", "freeze"} <= shipped


def test_unknown_method_lists_every_method():
    with pytest.raises(TunelabError, match="choose one of: full, freeze, lora, rslora, dora, qlora, ia3, loha, lokr, "
                                           "prefix_tuning, prompt_tuning"):
        load_config({"data": {"train": "a.jsonl"}, "method": {"name": "zzzzzzzz"}})


def test_loglik_scoring_of_a_prompt_tuning_run_is_refused_not_wrong(tiny_model_dir, train_file, tmp_path, monkeypatch):
    from tunelab.errors import TunelabError
    from tunelab.evaluate.loglik import MCItem, score_items

    result, _ = train_method(tiny_model_dir, train_file, tmp_path / "run", {"name": "prompt_tuning", "num_virtual_tokens": 4},
                             monkeypatch)
    model, tokenizer = load_for_inference(result.run_dir)
    with pytest.raises(TunelabError, match="prefix/prompt-tuning run is not supported"):
        score_items(model, tokenizer, [MCItem("The fox", [" jumps", " sleeps"], 0)])
