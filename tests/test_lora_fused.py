"""The fused LoRA layer (train/lora_fused.py) computes what PEFT's LoRA Linear computes: outputs and the gradients of the
input and both adapter matrices, in fp32 and under bf16 autocast (with the shared input casts and bf16 frozen weights the
training loop uses), with and without a base bias; and every case it does not cover goes to PEFT's own forward."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_tiny_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from tunelab.config import DoraMethod, LoraMethod
from tunelab.methods import attach_method
from tunelab.train import lora_fused
from tunelab.train.lora_fused import restore_lora, use_fused_lora
from tunelab.train.precision import share_input_casts, store_frozen_in


def _lora_model(dropout: float = 0.0, dora: bool = False):
    model = build_tiny_model(97, seed=3)
    torch.manual_seed(4)
    method = DoraMethod(name="dora", r=4, alpha=8) if dora else LoraMethod(name="lora", r=4, alpha=8, dropout=dropout)
    model = attach_method(model, method)
    with torch.no_grad():  # B starts at zero; give it values so that every gradient path carries something
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


def _batch():
    torch.manual_seed(5)
    ids = torch.randint(3, 97, (3, 13))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _loss_and_grads(model, dtype=None):
    model.zero_grad()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        loss = model(**_batch()).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _counting(monkeypatch) -> list[int]:
    calls: list[int] = []
    apply = lora_fused._LoraLinear.apply
    monkeypatch.setattr(lora_fused._LoraLinear, "apply", lambda *a: calls.append(1) or apply(*a))
    return calls


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_fused_layers_give_peft_losses_and_gradients(dtype, monkeypatch):
    model = _lora_model()
    if dtype is not None:  # as train() prepares a model for bf16 autocast
        store_frozen_in(model, dtype)
        share_input_casts(model, dtype)
    ref_loss, ref_grads = _loss_and_grads(model, dtype)
    calls = _counting(monkeypatch)
    switched = use_fused_lora(model)
    assert len(switched) == 2 * 7  # every linear layer of both blocks
    loss, grads = _loss_and_grads(model, dtype)
    assert len(calls) == 14
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype is None else {"rtol": 0.02, "atol": 2e-3}
    torch.testing.assert_close(loss, ref_loss, **tol)
    assert grads.keys() == ref_grads.keys() and len(grads) == 28
    for name, grad in grads.items():
        assert grad.dtype == torch.float32  # the adapters' own dtype
        torch.testing.assert_close(grad, ref_grads[name], **tol)
    restore_lora(switched)
    assert all(type(m) is PeftLoraLinear for m in switched)


def test_a_base_bias_is_added():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(8, 6))
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(layer, LoraConfig(r=2, lora_alpha=4, target_modules=["0"]))
    with torch.no_grad():
        model.base_model.model[0].lora_B.default.weight.normal_()
    x = torch.randn(5, 8, requires_grad=True)
    ref = model(x)
    ref.sum().backward()
    ref_grad = x.grad.clone()
    x.grad = None
    use_fused_lora(model)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, ref_grad)


def test_cases_it_does_not_cover_run_peft(monkeypatch):
    calls = _counting(monkeypatch)
    model = _lora_model(dropout=0.1)
    use_fused_lora(model)
    model.train()
    model(**_batch()).loss.backward()
    assert calls == []  # dropout while training: PEFT's forward draws its masks
    model.eval()
    with torch.no_grad():
        with_adapter = model(**_batch()).loss
    assert len(calls) == 14  # evaluation: dropout is off, so fused
    calls.clear()
    with torch.no_grad(), model.disable_adapter():
        without = model(**_batch()).loss
    assert calls == [] and not torch.equal(with_adapter, without)

    dora = _lora_model(dora=True)
    with torch.no_grad():
        ref = dora(**_batch()).loss
        use_fused_lora(dora)
        assert torch.equal(dora(**_batch()).loss, ref) and calls == []  # DoRA's magnitudes: PEFT's forward


def test_a_switched_model_copies_and_saves_like_peft(tmp_path):
    model = _lora_model()
    before = model.state_dict()
    use_fused_lora(model)
    assert list(model.state_dict()) == list(before)
    twin = copy.deepcopy(model)  # DPO's reference model and early stopping copy models
    torch.testing.assert_close(twin(**_batch()).loss, model(**_batch()).loss)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
