"""Exact match and F1 exactly as the official evaluation scripts compute them.

Two normalisations, chosen by dataset as the official scripts are:
- `squad`: SQuAD v1.1 `evaluate-v1.1.py` (XQuAD and TyDiQA are scored this way). The same
  rules for every language.
- `mlqa`: facebookresearch/MLQA `mlqa_evaluation_v1.py`, by answer language. The official
  script raises on a language outside en es hi vi de ar zh; here every other language gets
  the same rules with no article list and whitespace tokens, so any language can be scored.

Both scripts compute F1 from `normalize(text).split()` and take the maximum over the gold
answers, so only the normaliser differs between them.
"""
from __future__ import annotations

import re
import string
import sys
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from functools import cache

from dist_xqa.config import NORMALIZATIONS  # the names a config may choose

__all__ = ["NORMALIZATIONS", "exact_match", "f1", "max_over_ground_truths", "normalizer"]

Normalizer = Callable[[str], str]

# evaluate-v1.1.py, normalize_answer: remove_articles / remove_punc.
_SQUAD_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCT = frozenset(string.punctuation)

# mlqa_evaluation_v1.py, normalize_answer.remove_articles, one pattern per language.
# The Arabic pattern is the script's: its first alternative (`^` after three characters,
# without MULTILINE) can never match, so every "ال" anywhere in the text becomes a space,
# word-internal ones included; kept as is because the numbers must equal the script's.
_MLQA_ARTICLES = {
    "en": re.compile(r"\b(a|an|the)\b"),
    "es": re.compile(r"\b(un|una|unos|unas|el|la|los|las)\b"),
    "vi": re.compile(r"\b(của|là|cái|chiếc|những)\b"),
    "de": re.compile(r"\b(ein|eine|einen|einem|eines|einer|der|die|das|den|dem|des)\b"),
    "ar": re.compile(r"\sال^|ال"),
}
# mlqa_evaluation_v1.py, MIXED_SEGMENTATION_LANGS: languages segmented by character.
_MIXED_SEGMENTATION_LANGS = frozenset({"zh"})
# mlqa_evaluation_v1.py, mixed_segmentation: the CJK range the script splits into
# characters (U+4E00..U+9FA5; characters outside it stay inside whitespace tokens).
_CJK_CHAR = re.compile(r"[\u4e00-\u9fa5]")


@cache
def mlqa_punctuation() -> frozenset[str]:
    """mlqa_evaluation_v1.py, PUNCT: every code point below sys.maxunicode whose Unicode
    category starts with P, plus ASCII string.punctuation (which adds the symbols $+<=>^`|~).
    Built on first use: scanning all code points takes a noticeable fraction of a second."""
    return frozenset(
        chr(i) for i in range(sys.maxunicode) if unicodedata.category(chr(i)).startswith("P")
    ).union(string.punctuation)


def normalize_squad(text: str) -> str:
    """evaluate-v1.1.py, normalize_answer: lower case, drop ASCII punctuation, replace the
    English articles a/an/the by spaces, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _ASCII_PUNCT)
    text = _SQUAD_ARTICLES.sub(" ", text)
    return " ".join(text.split())


def mixed_segmentation(text: str) -> list[str]:
    """mlqa_evaluation_v1.py, mixed_segmentation: each CJK character (or punctuation mark)
    is a token; runs of other characters are split on whitespace."""
    punct = mlqa_punctuation()
    tokens: list[str] = []
    run = ""
    for char in text:
        if _CJK_CHAR.search(char) or char in punct:
            tokens.extend(run.split())
            run = ""
            tokens.append(char)
        else:
            run += char
    tokens.extend(run.split())
    return tokens


def normalize_mlqa(text: str, lang: str) -> str:
    """mlqa_evaluation_v1.py, normalize_answer(s, lang): lower case, drop Unicode
    punctuation, replace the answer language's articles by spaces, then tokenize (by
    character for zh, on whitespace otherwise) and join the tokens with single spaces."""
    punct = mlqa_punctuation()
    text = text.lower()
    text = "".join(ch for ch in text if ch not in punct)
    articles = _MLQA_ARTICLES.get(lang)
    if articles is not None:
        text = articles.sub(" ", text)
    tokens = mixed_segmentation(text) if lang in _MIXED_SEGMENTATION_LANGS else text.split()
    return " ".join(t for t in tokens if t.strip() != "")


def normalizer(normalization: str, lang: str) -> Normalizer:
    """The answer normaliser of `normalization` ("squad" or "mlqa") for answers in `lang`
    (the passage language; only `mlqa` depends on it)."""
    if normalization == "squad":
        return normalize_squad
    if normalization == "mlqa":
        return lambda text: normalize_mlqa(text, lang)
    raise ValueError(f"unknown normalization {normalization!r}; expected one of {NORMALIZATIONS}")


def exact_match(prediction: str, ground_truth: str, normalize: Normalizer) -> float:
    """Both scripts' exact_match_score: 1.0 when the normalised texts are equal."""
    return float(normalize(prediction) == normalize(ground_truth))


def f1(prediction: str, ground_truth: str, normalize: Normalizer) -> float:
    """Both scripts' f1_score: token-multiset overlap of the normalised texts. Zero when
    nothing is shared, which includes two texts that both normalise to nothing (their
    exact match is still 1, as in the scripts)."""
    prediction_tokens = normalize(prediction).split()
    ground_truth_tokens = normalize(ground_truth).split()
    num_same = sum((Counter(prediction_tokens) & Counter(ground_truth_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def max_over_ground_truths(
    prediction: str, ground_truths: Sequence[str], normalize: Normalizer
) -> tuple[float, float]:
    """(exact match, F1) of one prediction: each the maximum over the gold answers, as the
    scripts' metric_max_over_ground_truths."""
    if not ground_truths:
        raise ValueError("no gold answers to score against")
    return (
        max(exact_match(prediction, truth, normalize) for truth in ground_truths),
        max(f1(prediction, truth, normalize) for truth in ground_truths),
    )
