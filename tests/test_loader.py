"""SQuAD-format loading: valid files in both layouts and every malformed-input case."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_xqa.data.loader import load_squad
from dist_xqa.data.records import Answer, DataError

CONTEXT = "The river Rhine flows through Basel. Basel lies on the Rhine."


def qa(qid: str, question: str = "Where?", answers=None) -> dict:
    if answers is None:
        answers = [{"text": "Basel", "answer_start": CONTEXT.index("Basel")}]
    return {"id": qid, "question": question, "answers": answers}


def squad(*qas_per_article: list[dict], context: str = CONTEXT) -> dict:
    return {
        "version": "1.1",
        "data": [
            {"title": f"article{i}", "paragraphs": [{"context": context, "qas": list(qas)}]}
            for i, qas in enumerate(qas_per_article)
        ],
    }


def write(tmp_path: Path, document, name: str = "set.en.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    return path


def test_valid_file_loads_every_field(tmp_path):
    path = write(tmp_path, squad([qa("a1"), qa("a2", "Which river?", [{"text": "Rhine", "answer_start": 10}])], [qa("b1")]))
    examples, report = load_squad(path, "de")
    assert [e.id for e in examples] == ["a1", "a2", "b1"]
    assert [e.article_index for e in examples] == [0, 0, 1]
    assert [e.title for e in examples] == ["article0", "article0", "article1"]
    second = examples[1]
    assert (second.question, second.context) == ("Which river?", CONTEXT)
    assert second.answers == (Answer("Rhine", 10),)
    assert {(e.question_lang, e.context_lang) for e in examples} == {("de", "de")}
    assert (report.kept, report.n_rejected, report.n_repaired) == (3, 0, 0)
    assert report.source == str(path)


def test_json_lines_one_article_per_line(tmp_path):
    # A raw U+2028 inside a string is valid JSON and must not split the line.
    articles = squad([qa("a1", "Where\u2028now?")], [qa("b1"), qa("b2")])["data"]
    lines = [json.dumps(article, ensure_ascii=False) for article in articles]
    path = tmp_path / "set.jsonl"
    path.write_bytes((lines[0] + "\r\n\r\n" + lines[1] + "\r\n").encode("utf-8"))
    examples, report = load_squad(path, "en")
    assert [(e.id, e.article_index) for e in examples] == [("a1", 0), ("b1", 1), ("b2", 1)]
    assert examples[0].question == "Where\u2028now?"
    assert report.kept == 3


def test_malformed_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"data": [\n  {"title": "x",\n   "paragraphs": [}\n]}', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json: malformed JSON at line 3, column 19"):
        load_squad(path, "en")


def test_malformed_json_lines_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(squad([qa("a1")])["data"][0])
    path.write_text(good + "\n" + good.replace('"qas"', "qas", 1) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2: malformed JSON at column \d+"):
        load_squad(path, "en")


def test_non_utf8_bytes_are_fatal_with_byte_offset(tmp_path):
    path = write(tmp_path, squad([qa("a1")]))
    raw = path.read_bytes()
    offset = raw.index(b"river")
    path.write_bytes(raw[:offset] + b"\xff" + raw[offset + 1 :])
    with pytest.raises(DataError, match=rf"set\.en\.json: not UTF-8: byte offset {offset} \(line 1\)"):
        load_squad(path, "en")


@pytest.mark.parametrize(
    "document, message",
    [
        ({"version": "1.1"}, r"set\.en\.json: missing field 'data'"),
        ({"data": [{"title": "t"}]}, r"article 0: missing field 'paragraphs'"),
        ({"data": [{"paragraphs": [{"qas": []}]}]}, r"article 0, paragraph 0: missing field 'context'"),
        ({"data": [{"paragraphs": [{"context": "c", "qas": [{"question": "q"}]}]}]},
         r"article 0, paragraph 0, question 0: missing field 'id'"),
        ({"data": [{"paragraphs": [{"context": 3, "qas": []}]}]}, r"field 'context' must be str, got int"),
        ({"data": [{"paragraphs": [{"context": "c", "qas": ["q"]}]}]}, r"question 0: expected a JSON object"),
    ],
)
def test_missing_structure_is_fatal_and_names_the_position(tmp_path, document, message):
    with pytest.raises(DataError, match=message):
        load_squad(write(tmp_path, document), "en")


def test_missing_or_empty_question_fields_are_rejected_by_reason(tmp_path):
    document = squad(
        [
            {"id": "no_question", "answers": [{"text": "Basel", "answer_start": 30}]},
            {"id": "no_answers", "question": "Where?"},
            qa("empty_answers", answers=[]),
            qa("blank_question", question="  \n"),
            qa("answer_without_start", answers=[{"text": "Basel"}]),
            qa("answer_start_is_bool", answers=[{"text": "Basel", "answer_start": True}]),
            qa("good"),
        ]
    )
    examples, report = load_squad(write(tmp_path, document), "en")
    assert [e.id for e in examples] == ["good"]
    assert dict(report.rejected) == {
        "missing_question": ["no_question"],
        "missing_answers": ["no_answers"],
        "no_answers": ["empty_answers"],
        "empty_question": ["blank_question"],
        "answer_invalid": ["answer_without_start", "answer_start_is_bool"],
    }
    assert report.kept == 1


def test_empty_context_rejects_each_of_its_questions(tmp_path):
    document = squad([qa("x1", answers=[{"text": "a", "answer_start": 0}]), qa("x2")], context="   ")
    examples, report = load_squad(write(tmp_path, document), "en")
    assert examples == []
    assert dict(report.rejected) == {"empty_context": ["x1", "x2"]}


def test_duplicate_ids_keep_the_first(tmp_path):
    document = squad([qa("a1", "first")], [qa("a1", "second"), qa("a2")])
    examples, report = load_squad(write(tmp_path, document), "en")
    assert [(e.id, e.question) for e in examples] == [("a1", "first"), ("a2", "Where?")]
    assert dict(report.rejected) == {"duplicate_id": ["a1"]}


def test_shifted_answer_start_is_repaired_to_the_nearest_occurrence(tmp_path):
    first, second = CONTEXT.index("Basel"), CONTEXT.rindex("Basel")  # 30 and 37
    document = squad(
        [
            qa("shift_left", answers=[{"text": "Basel", "answer_start": first + 3}]),
            qa("near_second", answers=[{"text": "Basel", "answer_start": second - 2}]),
        ]
    )
    examples, report = load_squad(write(tmp_path, document), "en")
    assert [e.answers[0].answer_start for e in examples] == [first, second]
    for e in examples:
        start = e.answers[0].answer_start
        assert e.context[start : start + 5] == "Basel"
    assert dict(report.repaired) == {"answer_start_repaired": ["shift_left", "near_second"]}
    assert report.n_rejected == 0


def test_answer_beyond_the_window_is_dropped_and_the_example_rejected(tmp_path):
    document = squad(
        [
            qa("far", answers=[{"text": "Rhine", "answer_start": 20}]),  # really at 10 and 55
            qa("absent", answers=[{"text": "Zurich", "answer_start": 3}]),
            qa("past_end", answers=[{"text": "Zurich", "answer_start": 500}]),
            qa("negative", answers=[{"text": "Zurich", "answer_start": -4}]),
        ]
    )
    examples, report = load_squad(write(tmp_path, document), "en", repair_window=5)
    assert examples == []
    assert dict(report.rejected) == {
        "answer_mismatch": ["far", "absent"],
        "answer_out_of_range": ["past_end", "negative"],
    }


def test_out_of_range_start_is_repaired_when_the_text_is_in_the_window(tmp_path):
    end = len(CONTEXT)
    document = squad([qa("late", answers=[{"text": "Rhine.", "answer_start": end - 3}])])
    examples, report = load_squad(write(tmp_path, document), "en")
    assert examples[0].answers == (Answer("Rhine.", end - 6),)
    assert dict(report.repaired) == {"answer_start_repaired": ["late"]}


def test_window_size_decides_between_repair_and_drop(tmp_path):
    document = squad([qa("off_by_4", answers=[{"text": "Basel", "answer_start": 26}])])
    path = write(tmp_path, document)
    assert load_squad(path, "en", repair_window=4)[0][0].answers == (Answer("Basel", 30),)
    examples, report = load_squad(path, "en", repair_window=3)
    assert examples == [] and dict(report.rejected) == {"answer_mismatch": ["off_by_4"]}


def test_one_bad_answer_among_several_is_dropped_and_reported(tmp_path):
    answers = [
        {"text": "Zurich", "answer_start": 0},
        {"text": "Basel", "answer_start": 30},
        {"text": "the Rhine", "answer_start": 49},  # really at 51
    ]
    examples, report = load_squad(write(tmp_path, squad([qa("multi", answers=answers)])), "en")
    assert examples[0].answers == (Answer("Basel", 30), Answer("the Rhine", 51))
    assert dict(report.repaired) == {"answer_start_repaired": ["multi"], "answer_dropped": ["multi"]}
    assert report.n_rejected == 0 and report.kept == 1


def test_summary_lists_reasons_with_ids(tmp_path):
    document = squad([qa("a1"), qa("a1"), qa("q", question="")])
    _, report = load_squad(write(tmp_path, document), "en")
    summary = report.summary()
    assert "kept 1, rejected 2" in summary
    assert "rejected duplicate_id: 1 (a1)" in summary and "rejected empty_question: 1 (q)" in summary
