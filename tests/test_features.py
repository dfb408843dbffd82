from __future__ import annotations

import subprocess
import sys

import pytest

from dist_xqa.data.features import (
    TokenizerSettings, build_features, feature_id, load_features, save_features,
)
from dist_xqa.data.records import Answer, QAExample
from dist_xqa.data.tokenizer import train_tokenizer

LONG_CONTEXT = " ".join(f"Person{i} was born in City{i} in {1800 + i}." for i in range(12))
ACCENTED = "El pintor José Núñez nació en Múnich en 1873. Die Lieblingsfarbe von Jürgen war Grün."
CJK = "東京は日本の首都です。富士山は高い山です。"
TEXTS = [LONG_CONTEXT, ACCENTED, CJK, "Where was Person3 born? ¿Dónde nació? 富士山は?"] * 2


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(TEXTS, tmp_path_factory.mktemp("tok"), vocab_size=200)


def settings(tok, max_length=32, doc_stride=8):
    return TokenizerSettings.from_tokenizer(tok, "tiny", max_length, doc_stride)


def example(context, answer, qid="q1", question="Where?", occurrence=0, langs=("en", "en")):
    start = -1
    for _ in range(occurrence + 1):
        start = context.index(answer, start + 1)
    return QAExample(qid, question, context, (Answer(answer, start),), *langs)


def answer_text(row, context):
    offsets = row["offsets"]
    return context[offsets[row["start_positions"]][0]:offsets[row["end_positions"]][1]]


def window_chars(row):
    spans = [o for o in row["offsets"] if o != [-1, -1]]
    return spans[0][0], spans[-1][1]


def check_labels(ds, ex):
    """Every window holding the whole answer labels it exactly; every other labels CLS."""
    a = ex.answers[0]
    labelled = 0
    for row in ds:
        first, last = window_chars(row)
        if first <= a.answer_start and a.answer_start + len(a.text) <= last:
            assert row["start_positions"] > 0
            assert answer_text(row, ex.context) == a.text
            labelled += 1
        else:
            assert (row["start_positions"], row["end_positions"]) == (0, 0)
    return labelled


@pytest.mark.parametrize("context,answer", [
    (ACCENTED, "José Núñez"), (ACCENTED, "Grün"), (ACCENTED, "Múnich"),
    (CJK, "富士山"), (CJK, "東京"), (LONG_CONTEXT, "City11"), (LONG_CONTEXT, "Person0"),
])
def test_labels_round_trip_to_the_answer(tok, context, answer):
    ex = example(context, answer)
    ds = build_features([ex], tok, settings(tok))
    assert check_labels(ds, ex) >= 1


def test_multi_window_context_labels_every_answer_in_exactly_the_windows_holding_it(tok):
    ds = build_features([example(LONG_CONTEXT, "Person0")], tok, settings(tok))
    assert len(ds) >= 4 and list(ds["window"]) == list(range(len(ds)))
    for word in [w.strip(".") for w in LONG_CONTEXT.split()][::3]:
        ex = example(LONG_CONTEXT, word)
        assert check_labels(build_features([ex], tok, settings(tok)), ex) >= 1


def test_answers_at_window_edges(tok):
    ds = build_features([example(LONG_CONTEXT, "Person0")], tok, settings(tok))
    w0, w1 = ds[0], ds[1]
    last = max(t for t, o in enumerate(w0["offsets"]) if o != [-1, -1])
    first = min(t for t, o in enumerate(w1["offsets"]) if o != [-1, -1])
    # The last context token of window 0 and the first of window 1, as one-token answers.
    for window, position in ((0, last), (1, first)):
        start, end = ds[window]["offsets"][position]
        ex = QAExample("q1", "Where?", LONG_CONTEXT, (Answer(LONG_CONTEXT[start:end], start),), "en", "en")
        row = build_features([ex], tok, settings(tok))[window]
        assert (row["start_positions"], row["end_positions"]) == (position, position)
    # An answer running one character past the end of window 0 is CLS there, labelled in
    # window 1 (which holds it, widened to whole tokens).
    start, end = w0["offsets"][last][0], w0["offsets"][last][1] + 1
    ex = QAExample("q1", "Where?", LONG_CONTEXT, (Answer(LONG_CONTEXT[start:end], start),), "en", "en")
    built = build_features([ex], tok, settings(tok))
    assert (built[0]["start_positions"], built[0]["end_positions"]) == (0, 0)
    assert built[1]["start_positions"] == w1["offsets"].index(w0["offsets"][last])
    assert answer_text(built[1], LONG_CONTEXT).startswith(LONG_CONTEXT[start:end].rstrip())


