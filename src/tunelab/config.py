"""The typed run config: one YAML file describes a run.

    model: default
    data: {train: data/train.jsonl, validation: 0.1, format: alpaca, max_length: 512}
    method: {name: lora, r: 16, alpha: 32}
    training: {epochs: 3, batch_size: 8, learning_rate: 2.0e-4}
    output: {dir: runs/my-run}

`load_config(path, overrides)` reads the YAML, applies `key.sub=value` overrides and validates. Every mistake becomes
one `TunelabError` line that names the file, the line and the key, and for unknown keys suggests the closest valid one.
Each field's help is written once here; `tunelab config --help-fields` and the docs read it.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from tunelab.errors import TunelabError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


PII_TYPE_NAMES = ("email", "phone", "credit_card", "ip", "iban", "url_credentials", "person")


class CleanConfig(Section):
    unicode: Literal["NFC", "NFKC"] | None = Field(default="NFC", description="Unicode normalization form (null: none).")
    control_chars: bool = Field(default=True, description="Drop control and zero-width characters (keeps newlines and tabs).")
    whitespace: bool = Field(default=True, description="Normalize line endings and odd spaces, strip trailing spaces and ends.")
    html: bool = Field(default=True, description="Unescape HTML entities and drop formatting tags (<br>, <p>, <b>, ...).")


class DedupeConfig(Section):
    exact: bool = Field(default=True, description="Drop rows identical to an earlier one after normalization.")
    near: bool = Field(default=False, description="Drop near-duplicates (MinHash/LSH on character shingles).")
    threshold: float = Field(default=0.85, gt=0, le=1, description="Jaccard similarity at which two rows are near-duplicates.")


class PiiConfig(Section):
    types: list[Literal[PII_TYPE_NAMES]] = Field(  # type: ignore[valid-type]
        default=["email", "phone", "credit_card", "ip", "iban", "url_credentials"],
        description="PII kinds replaced by typed placeholders such as <EMAIL>; 'person' needs presidio.",
    )
    region: str = Field(default="US", description="Region for phone numbers written without a country code (e.g. US, GB, DE).")


class SplitConfig(Section):
    train: float = Field(default=0.70, ge=0, le=1)
    validation: float = Field(default=0.15, ge=0, le=1)
    test: float = Field(default=0.15, ge=0, le=1)
    seed: int | None = Field(default=None, description="Split seed (default: training.seed).")
    stratify: str | None = Field(default=None, description="Row field whose values keep their proportions in every split.")
    group: str | None = Field(default=None, description="Row field; rows with the same value stay in the same split.")

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        if abs(self.train + self.validation + self.test - 1.0) > 1e-6:
            raise ValueError(f"train + validation + test must add up to 1 (got {self.train + self.validation + self.test:g})")
        if self.train <= 0:
            raise ValueError("the train fraction must be above 0")
        if self.stratify and self.group:
            raise ValueError("choose stratify or group, not both")
        return self


class AugmentConfig(Section):
    eda: int = Field(default=0, ge=0, description="EDA variants (swap, delete, insert, synonyms) added per training row.")
    paraphrase: int = Field(default=0, ge=0, description="Paraphrases of each training prompt written by the base model.")
    alpha: float = Field(default=0.1, gt=0, le=0.5, description="Share of words an EDA operation touches.")
    temperature: float = Field(default=0.7, ge=0, description="Sampling temperature for paraphrases.")
    model: str | None = Field(
        default=None, description="Model that writes paraphrases (default: the run's base model); any model spec."
    )
    seed: int | None = Field(default=None, description="Augmentation seed (default: training.seed).")


def _section_flag(value: Any) -> Any:
    """`true` turns a pipeline step on with its defaults, `false`/null turns it off."""
    if value is True:
        return {}
    if value is False:
        return None
    return value


class TaskConfig(Section):
    """One dataset of a multi-task run (`data.tasks`); every other `data:` setting applies to it too."""

    name: str = Field(min_length=1, description="Task name; its eval loss is logged as eval_loss/<name>.")
    train: str | list[str] = Field(description="The task's training file(s): a path, a glob, or a list of them.")
    validation: str | list[str] | float | None = Field(
        default=None, description="The task's validation file(s), or a fraction of its train held out (e.g. 0.1)."
    )
    format: Literal["alpaca", "prompt_response", "messages", "text", "preference", "classification"] | None = Field(
        default=None, description="The task's row layout (default: data.format, else detected from its first row)."
    )
    weight: float | None = Field(
        default=None, gt=0, description="Mixing weight (data.mixing: weights): the task's share is weight / sum of weights."
    )

    @field_validator("validation")
    @classmethod
    def _fraction_range(cls, v: Any) -> Any:
        if isinstance(v, float) and not 0.0 < v < 1.0:
            raise ValueError("a validation fraction must be between 0 and 1 (e.g. 0.1), or give a file path")
        return v


class DataConfig(Section):
    train: str | list[str] | None = Field(
        description="Training file(s): a path, a glob, or a list of them (JSON, JSONL, CSV); null with data.tasks."
    )
    validation: str | list[str] | float | None = Field(
        default=None, description="Validation file(s), or a fraction of train held out with the seed (e.g. 0.1)."
    )
    format: Literal["alpaca", "prompt_response", "messages", "text", "preference", "classification"] | None = Field(
        default=None, description="Row layout; detected from the first row's keys when omitted (task: classification "
        "implies classification: rows with text and label)."
    )
    max_length: int = Field(default=512, ge=8, description="Maximum tokens per example; longer responses are cut.")
    train_on_inputs: bool = Field(default=False, description="Also train on prompt/user tokens, not only on the assistant's.")
    packing: bool = Field(
        default=False,
        description="Pack several training examples into each max_length sequence; attention stays inside each example.",
    )
    system_prompt: str | None = Field(default=None, description="System message added to every conversation that has none.")
    test: str | list[str] | None = Field(default=None, description="Test file(s): never trained on; checked for leakage.")
    on_invalid: Literal["error", "skip"] = Field(
        default="error", description="error: stop at invalid rows; skip: leave them out and list them in the run directory."
    )
    clean: CleanConfig | None = Field(default=None, description="Clean text fields (true for the defaults).")
    pii: PiiConfig | None = Field(default=None, description="Replace PII with typed placeholders (true, or a list of types).")
    dedupe: DedupeConfig | None = Field(default=None, description="Remove exact / near-duplicate rows, also across splits.")
    split: SplitConfig | None = Field(default=None, description="Split data.train into train/validation/test (0.70/0.15/0.15).")
    augment: AugmentConfig | None = Field(default=None, description="Add augmented copies of training rows.")
    cache: bool = Field(default=True, description="Reuse prepared and tokenized data when inputs and settings are unchanged.")
    tasks: list[TaskConfig] | None = Field(
        default=None,
        description="Multi-task: several datasets in one run instead of train/validation, each {name, train, validation, "
        "format, weight}; batches sample tasks by data.mixing and eval logs eval_loss/<name> per task.",
    )
    mixing: Literal["proportional", "weights", "temperature"] | None = Field(
        default=None,
        description="How batches sample data.tasks: proportional (to each task's size), weights (the tasks' weight) or "
        "temperature (size^(1/T)); default: weights when a task has a weight, else proportional.",
    )
    temperature: float | None = Field(
        default=None, gt=0, description="T of data.mixing: temperature (default 2; 1 = proportional, large = uniform)."
    )

    @model_validator(mode="before")
    @classmethod
    def _tasks_stand_for_train(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("tasks") is not None and "train" not in values:
            values = {**values, "train": None}  # data.tasks replaces train; without either, `train` stays required
        return values

    @field_validator("tasks")
    @classmethod
    def _one_way_to_give_data(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None:
            return v
        if not v:
            raise ValueError("an empty list; list at least one task ({name, train}) or use data.train")
        if info.data.get("train") is not None:
            raise ValueError("data.train and data.tasks are both set; move data.train into a task or remove data.tasks")
        for key in ("validation", "test", "split"):
            if info.data.get(key) is not None:
                raise ValueError(f"data.{key} does not combine with data.tasks; give each task its own validation "
                                 f"(a file or a fraction) and remove data.{key}")
        names = [t.name for t in v]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"duplicate task name '{twice[0]}'; give every task its own name")
        return v

    @model_validator(mode="after")
    def _some_training_data(self) -> DataConfig:
        if self.train is None and not self.tasks:
            raise ValueError("no training data; set data.train (file(s)) or data.tasks (a list of tasks)")
        return self

    @field_validator("mixing")
    @classmethod
    def _mixing_needs_tasks(cls, v: Any, info: ValidationInfo) -> Any:
        tasks = info.data.get("tasks")
        if v is not None and not tasks:
            raise ValueError("mixing applies to data.tasks; remove it or list the tasks")
        if tasks and v in ("proportional", "temperature") and any(t.weight is not None for t in tasks):
            raise ValueError(f"task weights apply to mixing: weights, not {v}; remove the weights or set mixing: weights")
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature_needs_mixing(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None and info.data.get("mixing") != "temperature":
            raise ValueError("temperature applies to data.mixing: temperature; set that or remove temperature")
        return v

    @property
    def mixing_rule(self) -> str:
        """The mixing in effect: data.mixing, else weights when a task has a weight, else proportional."""
        if self.mixing:
            return self.mixing
        return "weights" if any(t.weight is not None for t in self.tasks or []) else "proportional"

    @field_validator("clean", "dedupe", "split", "augment", mode="before")
    @classmethod
    def _flag(cls, v: Any) -> Any:
        return _section_flag(v)

    @field_validator("pii", mode="before")
    @classmethod
    def _pii_flag(cls, v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return {"types": list(v)}
        return _section_flag(v)

    @model_validator(mode="after")
    def _one_way_to_split(self) -> DataConfig:
        if self.split is not None and self.validation is not None:
            raise ValueError("split and validation are both set; remove one (split makes the validation set)")
        if self.split is not None and self.test is not None:
            raise ValueError("split and test are both set; remove one (split makes the test set)")
        return self

    @property
    def pipeline_steps(self) -> list[str]:
        """The optional preparation steps this config turns on, in the order they run."""
        steps = [("clean", self.clean), ("pii", self.pii), ("dedupe", self.dedupe), ("split", self.split), ("augment", self.augment)]
        return [name for name, on in steps if on is not None]

    @field_validator("validation")
    @classmethod
    def _fraction_range(cls, v: Any) -> Any:
        if isinstance(v, float) and not 0.0 < v < 1.0:
            raise ValueError("a validation fraction must be between 0 and 1 (e.g. 0.1), or give a file path")
        return v


class FullMethod(Section):
    name: Literal["full"] = Field(description="Train every weight.")


class FreezeMethod(Section):
    name: Literal["freeze"] = Field(description="Train only the top blocks and/or named modules; freeze the rest.")
    train_top_blocks: int | None = Field(default=2, ge=0, description="How many of the topmost transformer blocks to train.")
    train_modules: list[str] = Field(
        default_factory=list,
        description="Extra parameter-name patterns (fnmatch, e.g. '*.norm.*' or 'lm_head*') to train as well.",
    )
    unfreeze_every: int | None = Field(
        default=None, ge=1,
        description="Gradual unfreezing: start with train_top_blocks, then train one more block (from the top down) "
        "every this many steps or epochs until all blocks train; null = the same blocks throughout.",
    )
    unfreeze_unit: Literal["steps", "epochs"] = Field(default="steps", description="What unfreeze_every counts.")

    @model_validator(mode="after")
    def _something_trains(self, info: ValidationInfo) -> FreezeMethod:
        # task: classification always trains its new head, so 0 blocks is feature extraction (only the head learns)
        head_trains = (info.context or {}).get("task") == "classification"
        if not self.train_top_blocks and not self.train_modules and not head_trains:
            raise ValueError("freeze trains nothing: set train_top_blocks >= 1 or list train_modules")
        return self


class _AdapterTargets(Section):
    """Where an adapter method attaches (shared by the LoRA and LyCORIS families)."""

    name: str  # each method's Literal; declared first so that `name` leads in config.yaml
    target_modules: Literal["all-linear"] | list[str] = Field(
        default="all-linear", description="'all-linear' or a list of module names (e.g. [q_proj, v_proj])."
    )
    modules_to_save: list[str] = Field(default_factory=list, description="Modules trained in full beside the adapters.")


class LoraMethod(_AdapterTargets):
    name: Literal["lora"] = Field(description="Low-rank adapters through PEFT; the base stays frozen.")
    r: int = Field(default=16, ge=1, description="LoRA rank.")
    alpha: float = Field(default=32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(
        default=0.0, ge=0, lt=1, description="Dropout on the LoRA input (on CPU its random masks can double the step time)."
    )


class RsLoraMethod(LoraMethod):
    name: Literal["rslora"] = Field(description="Rank-stabilized LoRA: scale = alpha / sqrt(r), so high ranks keep learning.")
    alpha: float = Field(default=16, gt=0, description="Scaling numerator (scale = alpha / sqrt(r): 4 at r=16).")


class DoraMethod(LoraMethod):
    name: Literal["dora"] = Field(
        description="Weight-decomposed LoRA (DoRA): a trained magnitude per output row plus a LoRA direction; slower steps."
    )


class QLoraMethod(LoraMethod):
    name: Literal["qlora"] = Field(description="LoRA on a base model quantized to 4-bit NF4 with bitsandbytes (about 1/3 the memory).")
    double_quant: bool = Field(default=True, description="Quantize the quantization constants too (saves ~0.4 bit per weight).")
    compute_dtype: Literal["auto", "bf16", "fp32"] = Field(
        default="auto", description="Precision of the 4-bit matmuls: auto = bf16 where the CPU/GPU has native bf16, else fp32."
    )
    optim: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field(
        default="adamw", description="Optimizer: adamw, or bitsandbytes' 8-bit AdamW (paged on CUDA; plain 8-bit on a CPU)."
    )


class Ia3Method(Section):
    name: Literal["ia3"] = Field(description="(IA)3: learned vectors that rescale attention keys/values and feed-forward inputs.")
    target_modules: Literal["all-linear"] | list[str] | None = Field(
        default=None, description="Modules to rescale; null = PEFT's choice for the architecture (Llama: k_proj, v_proj, down_proj)."
    )
    feedforward_modules: list[str] | None = Field(
        default=None,
        description="Target modules whose input (not output) is rescaled; null = PEFT's choice (Llama: down_proj).",
    )
    modules_to_save: list[str] = Field(default_factory=list, description="Modules trained in full beside the vectors.")


class LohaMethod(_AdapterTargets):
    name: Literal["loha"] = Field(description="LoHa: low-rank Hadamard-product adapters (effective rank up to r squared).")
    r: int = Field(default=8, ge=1, description="Rank of each of the two low-rank factors.")
    alpha: float = Field(default=8, gt=0, description="Scaling numerator (scale = alpha / r).")
    rank_dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout over the rank dimension during training.")
    module_dropout: float = Field(default=0.0, ge=0, lt=1, description="Chance of skipping an adapter for a whole step.")


class LokrMethod(LohaMethod):
    name: Literal["lokr"] = Field(description="LoKr: Kronecker-product adapters, a small dense factor times a low-rank one.")
    r: int = Field(default=8, ge=1, description="Rank of the low-rank Kronecker factor.")
    decompose_both: bool = Field(default=False, description="Make the small Kronecker factor low-rank too.")
    decompose_factor: int = Field(default=-1, description="Size of the small factor's dimensions; -1 = as square as possible.")


class VirtualTokenMethod(Section):
    """Methods that train virtual tokens in front of every sequence; PEFT's forward then has to run the model."""

    supports_packing: ClassVar[bool] = False
    no_packing_reason: ClassVar[str] = "PEFT drops the position ids that keep them apart"
    num_virtual_tokens: int = Field(default=20, ge=1, description="How many trained virtual tokens precede every sequence.")


