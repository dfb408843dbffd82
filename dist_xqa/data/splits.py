"""Train / dev / test splits by article, so a model is selected on dev and reported on test
and no passage is shared between splits.

A split is given as article index ranges (`QAExample.article_index`, the article's
position in its source file), as a dict usable as keyword arguments:
`split_by_article(examples, **XQUAD_SPLIT)`.
"""
from __future__ import annotations

from typing import Sequence

from dist_xqa.data.parallel import ParallelSet
from dist_xqa.data.records import QAExample

SPLIT_NAMES = ("train", "dev", "test")

# The split every benchmark of the project uses on XQuAD's 48 articles (see the data's
# README): 725 / 101 / 364 questions per language.
XQUAD_SPLIT: dict[str, range] = {"train": range(0, 28), "dev": range(28, 32), "test": range(32, 48)}


def split_by_article(
    examples: Sequence[QAExample], train: range, dev: range, test: range
) -> dict[str, list[QAExample]]:
    """Partition the examples by article index into {"train", "dev", "test"}, keeping
    their order. Raises ValueError when ranges overlap, an example's article is in no
    range, or a non-empty range selects no example (a split meant for another corpus)."""
    ranges = dict(zip(SPLIT_NAMES, (train, dev, test)))
    owner: dict[int, str] = {}
    for name, articles in ranges.items():
        for article in articles:
            if article in owner:
                raise ValueError(f"article {article} is in both the {owner[article]} and {name} ranges")
            owner[article] = name
    splits: dict[str, list[QAExample]] = {name: [] for name in SPLIT_NAMES}
    for ex in examples:
        if ex.article_index not in owner:
            raise ValueError(
                f"example {ex.id!r} is in article {ex.article_index}, which no split range "
                f"covers ({_describe(ranges)})"
            )
        splits[owner[ex.article_index]].append(ex)
    for name, articles in ranges.items():
        if len(articles) and not splits[name]:
            raise ValueError(f"the {name} split (articles {_span(articles)}) holds no example")
    return splits


def proportional_split(
    n_articles: int, fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
) -> dict[str, range]:
    """Contiguous train / dev / test article ranges covering 0..n_articles-1 in the given
    proportions (rounded; a split with a positive fraction gets at least one article)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    _, dev_fraction, test_fraction = fractions
    dev, test = (max(1, int(n_articles * f + 0.5)) if f > 0 else 0 for f in (dev_fraction, test_fraction))
    train = n_articles - dev - test
    if train < 1:
        raise ValueError(
            f"{n_articles} articles are too few to split in proportions {fractions}: "
            f"train would get {train}"
        )
    return {
        "train": range(0, train),
        "dev": range(train, train + dev),
        "test": range(train + dev, n_articles),
    }


def split_parallel(ps: ParallelSet, train: range, dev: range = range(0), test: range = range(0),
                   drop_uncovered: bool = False) -> dict[str, ParallelSet]:
    """Split a parallel set by article into {"train", "dev", "test"} parallel sets
    (builders then run per split). The language versions share article order (`align`
    checks it), so an id's article is the same in every language that has it. With
    `drop_uncovered`, articles in no range are left out (e.g. a corpus's test articles
    when the test sets are other corpora); otherwise they are an error."""
    covered = set(train) | set(dev) | set(test)
    examples = [ps.any_example(i) for i in ps.ids]
    if drop_uncovered:
        examples = [ex for ex in examples if ex.article_index in covered]
    by_split = split_by_article(examples, train, dev, test)
    return {name: ps.subset([ex.id for ex in exs]) for name, exs in by_split.items()}


def _span(articles: range) -> str:
    return f"{articles[0]}..{articles[-1]}" if len(articles) else "none"


def _describe(ranges: dict[str, range]) -> str:
    return ", ".join(f"{name} {_span(r)}" for name, r in ranges.items())