def test_answer_outside_window_and_no_answer_label_cls(tok):
    ex = example(LONG_CONTEXT, "City11")
    row = build_features([ex], tok, settings(tok))[0]
    assert (row["start_positions"], row["end_positions"]) == (0, 0)
    bare = QAExample("q2", "Where?", ACCENTED, (), "en", "es")
    assert {(r["start_positions"], r["end_positions"]) for r in build_features([bare], tok, settings(tok))} == {(0, 0)}


def test_mask_offsets_and_padding(tok):
    s = settings(tok, max_length=48, doc_stride=8)
    ds = build_features([example(ACCENTED, "Grün"), example(LONG_CONTEXT, "City3", qid="q2")], tok, s)
    for row in ds:
        n = s.max_length
        assert all(len(row[c]) == n for c in ("input_ids", "attention_mask", "token_type_ids",
                                              "offsets", "answer_mask"))
        ids = row["input_ids"]
        context = [t for t in range(n) if row["token_type_ids"][t] == 1 and ids[t] != tok.sep_token_id
                   and row["attention_mask"][t] == 1]
        assert [t for t in range(n) if row["answer_mask"][t]] == [0] + context
        assert [t for t in range(n) if row["offsets"][t] != [-1, -1]] == context
        assert ids[0] == tok.cls_token_id
        assert all(ids[t] == tok.pad_token_id for t in range(n) if row["attention_mask"][t] == 0)


def test_feature_ids_stable_unique_and_order_independent(tok):
    exs = [example(LONG_CONTEXT, "City3", qid=q, langs=langs)
           for q in ("a", "b") for langs in (("en", "en"), ("en", "de"), ("de", "en"))]
    s = settings(tok)
    forward = build_features(exs, tok, s)
    backward = build_features(exs[::-1], tok, s)
    key = lambda r: (r["example_id"], r["question_lang"], r["context_lang"], r["window"])
    assert {key(r): r["feature_id"] for r in forward} == {key(r): r["feature_id"] for r in backward}
    assert len(set(forward["feature_id"])) == len(forward)
    assert all(0 <= f < 2**63 for f in forward["feature_id"])
    # Another process (another str hash seed) computes the same id.
    code = ("from dist_xqa.data.features import feature_id; "
            "print(feature_id(('a', 'en', 'de'), 2))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == feature_id(("a", "en", "de"), 2)


def test_duplicate_example_keys_are_refused(tok):
    ex = example(ACCENTED, "Grün")
    with pytest.raises(ValueError, match=r"q1\|en\|en window 0"):
        build_features([ex, ex], tok, settings(tok))


def test_settings_mismatch_names_each_field(tok, tmp_path):
    other_tok = train_tokenizer(TEXTS[:2], tmp_path / "other", vocab_size=120)
    teacher = settings(tok, 32, 8)
    student = TokenizerSettings.from_tokenizer(other_tok, "other", 48, 8)
    with pytest.raises(ValueError) as err:
        teacher.check_same(student, "teacher es", "student")
    message = str(err.value)
    assert "max_length: teacher es has 32, student has 48" in message
    assert "vocab_hash" in message and "'tiny'" in message and "'other'" in message
    assert "doc_stride" not in message
    teacher.check_same(TokenizerSettings.from_tokenizer(tok, "/elsewhere/copy", 32, 8), "a", "b")
    assert teacher.fingerprint() != student.fingerprint()
    with pytest.raises(ValueError, match="vocab_hash"):
        build_features([example(ACCENTED, "Grün")], tok, TokenizerSettings.from_tokenizer(other_tok, "other", 32, 8))
    with pytest.raises(ValueError, match="doc_stride"):
        settings(tok, max_length=32, doc_stride=32)


def test_save_load_and_cache(tok, tmp_path):
    s = settings(tok)
    exs = [example(LONG_CONTEXT, "City3"), example(CJK, "富士山", qid="q2")]
    ds = build_features(exs, tok, s, cache_dir=tmp_path / "cache")
    cached = build_features(exs, tok, s, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("features-*.arrow"))) == 1
    assert cached.cache_files == ds.cache_files and cached.to_dict() == ds.to_dict()
    save_features(ds, s, tmp_path / "saved")
    loaded, loaded_settings = load_features(tmp_path / "saved")
    assert loaded_settings == s and loaded.to_dict() == ds.to_dict()
    with pytest.raises(FileNotFoundError, match="tokenizer_settings.json"):
        load_features(tmp_path / "cache")
