"""Answer recovery through a user-supplied translator, with a word-by-word toy translator
and translators that damage the markers."""
from __future__ import annotations

import re
from dataclasses import replace

import pytest

from dist_xqa.data.records import Answer, QAExample
from dist_xqa.data.recovery import mark_answer, recover_answers, recover_span, strip_markers

EN_ES = {
    "Paris": "París", "is": "es", "the": "la", "capital": "capital", "of": "de",
    "France": "Francia", "The": "El", "river": "río", "Seine": "Sena", "flows": "fluye",
    "through": "por", "Which": "Qué", "What": "Cuál", "city": "ciudad", "country": "país",
}
CONTEXT = "Paris is the capital of France. The river Seine flows through Paris."


def word_by_word(text: str) -> str:
    """Deterministic toy MT: each word through the dictionary, everything else kept."""
    return re.sub(r"\w+", lambda m: EN_ES.get(m.group(), m.group()), text)


def toy_translate(texts, src, tgt):
    assert (src, tgt) == ("en", "es")
    return [word_by_word(t) for t in texts]


def damaging(damage):
    """A translator that applies `damage` to each marked passage after translating it."""
    return lambda texts, src, tgt: [damage(t) if "[[" in t else t for t in toy_translate(texts, src, tgt)]


def lose_close(t):
    return t.replace("]]", "")


def echo(t):  # MT repeating a phrase, markers included
    return t + " " + t[t.index("[[") : t.index("]]") + 2]


def swap(t):
    return t.replace("[[", "\0").replace("]]", "[[").replace("\0", "]]")


def empty_markers(t):
    return re.sub(r"\[\[ (.*?) \]\]", r"\1 [[ ]]", t)


def example(qid: str, question: str, answer: str, occurrence: int = 0, context: str = CONTEXT) -> QAExample:
    starts = [m.start() for m in re.finditer(re.escape(answer), context)]
    return QAExample(
        id=qid, question=question, context=context, answers=(Answer(answer, starts[occurrence]),),
        question_lang="en", context_lang="en", title="Paris", article_index=3,
    )


EXAMPLES = [
    example("river", "Which river flows through Paris?", "The river Seine"),
    example("capital", "What is the capital of France?", "Paris"),
    example("country", "Paris is the capital of which country?", "France"),
    example("city_late", "Which city?", "Paris", occurrence=1),
]


def test_mark_answer_wraps_the_span_with_spaced_markers():
    ex = EXAMPLES[2]
    assert mark_answer(ex.context, ex.answers[0]) == (
        "Paris is the capital of [[ France ]]. The river Seine flows through Paris."
    )


def test_word_by_word_translation_recovers_every_span():
    recovered, report = recover_answers(EXAMPLES, toy_translate, "en", "es")
    assert (report.kept, report.n_rejected, report.n_repaired) == (4, 0, 0)
    expected_context = "París es la capital de Francia. El río Sena fluye por París."
    by_id = {ex.id: ex for ex in recovered}
    assert [ex.id for ex in recovered] == [ex.id for ex in EXAMPLES]
    for original in EXAMPLES:
        ex = by_id[original.id]
        (answer,) = ex.answers
        assert ex.context == expected_context
        assert answer.text == word_by_word(original.answers[0].text)
        assert ex.context[answer.answer_start : answer.answer_start + len(answer.text)] == answer.text
        assert ex.question == word_by_word(original.question)
        assert (ex.question_lang, ex.context_lang) == ("es", "es")
        assert (ex.title, ex.article_index) == ("Paris", 3)
    # The second "Paris" is recovered as the second "París", not the first.
    assert by_id["capital"].answers[0].answer_start == 0
    assert by_id["city_late"].answers[0].answer_start == expected_context.rindex("París")


def test_each_distinct_text_is_translated_once_in_one_call():
    calls = []

    def counting(texts, src, tgt):
        calls.append(list(texts))
        return toy_translate(texts, src, tgt)

    same_span = [example("q1", "Which city?", "Paris"), example("q2", "Which city?", "Paris")]
    recovered, _ = recover_answers(same_span, counting, "en", "es")
    assert len(recovered) == 2
    assert calls == [[mark_answer(CONTEXT, same_span[0].answers[0]), "Which city?"]]


