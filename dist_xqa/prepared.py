"""What a prepared run directory holds, read by every role: the tokenizer, the features
and examples of each prepared set, and each prepared test set (`Prepared`). The
preparation step that writes it is dist_xqa.prepare; where it lies, dist_xqa.layout.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from dist_xqa.config import EvalSetConfig, RunConfig
from dist_xqa.data.features import TokenizerSettings, load_features
from dist_xqa.data.records import Answer, QAExample
from dist_xqa.layout import RunLayout
from dist_xqa.models import load_tokenizer

SPLIT_TEST_SET = "test"  # the test set's name when data.test is empty: data.train's split.test


class Prepared:
    """Read access to a prepared run directory (every rank)."""

    def __init__(self, run_dir: Path):
        self.layout = RunLayout(run_dir)
        self.root = self.layout.prepared
        self.info = json.loads(self.layout.prepared_info.read_text())
        self.tokenizer_dir = self.layout.tokenizer

    @property
    def settings(self) -> TokenizerSettings:
        return TokenizerSettings(**self.info["tokenizer_settings"])

    def tokenizer(self):
        return load_tokenizer(self.tokenizer_dir)

    def features(self, name: str):
        ds, settings = load_features(self.layout.prepared_set(name))
        settings.check_same(self.settings, f"features of '{name}'", "this run's tokenizer settings")
        return ds

    def examples(self, name: str) -> list[QAExample]:
        return read_examples(self.layout.prepared_set(name) / EXAMPLES)

    def test_set(self, name: str) -> PreparedTestSet:
        return PreparedTestSet(self.layout.prepared_test_set(name), self.settings)


# The files of a prepared set's folder (and of a test set's).
EXAMPLES, GOLD, FEATURES, INFO = "examples.jsonl", "gold.jsonl", "features", "info.json"


class PreparedTestSet:
    """One prepared test set: features and examples of its answerable questions, every
    gold question (what is scored), and `info` (format, normalisation, languages, files,
    the loader's rejections, the fingerprint)."""

    def __init__(self, directory: Path, settings: TokenizerSettings):
        self.dir = directory
        self.info = json.loads((directory / INFO).read_text())
        self._settings = settings

    def features(self):
        ds, settings = load_features(self.dir / FEATURES)
        settings.check_same(self._settings, f"features of test set {self.dir.name!r}", "this run's tokenizer settings")
        return ds

    def examples(self) -> list[QAExample]:
        return read_examples(self.dir / EXAMPLES)

    def gold(self) -> list[QAExample]:
        return read_examples(self.dir / GOLD)


def run_test_sets(cfg: RunConfig, prepared: Prepared) -> list[EvalSetConfig]:
    """The run's test sets: `data.test`, or the training corpus's test split."""
    if cfg.data.test:
        return list(cfg.data.test)
    split = prepared.info["split_test"]
    return [EvalSetConfig(name=SPLIT_TEST_SET, folder=split["folder"], pattern=split["pattern"],
                          languages=list(cfg.train_languages), normalization=cfg.data.normalization,
                          format="parallel", articles=split["articles"])]


def _example_to_json(ex: QAExample) -> dict:
    return {**asdict(ex), "answers": [asdict(a) for a in ex.answers]}


def _example_from_json(obj: dict) -> QAExample:
    return QAExample(**{**obj, "answers": tuple(Answer(**a) for a in obj["answers"])})


def write_examples(path: Path, examples: list[QAExample]) -> None:
    path.write_text("".join(json.dumps(_example_to_json(e), ensure_ascii=False) + "\n" for e in examples),
                    encoding="utf-8")


def read_examples(path: Path) -> list[QAExample]:
    return [_example_from_json(json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines()]
