"""Splits by article, and the real XQuAD files loaded, aligned and split."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from dist_xqa.data.builders import distillation_set
from dist_xqa.data.parallel import align, load_parallel
from dist_xqa.data.records import Answer, QAExample
from dist_xqa.data.splits import XQUAD_SPLIT, proportional_split, split_by_article, split_parallel

REPO_ROOT = Path(__file__).resolve().parents[1]
XQUAD_LANGS = ["en", "es", "de", "ar", "hi", "vi"]


def example(qid: str, article: int, lang: str = "en") -> QAExample:
    return QAExample(
        id=qid, question="q?", context="c", answers=(Answer("c", 0),),
        question_lang=lang, context_lang=lang, article_index=article,
    )


# Two questions in each of six articles.
EXAMPLES = [example(f"a{article}q{q}", article) for article in range(6) for q in range(2)]


def ids(examples: list[QAExample]) -> list[str]:
    return [ex.id for ex in examples]


def test_split_by_article_partitions_in_order():
    splits = split_by_article(EXAMPLES, train=range(0, 3), dev=range(3, 4), test=range(4, 6))
    assert list(splits) == ["train", "dev", "test"]
    assert ids(splits["train"]) == ids(EXAMPLES[:6])
    assert ids(splits["dev"]) == ["a3q0", "a3q1"]
    assert ids(splits["test"]) == ids(EXAMPLES[8:])


def test_split_by_article_refuses_overlap_gaps_and_empty_splits():
    with pytest.raises(ValueError, match="article 3 is in both the train and dev ranges"):
        split_by_article(EXAMPLES, range(0, 4), range(3, 5), range(5, 6))
    uncovered = r"example 'a5q0' is in article 5, which no split range covers \(train 0\.\.2, dev 3\.\.3, test 4\.\.4\)"
    with pytest.raises(ValueError, match=uncovered):
        split_by_article(EXAMPLES, range(0, 3), range(3, 4), range(4, 5))
    with pytest.raises(ValueError, match=r"the test split \(articles 6\.\.9\) holds no example"):
        split_by_article(EXAMPLES, range(0, 5), range(5, 6), range(6, 10))
    assert split_by_article(EXAMPLES, range(0, 5), range(0), range(5, 6))["dev"] == []


def test_xquad_split_ranges():
    assert XQUAD_SPLIT == {"train": range(0, 28), "dev": range(28, 32), "test": range(32, 48)}


@pytest.mark.parametrize(
    "n, fractions, sizes",
    [(10, (0.7, 0.1, 0.2), (7, 1, 2)), (48, (0.7, 0.1, 0.2), (33, 5, 10)), (3, (0.7, 0.1, 0.2), (1, 1, 1)),
     (10, (0.5, 0.0, 0.5), (5, 0, 5))],
)
def test_proportional_split_covers_every_article_contiguously(n, fractions, sizes):
    split = proportional_split(n, fractions)
    assert tuple(len(r) for r in split.values()) == sizes
    assert [a for r in split.values() for a in r] == list(range(n))


def test_proportional_split_errors():
    with pytest.raises(ValueError, match="2 articles are too few"):
        proportional_split(2)
    with pytest.raises(ValueError, match="summing to 1"):
        proportional_split(10, (0.5, 0.1, 0.1))


def test_split_parallel_splits_every_language_alike():
    ps = align({lang: [example(f"a{a}q{q}", a, lang) for a in range(6) for q in range(2)] for lang in ("en", "de")})
    splits = split_parallel(ps, **proportional_split(6, (0.5, 1 / 6, 1 / 3)))
    assert {name: s.ids for name, s in splits.items()} == {
        "train": tuple(ids(EXAMPLES[:6])), "dev": ("a3q0", "a3q1"), "test": tuple(ids(EXAMPLES[8:]))
    }
    for s in splits.values():
        assert s.languages == ("en", "de")
        assert all(list(s.examples[lang]) == list(s.ids) for lang in s.languages)


def xquad_folder() -> Path:
    folder = Path(os.environ.get("DIST_XQA_XQUAD", REPO_ROOT / ".." / "shared" / "data" / "xquad"))
    if not all((folder / f"xquad.{lang}.json").is_file() for lang in XQUAD_LANGS):
        pytest.skip(f"XQuAD files not found in {folder} (set DIST_XQA_XQUAD)")
    return folder


def test_real_xquad_loads_aligns_and_splits_cleanly():
    ps, reports = load_parallel(xquad_folder(), XQUAD_LANGS)
    for lang, report in reports.items():
        assert (report.kept, report.n_rejected, report.n_repaired) == (1190, 0, 0), report.summary()
    assert ps.languages == tuple(XQUAD_LANGS) and len(ps) == 1190
    assert all(missing == [] for missing in ps.missing.values())
    splits = split_parallel(ps, **XQUAD_SPLIT)
    assert {name: len(s) for name, s in splits.items()} == {"train": 725, "dev": 101, "test": 364}
    for lang in XQUAD_LANGS:
        per_lang = split_by_article(list(ps.examples[lang].values()), **XQUAD_SPLIT)
        assert {name: len(v) for name, v in per_lang.items()} == {"train": 725, "dev": 101, "test": 364}
    assert {ex.article_index for ex in splits["test"].examples["hi"].values()} == set(range(32, 48))
    # The paper's translation condition: branches over en/es/de train articles.
    train = split_parallel(align({k: list(ps.examples[k].values()) for k in ("en", "es", "de")}), **XQUAD_SPLIT)["train"]
    assert len(distillation_set(train, ["en", "es", "de"])) == 725 * 3 * 3
