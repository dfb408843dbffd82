"""Scoring report over question-language x passage-language pairs.

XLT and G-XLT follow the cross-lingual QA literature (MLQA; Liu et al. 2020): XLT is the
question and passage in the same language, G-XLT in different languages. Each is reported
twice: averaged over language pairs (the papers' number, every pair weighs the same) and
pooled over the examples of those pairs.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from dist_xqa.data.records import QAExample
from dist_xqa.eval.metrics import NORMALIZATIONS, max_over_ground_truths, normalizer

Key = tuple[str, str, str]  # (id, question_lang, context_lang), as QAExample.key


@dataclass
class Tally:
    """Running sums of one group of examples. Sums are taken in example order, as the
    official scripts do, so a single file scores to the same floating-point numbers."""

    exact_match: float = 0.0
    f1: float = 0.0
    count: int = 0
    unanswered: int = 0

    def add(self, exact_match: float, f1: float, answered: bool) -> None:
        self.exact_match += exact_match
        self.f1 += f1
        self.count += 1
        self.unanswered += not answered

    def scores(self) -> dict:
        """Percentages over the tallied examples, with the counts behind them."""
        if self.count == 0:
            return {"exact_match": None, "f1": None, "count": 0, "unanswered": 0}
        return {
            "exact_match": 100.0 * self.exact_match / self.count,
            "f1": 100.0 * self.f1 / self.count,
            "count": self.count,
            "unanswered": self.unanswered,
        }


def pair_name(question_lang: str, context_lang: str) -> str:
    """The "q-p" name of a language pair, as used in reports and prediction files."""
    return f"{question_lang}-{context_lang}"


def score(
    examples: Sequence[QAExample],
    predictions: Mapping[Key, str],
    normalization: str = "squad",
) -> dict:
    """EM/F1 report of `predictions` (example key -> answer text) against `examples`.

    A missing prediction scores 0 and is counted as unanswered. Under `mlqa` each answer is
    normalised by its passage language (the answer language). The report holds:
    - `pooled`: `exact_match`, `f1`, `count`, `unanswered` over all examples;
    - `pairs`: the same per language pair, keyed "q-p";
    - `per_language`: per language, the pair with question and passage in it;
    - `xlt` / `g_xlt`: EM and F1 averaged over same-language / different-language pairs
      (None when there is no such pair), `xlt_pooled` / `g_xlt_pooled`: pooled over their
      examples;
    - `matrix`: `languages` (row and column order: first appearance in `examples`) and
      `exact_match` / `f1` tables, rows = question language, columns = passage language,
      None where a pair has no examples.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; expected one of {NORMALIZATIONS}")
    total, same, different = Tally(), Tally(), Tally()
    pairs: dict[tuple[str, str], Tally] = {}
    normalizers = {}
    for example in examples:
        lang = example.context_lang
        if lang not in normalizers:
            normalizers[lang] = normalizer(normalization, lang)
        if not example.answers:
            raise ValueError(f"example {example.key} has no gold answers to score against")
        prediction = predictions.get(example.key)
        answered = prediction is not None
        em, f1 = 0.0, 0.0
        if answered:
            truths = [answer.text for answer in example.answers]
            em, f1 = max_over_ground_truths(prediction, truths, normalizers[lang])
        pair = (example.question_lang, example.context_lang)
        by_kind = same if pair[0] == pair[1] else different
        for tally in (total, pairs.setdefault(pair, Tally()), by_kind):
            tally.add(em, f1, answered)

    pair_scores = {pair: tally.scores() for pair, tally in pairs.items()}
    languages = _languages_in_order(pairs)
    return {
        "normalization": normalization,
        "pooled": total.scores(),
        "pairs": {pair_name(*pair): s for pair, s in pair_scores.items()},
        "per_language": {q: s for (q, p), s in pair_scores.items() if q == p},
        "xlt": _average_over_pairs([s for (q, p), s in pair_scores.items() if q == p]),
        "xlt_pooled": same.scores(),
        "g_xlt": _average_over_pairs([s for (q, p), s in pair_scores.items() if q != p]),
        "g_xlt_pooled": different.scores(),
        "matrix": {
            "languages": languages,
            **{
                metric: [
                    [pair_scores[q, p][metric] if (q, p) in pair_scores else None for p in languages]
                    for q in languages
                ]
                for metric in ("exact_match", "f1")
            },
        },
    }


def _average_over_pairs(pair_scores: list[dict]) -> dict | None:
    if not pair_scores:
        return None
    return {
        "exact_match": sum(s["exact_match"] for s in pair_scores) / len(pair_scores),
        "f1": sum(s["f1"] for s in pair_scores) / len(pair_scores),
        "pairs": len(pair_scores),
    }


def _languages_in_order(pairs: Iterable[tuple[str, str]]) -> list[str]:
    return list(dict.fromkeys(lang for pair in pairs for lang in pair))