class PrefixTuningMethod(VirtualTokenMethod):
    name: Literal["prefix_tuning"] = Field(description="Prefix tuning: trained keys and values in front of every layer's attention.")
    supports_gradient_checkpointing: ClassVar[bool] = False  # PEFT's prefix cache breaks under recomputation
    prefix_projection: bool = Field(default=False, description="Produce the prefix through a trained 2-layer MLP (P-tuning v2 style).")
    encoder_hidden_size: int | None = Field(
        default=None, ge=1, description="Hidden size of that MLP (prefix_projection only); null = the model's hidden size."
    )


class BottleneckAdapterMethod(Section):
    name: Literal["adapter"] = Field(
        description="Bottleneck adapters (Houlsby): a small residual MLP after each block's attention and/or MLP output; "
        "the base stays frozen and the model starts out identical to it."
    )
    reduction_factor: int = Field(default=16, ge=1, description="Hidden size / adapter width (16: a 576-wide model gets 36).")
    non_linearity: Literal["gelu", "relu", "silu"] = Field(default="gelu", description="Activation between the two projections.")
    placement: list[Literal["attention", "mlp"]] = Field(
        default=["attention", "mlp"], min_length=1,
        description="Where adapters go in each block: after the attention output projection and/or after the MLP.",
    )


