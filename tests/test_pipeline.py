"""The data pipeline end to end on hand-made files: invalid rows, dedupe and leakage, PII, splits, the cache, and the
property that no valid, unique row is ever lost without a record of why."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunelab.config import load_config
from tunelab.data.cache import EncodedTable
from tunelab.data.dataset import prepare_data
from tunelab.data.dedupe import dedupe_key
from tunelab.data.pipeline import example_text, run_pipeline, split_rows, target_counts, to_example
from tunelab.data.readers import Record
from tunelab.errors import TunelabError


def data_cfg(**data):
    return load_config({"data": data}).data


def qa_rows(n: int, label_every: int = 0) -> list[dict]:
    colours = ["red", "green", "blue", "amber", "violet", "teal", "grey"]
    rows = []
    for i in range(n):
        row = {"prompt": f"Question {i}: what is the colour number {i * 7919 % 1000} of the {colours[i % 7]} set?",
               "response": f"Answer {i}: it is {colours[(i * 3) % 7]} {i}."}
        if label_every:
            row["label"] = "rare" if i % label_every == 0 else "common"
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Invalid rows: error lists the first and counts the rest; skip leaves them out and records each one


@pytest.fixture()
def corrupted(tmp_path: Path) -> Path:
    rows = [json.dumps(r) for r in qa_rows(12)]
    rows[2] = '{"prompt": "broken", "response": }'
    rows[5] = json.dumps({"prompt": "no response here"})
    rows[8] = json.dumps({"prompt": "   ", "response": "blank prompt"})
    return write_jsonl(tmp_path / "train.jsonl", rows)


def test_invalid_rows_stop_the_pipeline_with_the_first_and_a_count(corrupted: Path) -> None:
    with pytest.raises(TunelabError) as info:
        run_pipeline(data_cfg(train=str(corrupted)), seed=0)
    msg = str(info.value)
    assert msg.startswith(f"{corrupted}:3: malformed JSON")
    assert "2 more problems" in msg and "tunelab data check" in msg and "on_invalid: skip" in msg
    assert "\n" not in msg


def test_skip_leaves_invalid_rows_out_and_names_each(corrupted: Path) -> None:
    result = run_pipeline(data_cfg(train=str(corrupted), on_invalid="skip"), seed=0)
    assert len(result.splits["train"]) == 9
    assert [(r.source, r.step) for r in result.removed] == [
        (f"{corrupted}:3", "invalid"), (f"{corrupted}:6", "invalid"), (f"{corrupted}:9", "invalid")]
    assert "response: missing field" in result.removed[1].reason
    assert "prompt: empty" in result.removed[2].reason
    assert result.steps[0] == {"step": "read", "rows": 12, "invalid": 3, "valid": 9}
    assert "skipped 3 invalid" in result.warnings[0]


# ----------------------------------------------------------------------------------------------------------------------
# Dedupe: exact and near, keep-first, leakage across splits


def test_dedupe_removes_exact_and_near_duplicates_keeping_the_first(tmp_path: Path) -> None:
    rows = qa_rows(10)
    exact = {**rows[3], "prompt": "  " + rows[3]["prompt"].upper() + " "}  # same after normalization
    near = {**rows[6], "prompt": rows[6]["prompt"].replace("colour", "color")}
    path = write_jsonl(tmp_path / "train.jsonl", rows + [exact, near])
    result = run_pipeline(data_cfg(train=str(path), dedupe={"exact": True, "near": True, "threshold": 0.85}), seed=0)
    assert [r.line for r in result.splits["train"]] == list(range(1, 11))
    assert [(r.source, r.reason) for r in result.removed] == [
        (f"{path}:11", f"exact duplicate of {path}:4"),
        (f"{path}:12", f"near duplicate of {path}:7 (similarity >= 0.85)"),
    ]
    assert result.steps[-1] == {"step": "dedupe", "exact": 1, "near": 1, "leakage_removed": 0}


def test_without_dedupe_duplicates_and_leakage_are_warned_about(tmp_path: Path) -> None:
    rows = qa_rows(8)
    train = write_jsonl(tmp_path / "train.jsonl", rows + [rows[0]])
    val = write_jsonl(tmp_path / "val.jsonl", [rows[5]])
    result = run_pipeline(data_cfg(train=str(train), validation=str(val)), seed=0)
    assert len(result.splits["train"]) == 9 and not result.removed
    assert any(f"{train}:9 repeats {train}:1" in w for w in result.warnings)
    assert any("1 training row(s) also appear in validation/test" in w for w in result.warnings)


def test_training_rows_leaking_into_given_eval_files_are_removed_from_train(tmp_path: Path) -> None:
    rows = qa_rows(10)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    other = {"prompt": "Translate 'good morning' into French.", "response": "Bonjour."}
    val = write_jsonl(tmp_path / "val.jsonl", [rows[2], other])
    near_twin = {**rows[7], "response": rows[7]["response"] + " Yes."}
    test = write_jsonl(tmp_path / "test.jsonl", [near_twin])
    result = run_pipeline(data_cfg(train=str(train), validation=str(val), test=str(test), dedupe={"near": True}), seed=0)
    assert [r.line for r in result.splits["train"]] == [1, 2, 4, 5, 6, 7, 9, 10]
    assert {r.source: r.reason for r in result.removed} == {
        f"{train}:3": f"leaks into validation/test: twin of {val}:1",
        f"{train}:8": f"leaks into validation/test: twin of {test}:1",
    }
    assert len(result.splits["validation"]) == 2 and len(result.splits["test"]) == 1


# ----------------------------------------------------------------------------------------------------------------------
# Splits


@given(n=st.integers(0, 500), fractions=st.sampled_from([(0.7, 0.15, 0.15), (0.8, 0.1, 0.1), (0.5, 0.5, 0.0), (1.0, 0.0, 0.0)]))
def test_target_counts_are_within_one_row_and_add_up(n: int, fractions: tuple) -> None:
    counts = target_counts(n, list(fractions))
    assert sum(counts) == n
    assert all(abs(c - n * f) < 1 for c, f in zip(counts, fractions))


def _records(rows: list[dict]) -> list[Record]:
    return [Record("f.jsonl", i + 1, r) for i, r in enumerate(rows)]


def test_stratified_split_keeps_label_proportions_and_sizes() -> None:
    recs = _records(qa_rows(200, label_every=10))  # 20 rare, 180 common
    parts = split_rows(recs, [0.7, 0.15, 0.15], seed=3, stratify="label")
    assert [len(p) for p in parts] == [140, 30, 30]
    rare = [sum(r.row["label"] == "rare" for r in p) for p in parts]
    assert all(abs(got - want) <= 1 for got, want in zip(rare, [14, 3, 3]))
    assert sorted(r.line for p in parts for r in p) == list(range(1, 201))


def test_split_is_seeded() -> None:
    recs = _records(qa_rows(50))
    assert split_rows(recs, [0.7, 0.15, 0.15], seed=1) == split_rows(recs, [0.7, 0.15, 0.15], seed=1)
    assert split_rows(recs, [0.7, 0.15, 0.15], seed=1) != split_rows(recs, [0.7, 0.15, 0.15], seed=2)


def test_grouped_split_never_separates_a_group() -> None:
    rows = [{**r, "customer": f"c{i // 4}"} for i, r in enumerate(qa_rows(80))]  # 20 customers of 4 rows
    parts = split_rows(_records(rows), [0.7, 0.15, 0.15], seed=0, group="customer")
    owners = {}
    for j, part in enumerate(parts):
        for r in part:
            assert owners.setdefault(r.row["customer"], j) == j
    assert [len(p) for p in parts] == [56, 12, 12]


def test_split_config_writes_three_splits_and_rejects_an_unknown_stratify_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", qa_rows(100, label_every=5))
    result = run_pipeline(data_cfg(train=str(path), split={"stratify": "label", "seed": 1}), seed=0)
    assert {k: len(v) for k, v in result.splits.items()} == {"train": 70, "validation": 15, "test": 15}
    assert result.label_field == "label"
    with pytest.raises(TunelabError, match="data.split.stratify: no row has the field 'topic'"):
        run_pipeline(data_cfg(train=str(path), split={"stratify": "topic"}), seed=0)


# ----------------------------------------------------------------------------------------------------------------------
# PII and the system prompt


def test_pii_is_replaced_in_every_field_and_counted(tmp_path: Path) -> None:
    rows = qa_rows(4)
    rows[1]["prompt"] = "Email jane.roe@example.org or call +1 415 555 2671 about card 4111 1111 1111 1111."
    rows[2]["response"] = "Server 192.168.10.4 answered; IBAN DE89 3704 0044 0532 0130 00 is on file."
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    result = run_pipeline(data_cfg(train=str(path), pii=True), seed=0)
    text = json.dumps([r.row for r in result.splits["train"]])
    for planted in ("jane.roe@example.org", "555 2671", "4111 1111", "192.168.10.4", "DE89"):
        assert planted not in text
    assert result.steps[-1]["found"] == {"email": 1, "phone": 1, "credit_card": 1, "ip": 1, "iban": 1, "url_credentials": 0}
    assert result.steps[-1]["rows_changed"] == 2


def test_system_prompt_is_added_where_a_conversation_has_none() -> None:
    rec = Record("f.jsonl", 1, {"prompt": "hi", "response": "hello"})
    ex = to_example(rec, "prompt_response", system_prompt="Be brief.")
    assert ex.messages[0] == {"role": "system", "content": "Be brief."}
    own = Record("f.jsonl", 2, {"prompt": "hi", "response": "hello", "system": "Mine."})
    assert to_example(own, "prompt_response", system_prompt="Be brief.").messages[0]["content"] == "Mine."


# ----------------------------------------------------------------------------------------------------------------------
# The cache


def test_second_prepare_is_a_cache_hit_with_identical_tokens(tmp_path: Path, tiny_tokenizer) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", qa_rows(30))
    cfg = data_cfg(train=str(path), validation=0.2, max_length=64)
    first = prepare_data(cfg, tiny_tokenizer, seed=0)
    second = prepare_data(cfg, tiny_tokenizer, seed=0)
    assert not first.cache_hit and second.cache_hit
    assert isinstance(second.train, EncodedTable)
    assert list(second.train) == list(first.train) and list(second.validation) == list(first.validation)
    assert second.train.lengths() == [len(e.input_ids) for e in first.train]
    assert second.report == first.report
    # Any change to the bytes, the settings or the seed is a miss.
    path.write_text(path.read_text().replace("Answer 3", "Answer three"))
    assert not prepare_data(cfg, tiny_tokenizer, seed=0).cache_hit
    assert not prepare_data(cfg, tiny_tokenizer, seed=1).cache_hit
    assert not prepare_data(data_cfg(train=str(path), validation=0.2, max_length=65), tiny_tokenizer, seed=0).cache_hit
    assert not prepare_data(data_cfg(train=str(path), validation=0.2, max_length=64, cache=False), tiny_tokenizer, seed=0).cache_hit


def test_packed_rows_round_trip_through_the_cache(tmp_path: Path, tiny_tokenizer) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", qa_rows(30))
    cfg = data_cfg(train=str(path), packing=True, max_length=128)
    first, second = prepare_data(cfg, tiny_tokenizer, seed=0), prepare_data(cfg, tiny_tokenizer, seed=0)
    assert second.cache_hit and list(second.train) == list(first.train)
    assert all(e.position_ids is not None for e in second.train)


def test_rows_that_cannot_be_tokenized_follow_on_invalid(tmp_path: Path, tiny_tokenizer) -> None:
    rows = qa_rows(6)
    rows[4]["prompt"] = "word " * 200  # the prompt alone is over max_length
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(TunelabError, match=rf"^{path}:5: the prompt alone is \d+ tokens"):
        prepare_data(data_cfg(train=str(path), max_length=64), tiny_tokenizer, seed=0)
    data = prepare_data(data_cfg(train=str(path), max_length=64, on_invalid="skip"), tiny_tokenizer, seed=0)
    assert data.train_examples == 5
    removed = [json.loads(line) for line in (data.files / "removed_rows.jsonl").read_text().splitlines()]
    assert [(r["source"], r["step"]) for r in removed] == [(f"{path}:5", "tokenize")]
    assert "5" not in {Path(r["_source"]).name.split(":")[-1] for r in map(json.loads, (data.files / "train.jsonl").read_text().splitlines())}


# ----------------------------------------------------------------------------------------------------------------------
# Property: arbitrary rows never crash the pipeline, and every valid unique row ends up in a split


row_strategy = st.one_of(
    st.fixed_dictionaries({"prompt": st.text(max_size=40), "response": st.text(max_size=40)}),
    st.fixed_dictionaries({"prompt": st.text(max_size=40)}),
    st.dictionaries(st.sampled_from(["prompt", "response", "label", "x"]), st.none() | st.integers() | st.text(max_size=10),
                    max_size=4),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(row_strategy, min_size=1, max_size=25), split=st.booleans())
def test_pipeline_never_crashes_and_never_loses_a_valid_unique_row(tmp_path: Path, rows: list[dict], split: bool) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = data_cfg(train=str(path), format="prompt_response", on_invalid="skip", clean=True, pii=True, dedupe=True,
                   split={"seed": 0} if split else None)
    try:
        result = run_pipeline(cfg, seed=0)
    except TunelabError as exc:
        assert "\n" not in str(exc)
        assert "no training rows left" in str(exc) or "contain no rows" in str(exc) or str(path) in str(exc)
        return
    kept = Counter(r.where for rows in result.splits.values() for r in rows)
    removed = Counter(r.source for r in result.removed)
    for line in range(1, len(rows) + 1):
        where = f"{path}:{line}"
        assert kept[where] + removed[where] == 1, where  # every row is either kept or removed with a reason, once
    # Valid rows with distinct content are never removed.
    seen = set()
    for line, row in enumerate(rows, start=1):
        ok = isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str) and row["prompt"].strip() and row["response"].strip()
        if not ok:
            continue
        key = dedupe_key(example_text(to_example(Record(str(path), line, row), "prompt_response")))
        if key not in seen and kept[f"{path}:{line}"] == 0:
            reason = next(r for r in result.removed if r.source == f"{path}:{line}")
            assert reason.step in ("clean", "dedupe"), reason  # cleaning/PII can make two rows equal or a field empty
        seen.add(key)


# ----------------------------------------------------------------------------------------------------------------------
# bench/data_quality.py: planted corruption in the shipped demo data is all found (keeps the script from rotting)


def test_every_planted_problem_in_real_rows_is_found(monkeypatch, capsys) -> None:
    import importlib.util
    import sys

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("data_quality", root / "bench" / "data_quality.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["data_quality.py", "--data", str(root / "src/tunelab/demo/data/train.jsonl"), "--per-kind", "5"])
    assert bench.main() == 0, capsys.readouterr().out
    assert "PASS: every planted problem found" in capsys.readouterr().out


def test_paraphrases_come_from_the_configured_model(tmp_path: Path, tiny_model_dir: Path, tiny_tokenizer, monkeypatch) -> None:
    from tunelab.data import augment

    calls = []

    def fake_paraphrase(prompts, model, tokenizer, *, seed, temperature):
        calls.append((type(model).__name__, seed, temperature))
        return [f"Rewritten: {p}" if i % 2 == 0 else None for i, p in enumerate(prompts)]

    monkeypatch.setattr(augment, "paraphrase", fake_paraphrase)
    path = write_jsonl(tmp_path / "train.jsonl", qa_rows(6))
    cfg = data_cfg(train=str(path), max_length=128, augment={"paraphrase": 2, "model": str(tiny_model_dir), "temperature": 0.5})
    data = prepare_data(cfg, tiny_tokenizer, seed=4)
    assert calls == [("LlamaForCausalLM", 4, 0.5), ("LlamaForCausalLM", 5, 0.5)]
    step = data.report["steps"][-1]
    assert (step["paraphrase"], step["paraphrase_rejected"]) == (6, 6)
    rows = [json.loads(line) for line in (data.files / "train.jsonl").read_text().splitlines()]
    marked = [r for r in rows if r.get("_augmented") == "paraphrase"]
    assert len(rows) == 12 and len(marked) == 6 and all(r["prompt"].startswith("Rewritten: Question") for r in marked)
    assert all(r["response"] == qa_rows(6)[int(r["_source"].rsplit(":", 1)[1]) - 1]["response"] for r in marked)
    with pytest.raises(TunelabError, match="model"):
        prepare_data(data_cfg(train=str(path), augment={"paraphrase": 1, "model": str(tmp_path / "nope")}), tiny_tokenizer, seed=0)


def test_eda_rows_are_added_to_train_only_and_marked(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", qa_rows(40))
    result = run_pipeline(data_cfg(train=str(path), split={"seed": 0}, augment={"eda": 2}), seed=0)
    step = result.steps[-1]
    train = result.splits["train"]
    assert len(train) == 28 + step["eda"] and step["eda"] + step["eda_unchanged"] == 56 and step["eda"] > 40
    assert all("_augmented" not in r.row for r in result.splits["validation"] + result.splits["test"])
    originals = {r.where: r.row for r in train if "_augmented" not in r.row}
    for r in train:
        if r.row.get("_augmented") == "eda":
            assert r.row["response"] == originals[r.where]["response"] and r.row["prompt"] != originals[r.where]["prompt"]
