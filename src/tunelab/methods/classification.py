"""Sequence classification (`task: classification`): a classification head on an encoder or a decoder.

    model: minilm                      # the embedded all-MiniLM-L6-v2 encoder, or default (SmolLM2), any HF dir / hub id
    task: classification
    data: {train: train.jsonl, validation: validation.jsonl, format: classification}   # rows {"text": ..., "label": ...}
    method: {name: full}               # or freeze (train_top_blocks: 0 = feature extraction: only the head), lora, ...

The base checkpoint loads as transformers' `AutoModelForSequenceClassification` with one output per class found in the
training rows (`id2label`/`label2id` in its config, so the saved model names its predictions). An encoder classifies
from its pooled [CLS] vector (BERT: `classifier`), a decoder from its last token that is not padding (`score`; the
config's `pad_token_id` is set to the tokenizer's so transformers can find that token). The head is new and always
trains: PEFT methods run with task type SEQ_CLS (PEFT trains and saves the head in full beside the adapter), full and
freeze set it trainable. The loss is cross-entropy per example; evaluation adds accuracy and macro-F1.

After training, `load_classifier(run_dir)` reloads the classifier and `predict_labels` names the classes:

    model, tokenizer, labels = load_classifier("runs/classify-minilm")
    predict_labels(model, tokenizer, ["Great value, works perfectly."], labels)   # [("positive", 0.97)]
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.data.tokenize import Encoded
from tunelab.errors import TunelabError
from tunelab.train.objective import Objective, add_stats

HEAD_NAMES = ("score", "classifier", "classification_head")  # what transformers' *ForSequenceClassification call it
LABELS_FILE = "classifier.json"  # the class names, saved beside the model (a PEFT adapter has no config.json)


def load_kwargs(labels: list[str], tokenizer) -> dict:
    """`load_model` arguments for a classifier over `labels` (class id = position).

    Raises:
        TunelabError: no label set (the data was not prepared as one classification dataset, e.g. data.tasks).
    """
    if not labels:
        raise TunelabError("task: classification needs one classification dataset (data.train with data.format: "
                           "classification); multi-task data is not supported for classifiers")
    return {"head": "score", "num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)}, "pad_token_id": tokenizer.pad_token_id,
            "problem_type": "single_label_classification"}


def attach(model: nn.Module, cfg) -> nn.Module:
    """Attach method `cfg` to a sequence classifier; the new head always trains."""
    from tunelab.methods import METHODS, peft_adapters

    if cfg.name in peft_adapters.ADAPTERS:
        return peft_adapters.attach(model, cfg, task_type="SEQ_CLS")
    model = METHODS[cfg.name](model, cfg)
    for p in classifier_head(model).parameters():
        p.requires_grad_(True)
    return model


def classifier_head(model: nn.Module) -> nn.Module:
    """The classification head of a transformers *ForSequenceClassification model.

    Raises:
        TunelabError: the model has none of the usual head names.
    """
    for name in HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    raise TunelabError(f"{type(model).__name__} has no classification head named {' / '.join(HEAD_NAMES)}; "
                       "load it with load_model(source, head='score')")


def objective(cfg, model: nn.Module, tokenizer, dtype: torch.dtype | None) -> ClassificationObjective:
    return ClassificationObjective(model.config.num_labels)


def class_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(rows, classes) float32 logits."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


class ClassificationObjective(Objective):
    """Cross-entropy of the class logits, summed over examples; evaluation adds accuracy and macro-F1 (from per-class
    true-positive / predicted / true counts, which add up over batches and processes)."""

    unit = "example"

    def __init__(self, num_labels: int) -> None:
        self.num_labels = num_labels
        self.metric_names = ("correct", *(f"{kind}_{c}" for kind in ("tp", "predicted", "true") for c in range(num_labels)))

    def collate(self, examples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
        if any(len(e.labels) != 1 for e in examples):
            raise TunelabError("task: classification got examples without one class each; use data.format: classification")
        width = max(len(e.input_ids) for e in examples)
        ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
            mask[i, : len(e.input_ids)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e.labels[0] for e in examples])}

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["labels"].shape[0])

    def loss(self, model, batch, stats=None):
        logits = class_logits(model, batch)
        target = batch["labels"]
        if stats is not None:
            predicted = logits.argmax(dim=-1)
            classes = torch.arange(self.num_labels, device=target.device)
            is_pred, is_true = predicted[:, None] == classes, target[:, None] == classes
            add_stats(stats, correct=(predicted == target).float())
            add_stats(stats, **{f"tp_{c}": (is_pred & is_true)[:, c].float() for c in range(self.num_labels)},
                      **{f"predicted_{c}": is_pred[:, c].float() for c in range(self.num_labels)},
                      **{f"true_{c}": is_true[:, c].float() for c in range(self.num_labels)})
        return F.cross_entropy(logits, target, reduction="sum"), int(target.shape[0])

    def eval_metrics(self, stats: dict[str, float], count: int) -> dict[str, float]:
        """Accuracy and macro-F1 over every training class (sklearn's definition, zero_division=0)."""
        f1 = []
        for c in range(self.num_labels):
            denominator = stats[f"predicted_{c}"] + stats[f"true_{c}"]
            f1.append(2 * stats[f"tp_{c}"] / denominator if denominator else 0.0)
        return {"accuracy": stats["correct"] / max(count, 1), "macro_f1": sum(f1) / self.num_labels}


def save_labels(model: nn.Module, out: Path) -> None:
    """Write the class names beside a saved classifier (no-op for other models): a PEFT adapter directory has no
    config.json to hold id2label."""
    config = getattr(model, "config", None)
    if getattr(config, "problem_type", None) != "single_label_classification":
        return
    labels = [config.id2label[i] for i in range(config.num_labels)]
    (Path(out) / LABELS_FILE).write_text(json.dumps({"labels": labels, "pad_token_id": config.pad_token_id}, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------------------
# Use a trained classifier


def is_classification_run(target: str | Path) -> bool:
    import yaml

    path = Path(str(target))
    if not (path / "config.yaml").is_file():
        return False
    run_config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    return isinstance(run_config, dict) and run_config.get("task") == "classification"


def load_classifier(run_dir: str | Path, device: str = "cpu"):
    """(model, tokenizer, labels) of a `task: classification` run, in eval mode.

    Raises:
        TunelabError: not a classification run, or it has no final model yet.
    """
    from transformers import AutoTokenizer

    from tunelab.models.loading import load_model, resolve_model

    path = Path(str(run_dir))
    model_dir = path / "model"
    if not is_classification_run(path):
        raise TunelabError(f"{path}: not a classification run (its config.yaml has no task: classification)")
    if not (model_dir / LABELS_FILE).is_file():
        raise TunelabError(f"{path}: this run has no final model yet (interrupted?); resume it with "
                           f"`tunelab train {path / 'config.yaml'} --resume`")
    labels = json.loads((model_dir / LABELS_FILE).read_text())["labels"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if (model_dir / "adapter_config.json").is_file():
        import yaml
        from peft import PeftModel

        base_path = json.loads((model_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base_path or not Path(base_path).is_dir():  # the model cache was cleared: resolve the spec again
            base_path = resolve_model((yaml.safe_load((path / "config.yaml").read_text()) or {}).get("model")).path
        base = load_model(resolve_model(base_path), **load_kwargs(labels, tokenizer))
        model = PeftModel.from_pretrained(base, str(model_dir))
    else:
        model = load_model(resolve_model(str(model_dir)), **load_kwargs(labels, tokenizer))
    return model.to(device).eval(), tokenizer, labels


@torch.no_grad()
def predict_labels(model, tokenizer, texts: list[str], labels: list[str], max_length: int = 512,
                   batch_size: int = 32) -> list[tuple[str, float]]:
    """(label, probability) for each text, tokenized as in training (special tokens, no chat template)."""
    objective = ClassificationObjective(len(labels))
    device = next(model.parameters()).device
    out: list[tuple[str, float]] = []
    for start in range(0, len(texts), batch_size):
        examples = [Encoded(tokenizer(t, add_special_tokens=True)["input_ids"][:max_length], [0], "") for t in
                    texts[start : start + batch_size]]
        batch = {k: v.to(device) for k, v in objective.collate(examples, tokenizer.pad_token_id).items()}
        probs = class_logits(model, batch).softmax(dim=-1)
        best = probs.argmax(dim=-1)
        out += [(labels[int(i)], float(p[i])) for i, p in zip(best, probs)]
    return out