class PromptTuningMethod(VirtualTokenMethod):
    name: Literal["prompt_tuning"] = Field(description="Prompt tuning: trained input embeddings in front of every sequence.")
    init_text: str | None = Field(
        default=None, description="Start the virtual tokens from this text's embeddings (e.g. 'Classify the ticket:'); null = random."
    )


# The methods that train a causal LM on its own loss; preference methods below wrap one of them as their `adapter`.
AdapterConfig = Annotated[
    FullMethod | FreezeMethod | LoraMethod | RsLoraMethod | DoraMethod | QLoraMethod | Ia3Method | LohaMethod | LokrMethod
    | PrefixTuningMethod | PromptTuningMethod | BottleneckAdapterMethod,
    Field(discriminator="name"),
]


class _ThroughAdapter:
    """Methods that train through an inner `adapter` method section (their own field) take its optimizer and
    checkpointing support."""

    @property
    def optim(self) -> str:
        return getattr(self.adapter, "optim", "adamw")

    @property
    def supports_gradient_checkpointing(self) -> bool:
        return getattr(self.adapter, "supports_gradient_checkpointing", True)


class _PreferenceMethod(_ThroughAdapter, Section):
    """Methods that learn from preference pairs (data.format: preference) and train through an inner `adapter`."""

    name: str  # each method's Literal; declared first so that `name` leads in config.yaml
    supports_packing: ClassVar[bool] = False
    no_packing_reason: ClassVar[str] = "a preference pair is two whole conversations"
    trains_on_pairs: ClassVar[bool] = True
    adapter: AdapterConfig = Field(
        default_factory=lambda: LoraMethod(name="lora"),
        description="What trains, with that method's own keys: {name: lora, r: 16, ...} (default LoRA), {name: full}, "
        "{name: qlora, ...} or any other method above.",
    )


class DpoMethod(_PreferenceMethod):
    name: Literal["dpo"] = Field(
        description="Direct preference optimization: raise the chosen reply's likelihood over the rejected one's, "
        "relative to the frozen base model (the reference)."
    )
    beta: float = Field(default=0.1, gt=0, description="How far the policy may move from the reference (smaller: further).")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(
        default="sigmoid", description="sigmoid (DPO), ipo (squared, length-normalized log-ratios) or hinge (SLiC)."
    )
    label_smoothing: float = Field(
        default=0.0, ge=0, lt=0.5, description="Assumed share of flipped preference labels (conservative DPO; sigmoid only)."
    )

    @model_validator(mode="after")
    def _smoothing_is_for_sigmoid(self) -> DpoMethod:
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(f"label_smoothing applies to loss_type: sigmoid only; remove it or use sigmoid (got {self.loss_type})")
        return self


class RewardMethod(_PreferenceMethod):
    name: Literal["reward"] = Field(
        description="Reward model: a scalar score head on the model, trained so that chosen replies outscore rejected "
        "ones (Bradley-Terry loss); the first half of RLHF."
    )