@pytest.mark.parametrize(
    "damage, reason",
    [(lose_close, "markers_lost"), (echo, "markers_duplicated"), (swap, "markers_reordered"),
     (empty_markers, "empty_answer")],
)
def test_damaged_markers_reject_the_example_with_the_reason(damage, reason):
    recovered, report = recover_answers(EXAMPLES, damaging(damage), "en", "es")
    assert recovered == []
    assert dict(report.rejected) == {reason: [ex.id for ex in EXAMPLES]}
    assert report.kept == 0


def test_damage_to_some_examples_keeps_the_others():
    def damage_the_river(texts, src, tgt):
        return [swap(t) if "[[ El río Sena ]]" in t else t for t in toy_translate(texts, src, tgt)]

    recovered, report = recover_answers(EXAMPLES, damage_the_river, "en", "es")
    assert [ex.id for ex in recovered] == ["capital", "country", "city_late"]
    assert dict(report.rejected) == {"markers_reordered": ["river"]}


def test_recover_span_for_one_context_with_custom_markers():
    span = recover_span(CONTEXT, Answer("Seine", 42), toy_translate, "en", "es", markers=("<<", ">>"))
    assert span.failure is None
    assert span.answer == Answer("Sena", span.context.index("Sena"))
    assert span.context == word_by_word(CONTEXT)
    lost = recover_span(CONTEXT, Answer("Seine", 42), damaging(lose_close), "en", "es")
    assert (lost.failure, lost.answer) == ("markers_lost", None)


def test_strip_markers_reasons():
    assert strip_markers("a [[ b ]] c").answer == Answer("b", 2)
    assert strip_markers("a [[ b c").failure == "markers_lost"
    assert strip_markers("a [[ b ]] [[ c").failure == "markers_duplicated"
    assert strip_markers("a ]] b [[ c").failure == "markers_reordered"
    assert strip_markers("a [[  ]] c").failure == "empty_answer"


def test_source_text_holding_a_marker_is_rejected():
    odd = example("odd", "Which city?", "Paris", context="[[note]] Paris is big.")
    recovered, report = recover_answers([odd, EXAMPLES[1]], toy_translate, "en", "es")
    assert [ex.id for ex in recovered] == ["capital"]
    assert dict(report.rejected) == {"marker_in_text": ["odd"]}


def test_only_the_first_of_several_answers_is_carried_over_and_reported():
    ex = example("two", "Which city?", "Paris")
    two = replace(ex, answers=(ex.answers[0], Answer("Paris", CONTEXT.rindex("Paris"))))
    recovered, report = recover_answers([two], toy_translate, "en", "es")
    assert recovered[0].answers == (Answer("París", 0),)
    assert dict(report.repaired) == {"answers_after_first_dropped": ["two"]}


def test_a_question_translated_to_nothing_is_rejected():
    def blank_questions(texts, src, tgt):
        return [t if "[[" in t else " " for t in toy_translate(texts, src, tgt)]

    recovered, report = recover_answers(EXAMPLES[:2], blank_questions, "en", "es")
    assert recovered == [] and dict(report.rejected) == {"empty_question": ["river", "capital"]}


def test_translator_and_input_errors_are_clear():
    with pytest.raises(ValueError, match=r"must return one string per input: got 1 outputs for 2 texts"):
        recover_answers(EXAMPLES[:1], lambda texts, s, t: ["x"], "en", "es")
    with pytest.raises(ValueError, match=r"example 'river' is in 'en'/'en', expected source language 'de'"):
        recover_answers(EXAMPLES[:1], toy_translate, "de", "es")
    with pytest.raises(ValueError, match="markers must be two non-empty strings"):
        mark_answer(CONTEXT, Answer("Paris", 0), markers=("@", "@"))
