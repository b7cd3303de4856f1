"""Bottleneck adapters (Houlsby et al., 2019): a small residual MLP after each block's attention and MLP outputs.

    method: {name: adapter, reduction_factor: 16, non_linearity: gelu, placement: [attention, mlp]}

Each adapter computes h + up(act(down(h))) with down: hidden -> hidden / reduction_factor and up back to hidden. `up`
starts at zero, so the model starts out computing exactly what the base model computes. The adapters are submodules of
their block (`adapter_attention`, `adapter_mlp`) and run as forward hooks on the attention output projection
(`self_attn.o_proj` in Llama) and on the MLP; the base weights stay frozen.

The AdapterHub `adapters` library implements these too, but its 1.3.0 pins transformers ~=4.57.6 (tunelab runs on
transformers 5), hence this module. `BottleneckModel.save_pretrained` writes only the adapters
(`bottleneck_adapter.safetensors`) and `bottleneck_adapter.json` (their settings and the base model's path);
`from_pretrained(base, dir)` attaches them again, which `tunelab generate`/`eval`/`export` do through
`load_for_inference`. The activation between the projections makes an adapter non-linear, so it cannot be folded
into the base weights: `merge_and_unload` (export targets that need a merged model) refuses with one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from tunelab.errors import TunelabError

CONFIG_NAME = "bottleneck_adapter.json"
WEIGHTS_NAME = "bottleneck_adapter.safetensors"
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}
# where the two placements hook in, by the names transformers' architectures use
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
OUTPUT_PROJECTION_NAMES = ("o_proj", "out_proj", "c_proj", "dense", "wo")
MLP_NAMES = ("mlp", "feed_forward", "ffn")
MERGE_REFUSED = ("bottleneck adapters (method: adapter) are non-linear and cannot be merged into the base weights, which "
                 "every export target starts from; use the run directly (tunelab generate/eval/serve), or train lora to export")


class Bottleneck(nn.Module):
    """down -> activation -> up, `up` zero-initialised: adds nothing until it has trained."""

    def __init__(self, hidden: int, width: int, non_linearity: str) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, width)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(width, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(h)))


class _AddResidual:
    """Forward hook: output + adapter(output). An object rather than a closure, so that `copy.deepcopy` of the model
    (DPO's frozen reference) hooks the copy's adapter, not the original's."""

    def __init__(self, adapter: Bottleneck) -> None:
        self.adapter = adapter

    def __call__(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        return output + self.adapter(output)


class BottleneckModel(nn.Module):
    """The base model with adapters attached; anything it does not define is the base model's (config, generate...)."""

    def __init__(self, base: nn.Module, settings: dict) -> None:
        super().__init__()
        self.base_model = base
        self.settings = settings

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu").contiguous() for n, p in self.base_model.named_parameters() if ".adapter_" in n}

    def save_pretrained(self, out: str | Path, **_) -> None:
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_file(self.adapter_state(), out / WEIGHTS_NAME)
        (out / CONFIG_NAME).write_text(json.dumps(self.settings, indent=1))

    def merge_and_unload(self):
        raise TunelabError(MERGE_REFUSED)


def attach(model: nn.Module, cfg) -> BottleneckModel:
    """Freeze `model` and add adapters per `cfg` (reduction_factor, non_linearity, placement).

    Raises:
        TunelabError: the model's blocks have no attention output projection or MLP under a known name.
    """
    settings = {"reduction_factor": cfg.reduction_factor, "non_linearity": cfg.non_linearity,
                "placement": list(cfg.placement), "base_model_name_or_path": getattr(model, "name_or_path", None)}
    for p in model.parameters():
        p.requires_grad_(False)
    add_adapters(model, settings)
    return BottleneckModel(model, settings)


def add_adapters(model: nn.Module, settings: dict) -> None:
    from tunelab.methods.freeze import transformer_blocks

    hidden = model.config.hidden_size
    width = max(1, hidden // settings["reduction_factor"])
    _, blocks = transformer_blocks(model)
    for block in blocks:
        for placement in settings["placement"]:
            target = _hook_target(block, placement)
            adapter = Bottleneck(hidden, width, settings["non_linearity"]).to(_dtype_of(target))
            block.add_module(f"adapter_{placement}", adapter)
            target.register_forward_hook(_AddResidual(adapter))


def from_pretrained(base: nn.Module, model_dir: str | Path) -> BottleneckModel:
    """Attach the adapters saved in `model_dir` to `base` (the model they were trained on)."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    settings = json.loads((model_dir / CONFIG_NAME).read_text())
    for p in base.parameters():
        p.requires_grad_(False)
    add_adapters(base, settings)
    state = load_file(model_dir / WEIGHTS_NAME)
    missing, unexpected = base.load_state_dict(state, strict=False)
    missing = [n for n in missing if ".adapter_" in n]
    if missing or unexpected:
        raise TunelabError(f"{model_dir}: the saved adapters do not fit this base model ({(missing or unexpected)[0]}); "
                           "load the base model the run was trained on")
    return BottleneckModel(base, settings)


def _hook_target(block: nn.Module, placement: str) -> nn.Module:
    children = dict(block.named_children())
    if placement == "mlp":
        found = next((children[n] for n in MLP_NAMES if n in children), None)
    else:
        attention = next((children[n] for n in ATTENTION_NAMES if n in children), None)
        inner = dict(attention.named_children()) if attention is not None else {}
        found = next((inner[n] for n in OUTPUT_PROJECTION_NAMES if n in inner), None)
    if found is None:
        raise TunelabError(f"method.placement: no {placement} output found in this model's blocks (children: "
                           f"{', '.join(children)}); use method: lora")
    return found


def _dtype_of(module: nn.Module) -> torch.dtype:
    floating = [p.dtype for p in module.parameters() if p.is_floating_point()]
    return floating[0] if floating else torch.float32