class DistillMethod(_ThroughAdapter, Section):
    name: Literal["distill"] = Field(
        description="Knowledge distillation on ordinary training rows: match a teacher model's next-token distribution "
        "(KL at temperature T) besides the data's own tokens (cross-entropy)."
    )
    teacher: str = Field(
        description="The teacher: a run directory, an HF model directory, a .gguf, a hub id or 'default'; it must share "
        "the student's tokenizer vocabulary."
    )
    alpha: float = Field(default=0.5, ge=0, le=1, description="loss = alpha * CE + (1 - alpha) * T^2 * KL(teacher || student).")
    temperature: float = Field(default=2.0, gt=0, description="Softens both distributions in the KL term (T).")
    adapter: AdapterConfig = Field(
        default_factory=lambda: LoraMethod(name="lora"),
        description="What trains in the student, with that method's own keys: {name: lora, r: 16, ...} (default LoRA), "
        "{name: full}, or any other method above.",
    )

    @property
    def supports_packing(self) -> bool:
        return getattr(self.adapter, "supports_packing", True)

    @property
    def no_packing_reason(self) -> str:
        return getattr(self.adapter, "no_packing_reason", "")


MethodConfig = Annotated[
    FullMethod | FreezeMethod | LoraMethod | RsLoraMethod | DoraMethod | QLoraMethod | Ia3Method | LohaMethod | LokrMethod
    | PrefixTuningMethod | PromptTuningMethod | BottleneckAdapterMethod | DpoMethod | RewardMethod | DistillMethod,
    Field(discriminator="name"),
]
# method name -> its section class, read off the union (each member's `name` is a one-value Literal)
METHOD_SECTIONS: dict[str, type[Section]] = {
    get_args(member.model_fields["name"].annotation)[0]: member for member in get_args(get_args(MethodConfig)[0])
}
METHOD_NAMES = tuple(METHOD_SECTIONS)
ADAPTER_NAMES = tuple(name for name, section in METHOD_SECTIONS.items()
                      if not issubclass(section, (_PreferenceMethod, DistillMethod)))


class EarlyStopping(Section):
    patience: int = Field(default=3, ge=1, description="Evaluations without improvement before stopping.")
    min_delta: float = Field(default=0.0, ge=0, description="Smallest drop in eval loss that counts as improvement.")


class DistributedConfig(Section):
    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        default="ddp",
        description="How several processes (`tunelab train --nproc N` or `accelerate launch`) share the work: ddp "
        "(data parallel; gloo on a CPU), fsdp or deepspeed (ZeRO; CUDA GPUs only).",
    )
    fsdp: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of accelerate's FullyShardedDataParallelPlugin.")
    deepspeed: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of accelerate's DeepSpeedPlugin (default zero_stage: 2).")


class TrainingConfig(Section):
    epochs: float = Field(default=3, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: int = Field(default=8, ge=1, description="Examples per batch (see max_tokens_per_batch for token budgets).")
    max_tokens_per_batch: int | None = Field(
        default=None, ge=1,
        description="Token-budget batches instead of batch_size: as many examples of similar length as fit in this many "
        "padded tokens (short rows share a batch, long rows get their own).",
    )
    micro_batch_tokens: int | Literal["auto"] | None = Field(
        default="auto",
        description="Split each batch into micro-batches of at most this many padded tokens: the same gradients with "
        "less memory. auto = 512 on a CPU (larger ran slower there; each of the micro-batches run at once gets its share of "
        "free memory), from free memory on a GPU; null = never split.",
    )
    micro_batch_threads: int | Literal["auto"] = Field(
        default="auto",
        description="CPU only: run this many micro-batches at once, each on one core (a small model's ops split badly "
        "across cores). auto = one per torch thread when nothing in a step depends on thread order (no dropout, one "
        "process, a thread-safe objective). Each thread takes its share of a step's rows (dealt by estimated cost) as "
        "micro-batches of up to micro_batch_tokens; 1 = off.",
    )
    share_prefix: bool = Field(
        default=True,
        description="Run the tokens that every row of a step starts with (a chat template's system prompt) once per step "
        "instead of once per row; the rows attend to their cached keys and values. Same loss and gradients up to "
        "rounding; applies to the causal-LM loss in one process without gradient checkpointing or packing.",
    )
    gradient_checkpointing: bool | Literal["auto"] = Field(
        default="auto",
        description="Recompute activations in the backward pass (~1.3x the compute, far less memory). auto = only "
        "when one micro-batch's estimated activations would not fit in free memory.",
    )
    gradient_accumulation: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    group_by_length: bool = Field(default=True, description="Batch examples of similar length together (less padding).")
    learning_rate: float = Field(default=2.0e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay (not applied to biases and norms).")
    adam_beta1: float = Field(default=0.9, gt=0, lt=1)
    adam_beta2: float = Field(default=0.999, gt=0, lt=1)
    max_grad_norm: float | None = Field(default=1.0, description="Clip the gradient norm to this; null disables.")
    layer_lr_decay: float | None = Field(
        default=None, gt=0, le=1,
        description="Layer-wise learning-rate decay: block i of L (0 = bottom) trains at lr * decay^(L-1-i), the embeddings "
        "at lr * decay^L, the head and final norm at lr; null = one learning rate.",
    )
    schedule: Literal["cosine", "linear", "constant"] = Field(default="cosine", description="Decay after warmup.")
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1, description="Fraction of steps spent warming up.")
    warmup_steps: int | None = Field(default=None, ge=0, description="Warmup steps (overrides warmup_ratio).")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto", description="auto = bf16 autocast where the CPU/GPU supports it, else fp32."
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(default="auto", description="Where to train.")
    seed: int = Field(default=0, description="Seeds data order, splits, dropout and initialisation.")
    eval_every: int | None = Field(default=None, ge=1, description="Evaluate every N steps (and always at epoch end).")
    eval_at_start: bool = Field(default=True, description="Evaluate the untouched model first (logged as step 0).")
    save_every: int | None = Field(default=None, ge=1, description="Checkpoint every N steps (and always at the end).")
    keep_last: int = Field(default=2, ge=1, description="How many checkpoints to keep.")
    log_every: int = Field(default=1, ge=1, description="Write metrics every N steps.")
    early_stopping: EarlyStopping | None = Field(
        default=None, description="Stop when eval loss stops improving; the best weights are kept."
    )
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, description="Multi-process training (used only when several processes run).")

    @field_validator("micro_batch_tokens")
    @classmethod
    def _positive_tokens(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError("must be a positive number of tokens, 'auto' or null")
        return value

    @field_validator("micro_batch_threads")
    @classmethod
    def _positive_threads(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError("must be a positive number of threads or 'auto' (1 turns it off)")
        return value


class OutputConfig(Section):
    dir: str = Field(default="runs/run", description="Run directory: config, metrics, checkpoints, final model.")
    overwrite: bool = Field(default=False, description="Replace an existing run directory instead of refusing.")


# ----------------------------------------------------------------------------------------------------------------------
# Hyperparameter search (`tunelab tune`) and experiment tracking

TUNE_METRICS = ("final_eval_loss", "best_eval_loss", "eval_perplexity", "final_train_loss", "tokens_per_s", "wall_time_s")
EVAL_LOSS_METRICS = ("final_eval_loss", "best_eval_loss", "eval_perplexity")  # the ones the periodic eval can prune on
NOT_SEARCHABLE = ("search", "tune", "tracking", "output", "resume")


class SearchParam(Section):
    """One dimension of the search space, keyed in `search:` by its config path (e.g. training.learning_rate)."""

    type: Literal["loguniform", "uniform", "float", "int", "categorical"] = Field(
        description="loguniform / uniform (= float) / int ranges take low and high; categorical takes choices."
    )
    low: int | float | None = Field(default=None, description="Smallest value of a range (inclusive).")
    high: int | float | None = Field(default=None, description="Largest value of a range (inclusive).")
    step: int | float | None = Field(default=None, gt=0, description="Spacing of a float or int range (not with log).")
    log: bool = Field(default=False, description="Sample a float or int range on a log scale.")
    choices: list[Any] | None = Field(default=None, description="The values of a categorical parameter.")
    grid: list[Any] | None = Field(default=None, description="The values --sampler grid tries for a range (required for floats).")

    @model_validator(mode="after")
    def _shape(self) -> SearchParam:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs a non-empty choices list (e.g. choices: [8, 16])")
            if any(v is not None for v in (self.low, self.high, self.step, self.grid)):
                raise ValueError("a categorical parameter takes only choices (low, high, step and grid are for ranges)")
            return self
        if self.choices is not None:
            raise ValueError(f"choices go with type: categorical; a {self.type} range takes low and high")
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} range needs both low and high")
        if not self.low < self.high:
            raise ValueError(f"empty range: low ({self.low:g}) must be below high ({self.high:g})")
        if self.is_log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0 (got {self.low:g})")
        if self.is_log and self.step is not None:
            raise ValueError("step and a log scale cannot be combined; drop one")
        if self.type == "int" and any(v is not None and float(v) != int(v) for v in (self.low, self.high, self.step)):
            raise ValueError("an int range needs whole numbers for low, high and step")
        if self.grid is not None:
            if not self.grid:
                raise ValueError("grid: an empty list; give the values to try, or remove it")
            outside = [v for v in self.grid if not isinstance(v, (int, float)) or not self.low <= v <= self.high]
            if outside:
                raise ValueError(f"grid value {outside[0]!r} is outside [low, high] = [{self.low:g}, {self.high:g}]")
        return self

    @property
    def is_log(self) -> bool:
        return self.type == "loguniform" or self.log

    def probe_values(self) -> list[Any]:
        """Values that must all be valid for the field: every listed value, or the ends and middle of a range."""
        if self.choices is not None:
            return list(self.choices)
        low, high = self.low, self.high
        mid = (low * high) ** 0.5 if self.is_log else (low + high) / 2
        if self.type == "int":
            return [int(low), int(high), round(mid)] + list(self.grid or [])
        return [float(low), float(high), float(mid)] + list(self.grid or [])


class TuneConfig(Section):
    metric: Literal[TUNE_METRICS] = Field(  # type: ignore[valid-type]
        default="final_eval_loss", description="summary.json value to optimize (final_eval_loss = best weights with early stopping)."
    )
    direction: Literal["minimize", "maximize"] | None = Field(
        default=None, description="minimize or maximize the metric (default: maximize tokens_per_s, minimize the rest)."
    )
    trials: int = Field(default=20, ge=0, description="Trials this process runs (each worker on a shared study runs its own).")
    sampler: Literal["tpe", "random", "grid"] = Field(default="tpe", description="How the next trial's parameters are chosen.")
    startup_trials: int = Field(
        default=4, ge=0, description="Random trials before TPE models the space; complete trials before the pruner prunes."
    )
    pruner: Literal["median", "hyperband", "none"] = Field(
        default="median", description="Stop trials whose periodic eval loss is worse than the others' at the same step."
    )
    warmup_steps: int = Field(default=0, ge=0, description="No pruning before this optimizer step.")
    seed: int | None = Field(default=None, description="Sampler seed (default: training.seed); trial n draws with (seed, n).")
    storage: str | None = Field(default=None, description="Optuna RDB URL shared by workers (default sqlite:///<output.dir>/study.db).")
    study: str | None = Field(default=None, description="Study name in the storage (default: the name of output.dir).")
    heartbeat_interval: int = Field(
        default=30, ge=1, description="Seconds between a worker's heartbeats; a trial silent for twice that is marked failed."
    )
    retry_failed: int = Field(default=1, ge=0, description="How often a failed (killed) trial is queued again with its parameters.")

    @model_validator(mode="after")
    def _prunable(self) -> TuneConfig:
        if self.pruner != "none" and self.metric not in EVAL_LOSS_METRICS:
            raise ValueError(f"pruner: {self.pruner} reads the periodic eval loss, which says nothing about metric "
                             f"{self.metric}; set pruner: none")
        return self

    @property
    def goal(self) -> str:
        return self.direction or ("maximize" if self.metric == "tokens_per_s" else "minimize")


class MlflowConfig(Section):
    tracking_uri: str | None = Field(
        default=None, description="Any MLflow tracking URI (default sqlite:///<output.dir>/mlflow.db, artifacts beside it)."
    )
    experiment: str = Field(default="tunelab", description="MLflow experiment the run is logged under.")
    run_name: str | None = Field(default=None, description="Run name (default: the name of output.dir).")


class WandbConfig(Section):
    project: str = Field(default="tunelab", description="W&B project.")
    mode: Literal["offline", "online"] = Field(default="offline", description="offline writes <output.dir>/wandb for `wandb sync`.")
    entity: str | None = Field(default=None, description="W&B entity (team or user); online mode only.")


class TrackingConfig(Section):
    mlflow: MlflowConfig | None = Field(default=None, description="Log params, metrics and artifacts to MLflow (true for defaults).")
    wandb: WandbConfig | None = Field(default=None, description="Log to Weights & Biases, offline by default (true for defaults).")

    @field_validator("mlflow", "wandb", mode="before")
    @classmethod
    def _flag(cls, v: Any) -> Any:
        return _section_flag(v)


class ReplayConfig(Section):
    data: str | list[str] = Field(
        description="General data mixed into training against forgetting: file(s), a glob or a list (rows of any format "
        "this run trains on), or 'previous' in a staged run: the earlier stages' training data."
    )
    fraction: float = Field(default=0.2, gt=0, lt=1, description="Share of each batch's examples drawn from the replay data.")
    format: Literal["alpaca", "prompt_response", "messages", "text", "preference"] | None = Field(
        default=None, description="Row layout of the replay files; detected from the first row when omitted."
    )


class ContinualConfig(Section):
    """Continual learning: keep what the model knew while it learns the new data."""

    replay: ReplayConfig | None = Field(
        default=None, description="Mix a share of earlier or general data into every batch (experience replay)."
    )
    penalty: Literal["l2sp", "ewc"] | None = Field(
        default=None,
        description="Weight penalty against drifting from the starting weights: l2sp (strength/2 * sum (w - w0)^2) or "
        "ewc (the same, each weight scaled by its diagonal Fisher information); null = none.",
    )
    penalty_strength: float = Field(default=1.0, ge=0, description="The penalty's factor (lambda).")
    ewc_rows: int = Field(default=64, ge=1, description="Rows used to estimate the diagonal Fisher for ewc (the first ones).")
    fisher_data: str | list[str] | None = Field(
        default=None, description="File(s) whose rows estimate the Fisher for ewc (the old task's data); default: data.train."
    )


class StageConfig(Section):
    """One stage of a sequential run (`stages:`); it trains from the model the previous stage produced."""

    name: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9_.-]+$",
        description="Stage name (letters, digits, _ . -); its run directory is <output.dir>/stages/<i>-<name>.",
    )
    data: DataConfig | None = Field(default=None, description="The stage's data section (replaces the top-level one).")
    method: MethodConfig | None = Field(default=None, description="The stage's method section (replaces the top-level one).")
    training: TrainingConfig | None = Field(
        default=None, description="The training keys this stage changes (merged over the top-level training section)."
    )
    continual: ContinualConfig | None = Field(
        default=None, description="The stage's continual section (replaces the top-level one; replay data may be 'previous')."
    )


class RunConfig(Section):
    model: str = Field(default="default", description="'default' (embedded SmolLM2-135M-Instruct), 'minilm' (the embedded "
                       "all-MiniLM-L6-v2 encoder, for task: classification), a local HF dir, a .gguf file or a hub id.")
    task: Literal["causal_lm", "classification"] = Field(
        default="causal_lm", description="causal_lm: next-token loss on the replies; classification: a sequence "
        "classification head on the model (encoder or decoder) trained with cross-entropy on data.format: classification "
        "rows (text, label)."
    )
    data: DataConfig | None  # required; null only in a staged run whose stages all have their own data
    method: MethodConfig = Field(default_factory=lambda: LoraMethod(name="lora"))
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    resume: bool | Literal["auto"] = Field(default=False, description="'auto'/true: continue from the newest checkpoint.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow / W&B besides TensorBoard.")
    continual: ContinualConfig = Field(
        default_factory=ContinualConfig, description="Continual learning against forgetting: replay (and weight penalties)."
    )
    search: dict[str, SearchParam] = Field(
        default_factory=dict, description="`tunelab tune`: the search space, keyed by config path (e.g. training.learning_rate)."
    )
    tune: TuneConfig | None = Field(default=None, description="`tunelab tune`: objective, sampler, pruner, storage.")
    stages: list[StageConfig] | None = Field(
        default=None,
        description="Sequential fine-tuning: stages trained one after another, each from the previous stage's model "
        "(e.g. domain text -> instructions -> preferences); each may set name, data, method, training, continual.",
    )

    @model_validator(mode="before")
    @classmethod
    def _stages_may_bring_data(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("stages") and "data" not in values:
            values = {**values, "data": None}  # each stage gives its own data; without stages, `data` stays required
        return values

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ----------------------------------------------------------------------------------------------------------------------
# Loading, overrides and error messages


def _yaml_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path in a YAML document to its 1-based line, for error messages."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = path + (str(key.value),)
                lines[sub] = key.start_mark.line + 1
                walk(value, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[path + (str(i),)] = item.start_mark.line + 1
                walk(item, path + (str(i),))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _fields_at(path: tuple[str, ...], data: dict) -> list[str]:
    """Valid key names at `path` of the config, used to suggest a fix for an unknown key."""
    model: Any = RunConfig
    keyed = False  # inside `search:`, whose keys are config paths, not fields
    for part in path:
        if keyed:
            keyed = False
            continue
        if part.isdigit():  # an item of a list section (data.tasks, stages): the item's type is already picked
            continue
        if model is None:
            return []
        field = model.model_fields.get(part)
        if field is None:
            return []
        keyed = getattr(field.annotation, "__origin__", None) is dict
        model = _section_type(field.annotation, data, path[: path.index(part) + 1])
    return list(model.model_fields) if model is not None else []


def _section_type(annotation: Any, data: dict, path: tuple[str, ...]) -> Any:
    if path[-1:] == ("method",) or path[-2:] == ("method", "adapter"):  # a method section: the class its `name` picks
        node: Any = data
        for part in path:
            if isinstance(node, list) and part.isdigit():
                node = node[int(part)] if int(part) < len(node) else None
            else:
                node = node.get(part) if isinstance(node, dict) else None
        name = node.get("name") if isinstance(node, dict) else None
        return METHOD_SECTIONS.get(name, LoraMethod)
    for candidate in getattr(annotation, "__args__", (annotation,)):
        if getattr(candidate, "__origin__", None) is list:  # list[TaskConfig], list[StageConfig]
            candidate = get_args(candidate)[0]
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


_UNION_MEMBER = re.compile(r"^(str|int|float|bool|none|.*\[.*\])$")


def _clean_loc(loc: tuple) -> tuple[str, ...]:
    """Drop what pydantic adds to locations inside unions: member types (`str`, `list[str]`) and method tags."""
    parts = [str(p) for p in loc if not _UNION_MEMBER.match(str(p))]
    return tuple(p for i, p in enumerate(parts) if not (i and parts[i - 1] in ("method", "adapter") and p in METHOD_NAMES))


def format_validation_error(
    err: ValidationError, source: str, data: dict, lines: dict[tuple[str, ...], int], overridden: set | None = None
) -> str:
    """Turn pydantic's first error into one line: `run.yaml:7: training.learnign_rate: unknown key; did you mean ...`."""
    errors = [(_clean_loc(e["loc"]), e) for e in err.errors()]
    loc, e = errors[0]
    if e["type"] == "missing":  # an unknown key beside a missing one is most likely its misspelling: report that
        loc, e = next(((l, o) for l, o in errors if o["type"] == "extra_forbidden" and l[:-1] == loc[:-1]), (loc, e))
    # A union reports one error per member ("not a string", "not a float", ...); the value error says more.
    for other_loc, other in errors:
        if other_loc == loc and not other["type"].endswith("_type"):
            e = other
            break
    key = ".".join(loc) or "(top level)"
    line = lines.get(loc)
    prefix = f"{source}:{line}: " if line else f"{source}: "
    if any(loc[: len(o)] == o for o in overridden or ()):
        prefix = "command-line override: "
    kind = e["type"]
    if kind == "extra_forbidden":
        valid = _fields_at(loc[:-1], data)
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}"
        return f"{prefix}{key}: unknown key; {hint}"
    if kind == "missing":
        return f"{prefix}{key}: required key is missing; add it (see configs/ for examples)"
    names = ADAPTER_NAMES if loc[-1:] == ("adapter",) else METHOD_NAMES
    if kind == "union_tag_invalid":
        tag = e.get("ctx", {}).get("tag")
        close = difflib.get_close_matches(str(tag), names, n=1, cutoff=0.4)
        hint = f"did you mean '{close[0]}'?" if close else f"choose one of: {', '.join(names)}"
        return f"{prefix}{key}.name: unknown method '{tag}'; {hint}"
    if kind == "union_tag_not_found":
        return f"{prefix}{key}.name: missing; choose one of: {', '.join(names)}"
    msg = e["msg"]
    msg = msg.removeprefix("Value error, ")
    got = e.get("input")
    shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
    return f"{prefix}{key}: {msg}{shown}"


def parse_overrides(overrides: list[str] | None) -> list[tuple[list[str], Any]]:
    """Parse `training.learning_rate=1e-4` style overrides; values are read as YAML scalars."""
    parsed = []
    for item in overrides or []:
        if "=" not in item:
            raise TunelabError(f"override '{item}': expected key.sub=value (e.g. training.epochs=1)")
        key, _, raw = item.partition("=")
        key = key.strip().lstrip("-")
        if not key:
            raise TunelabError(f"override '{item}': the key is empty; write key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        parsed.append((key.split("."), value))
    return parsed


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    for path, value in parse_overrides(overrides):
        node = data
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return data


def _plain(value: Any) -> Any:
    """Paths become strings so the Python API accepts pathlib objects anywhere a path goes."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def config_from_dict(data: dict, source: str = "config", lines: dict | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Validate a plain dict (already YAML-loaded) into a RunConfig, raising a one-line TunelabError."""
    if not isinstance(data, dict):
        raise TunelabError(f"{source}: the config must be a mapping of sections (model, data, method, training, output)")
    data = _plain(data)
    if isinstance(data.get("model"), (int, float)):
        data["model"] = str(data["model"])
    if isinstance(data.get("method"), dict) and "name" not in data["method"]:
        data["method"]["name"] = "lora"  # the default method, so `method: {r: 8}` means LoRA with r=8
    if isinstance(data.get("method"), dict) and isinstance(data["method"].get("adapter"), dict):
        data["method"]["adapter"].setdefault("name", "lora")  # likewise inside dpo/reward
    task = data.get("task")
    if task == "classification" and isinstance(data.get("data"), dict) and data["data"].get("format") is None:
        data["data"]["format"] = "classification"
    for stage in data.get("stages") or []:
        if isinstance(stage, dict) and isinstance(stage.get("method"), dict):
            stage["method"].setdefault("name", "lora")
            if isinstance(stage["method"].get("adapter"), dict):
                stage["method"]["adapter"].setdefault("name", "lora")
    try:
        cfg = RunConfig.model_validate(data, context={"task": task})
    except ValidationError as err:
        overridden = {tuple(path) for path, _ in parse_overrides(overrides)}
        raise TunelabError(format_validation_error(err, source, data, lines or {}, overridden)) from None
    if cfg.stages is not None or cfg.data is None:
        from tunelab.train.stages import check_stages

        check_stages(cfg, source, lines or {})
        return cfg
    check_method_fits(cfg, source, lines or {}, {tuple(path) for path, _ in parse_overrides(overrides)})
    check_mixture(cfg, source, lines or {})
    if cfg.search:
        check_search_space(cfg, data, source, lines or {})
    return cfg


def check_mixture(cfg: RunConfig, source: str, lines: dict, at: tuple[str, ...] = ()) -> None:
    """Multi-task data and replay against the method and the batching (what needs no file read).

    Raises:
        TunelabError: `run.yaml:7: data.tasks.1.format: dpo trains on preference pairs, ...`, max_tokens_per_batch.
    """
    pairs = getattr(cfg.method, "trains_on_pairs", False)
    checks = []
    for i, task in enumerate(cfg.data.tasks or []):
        fmt = task.format or cfg.data.format
        checks.append((fmt is not None and pairs != (fmt == "preference"), ("data", "tasks", str(i), "format"),
                       data_format_problem(cfg.method.name, pairs, fmt or "")))
    replay = cfg.continual.replay
    if replay is not None and replay.format is not None:
        checks.append((pairs != (replay.format == "preference"), ("continual", "replay", "format"),
                       data_format_problem(cfg.method.name, pairs, replay.format)))
    if replay is not None and replay.data == "previous" and at[:1] != ("stages",):
        checks.append((True, ("continual", "replay", "data"),
                       "'previous' means the earlier stages' data and needs a staged run (stages:); give replay file(s)"))
    checks.append(((cfg.data.tasks or replay) and cfg.training.max_tokens_per_batch, ("training", "max_tokens_per_batch"),
                   "mixed batches (data.tasks, continual.replay) are cut by batch_size; remove max_tokens_per_batch"))
    for failed, loc, problem in checks:
        if failed:
            line = lines.get(at + loc)
            raise TunelabError(f"{source}:{line}: {'.'.join(at + loc)}: {problem}" if line
                               else f"{source}: {'.'.join(at + loc)}: {problem}")


def check_method_fits(cfg: RunConfig, source: str, lines: dict, overridden: set, at: tuple[str, ...] = ()) -> None:
    """Settings elsewhere in the config that the chosen method cannot train with, reported at that setting's line
    (`at`: where this config sits in the file, e.g. ("stages", "1") for a stage).

    Raises:
        TunelabError: `run.yaml:9: data.packing: prompt_tuning cannot train on packed rows; ...`.
    """
    name = cfg.method.name
    pairs = getattr(cfg.method, "trains_on_pairs", False)
    checks = [
        (cfg.data.packing and not getattr(cfg.method, "supports_packing", True), ("data", "packing"),
         f"{name} cannot train on packed rows ({getattr(cfg.method, 'no_packing_reason', '')}); set data.packing: false"),
        (cfg.data.packing and cfg.data.format == "preference", ("data", "packing"),
         "preference pairs cannot be packed (each pair is two whole conversations); set data.packing: false"),
        (cfg.data.format is not None and pairs != (cfg.data.format == "preference"), ("data", "format"),
         data_format_problem(name, pairs, cfg.data.format)),
        (pairs and cfg.data.train_on_inputs, ("data", "train_on_inputs"),
         f"{name} compares only the chosen and rejected replies; set data.train_on_inputs: false"),
        (cfg.training.gradient_checkpointing is True and not getattr(cfg.method, "supports_gradient_checkpointing", True),
         ("training", "gradient_checkpointing"),
         f"{name} does not work with gradient checkpointing (PEFT's restriction); set it to auto or false"),
        (cfg.training.early_stopping is not None and getattr(cfg.method, "unfreeze_every", None) is not None,
         ("training", "early_stopping"),
         ("early stopping cannot restore the best weights of blocks that were still frozen then; remove "
          "early_stopping or method.unfreeze_every")),
    ]
    checks = task_problems(cfg) + checks  # the task first: it decides what the other settings must be
    for failed, loc, problem in checks:
        if failed:
            loc = at + loc
            line = lines.get(loc)
            prefix = "command-line override: " if loc in overridden else f"{source}:{line}: " if line else f"{source}: "
            raise TunelabError(f"{prefix}{'.'.join(loc)}: {problem}")


CLASSIFICATION_METHODS = ("full", "freeze", "lora", "rslora", "dora", "ia3", "loha", "lokr")


def task_problems(cfg: RunConfig) -> list[tuple[bool, tuple[str, ...], str]]:
    """(failed, config location, problem) for settings that do not fit `task:` (check_method_fits reports them)."""
    classify = cfg.task == "classification"
    return [
        (classify and cfg.method.name not in CLASSIFICATION_METHODS, ("method", "name"),
         f"task: classification cannot train with {cfg.method.name}; use one of {', '.join(CLASSIFICATION_METHODS)}"),
        (classify and cfg.data.format not in (None, "classification"), ("data", "format"),
         f"task: classification trains on rows with text and label, not '{cfg.data.format}' rows; use format classification"),
        (not classify and cfg.data.format == "classification", ("data", "format"),
         "classification rows (text, label) train a classifier; add task: classification at the top level"),
        (classify and cfg.data.packing, ("data", "packing"),
         "classification scores each text on its own (one label per sequence); set data.packing: false"),
        (not classify and cfg.model.strip() == "minilm", ("model",),
         "minilm is an encoder and cannot generate text; use it with task: classification (or model: default)"),
    ]


def data_format_problem(method: str, pairs: bool, fmt: str) -> str:
    """What is wrong when a method that trains on preference pairs meets other data, or the other way round."""
    if pairs:
        return (f"{method} trains on preference pairs, not '{fmt}' rows; give rows with prompt, chosen and rejected "
                "(data.format: preference)")
    return (f"preference rows train with method dpo or reward, not {method}; set method.name: dpo "
            f"(with adapter: {{name: {method}, ...}}) or reward")


def set_path(data: dict, path: str, value: Any) -> dict:
    """Set a dotted config path (`training.learning_rate`) in a nested dict, creating sections on the way."""
    node = data
    *parents, leaf = path.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value
    return data


def check_search_space(cfg: RunConfig, data: dict, source: str, lines: dict) -> None:
    """Each `search:` key must be a searchable config field that accepts every value the search can give it.

    Raises:
        TunelabError: `run.yaml:12: search.<path>: ...` for an unknown path (with the closest valid one), a section
            or an unsearchable key, a value the field rejects, or a float range that --sampler grid cannot enumerate.
    """
    base = {k: v for k, v in data.items() if k not in ("search", "tune")}
    grid = cfg.tune is not None and cfg.tune.sampler == "grid"
    for path, param in cfg.search.items():
        line = lines.get(("search", path))
        prefix = f"{source}:{line}: search.{path}: " if line else f"{source}: search.{path}: "
        parts = tuple(path.split("."))
        if parts[0] in NOT_SEARCHABLE:
            raise TunelabError(f"{prefix}{parts[0]} cannot be searched; search keys of model, data, method or training")
        for i, part in enumerate(parts):
            valid = _fields_at(parts[:i], data)
            if part not in valid:
                close = difflib.get_close_matches(part, valid, n=1, cutoff=0.5)
                where = ".".join(parts[:i]) or "the top level"
                hint = (f"did you mean '{'.'.join(parts[:i] + (close[0],))}'?" if close
                        else f"valid keys under {where}: {', '.join(valid)}" if valid else f"{where} has no keys below it")
                raise TunelabError(f"{prefix}unknown config path; {hint}")
        inner = _fields_at(parts, data)
        if inner:
            raise TunelabError(f"{prefix}a whole section; search one of its keys (e.g. {path}.{inner[0]})")
        if grid and param.type != "categorical" and param.grid is None and (param.type != "int" or param.is_log):
            raise TunelabError(f"{prefix}--sampler grid needs the values to try for a {param.type} range; "
                               "add grid: [...] or use type: categorical (or another sampler)")
        for value in param.probe_values():
            try:
                config_from_dict(set_path(copy.deepcopy(base), path, value), "trial")
            except TunelabError as exc:
                problem = str(exc).removeprefix("trial: ")
                raise TunelabError(f"{prefix}the value {value!r} is rejected: {problem}") from None


def read_yaml(path: Path, what: str, missing: str) -> tuple[Any, str]:
    """Parse a YAML file; returns (data, text). Every failure is one line naming the file (and the line for bad YAML).

    Raises:
        TunelabError: the file is missing (`missing` says what to do), unreadable, not UTF-8 or not YAML.
    """
    if not path.is_file():
        raise TunelabError(f"{path}: {missing}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TunelabError(f"{path}: cannot read the {what} ({exc.__class__.__name__}); save it as UTF-8 text") from None
    try:
        return yaml.safe_load(text), text
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"{mark.line + 1}:" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise TunelabError(f"{path}:{line} invalid YAML: {problem}; fix the indentation or quoting there") from None


def load_config(path: str | Path | dict, overrides: list[str] | None = None) -> RunConfig:
    """Read a run config from YAML (or take a dict), apply overrides, validate.

    Relative data paths stay relative to the working directory, as a user typing them in a shell expects.

    Raises:
        TunelabError: the file is missing or not YAML, a key is unknown, a value has the wrong type or range.
    """
    if isinstance(path, dict):
        return config_from_dict(apply_overrides(copy.deepcopy(path), overrides), "config", overrides=overrides)
    p = Path(path)
    data, text = read_yaml(p, "config", "config file not found; pass the path of a run YAML (see configs/)")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TunelabError(f"{p}: the config must be a mapping of sections (model, data, method, training, output)")
    apply_overrides(data, overrides)
    return config_from_dict(data, str(p), _yaml_lines(text), overrides)
