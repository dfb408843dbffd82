"""Typed records shared by the whole data pipeline.

An example is one (question, passage) pair. In a monolingual source file the question
and the passage share a language; the dataset builders pair a question in language q with
the passage (and answers) in language p, so every example carries both languages. A
question keeps its `id` across languages, so (id, question_lang, context_lang) -- the
`key` -- identifies an example in any built dataset.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Answer:
    text: str
    answer_start: int  # character offset into the example's context


@dataclass(frozen=True)
class QAExample:
    id: str
    question: str
    context: str
    answers: tuple[Answer, ...]
    question_lang: str
    context_lang: str
    title: str = ""
    article_index: int = 0  # position of the article in its source file (for splits)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.id, self.question_lang, self.context_lang)


def key_str(key: tuple[str, str, str]) -> str:
    """Stable text form of an example key, used in prediction files and stored ids."""
    return "|".join(key)


@dataclass
class DataReport:
    """Every rejected or repaired example, by reason, with its id: nothing is dropped
    silently. `source` names the file (or builder) the report is about."""

    source: str = ""
    rejected: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    repaired: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    kept: int = 0

    def reject(self, reason: str, example_id: str) -> None:
        self.rejected[reason].append(example_id)

    def repair(self, reason: str, example_id: str) -> None:
        self.repaired[reason].append(example_id)

    @property
    def n_rejected(self) -> int:
        return sum(len(v) for v in self.rejected.values())

    @property
    def n_repaired(self) -> int:
        return sum(len(v) for v in self.repaired.values())

    def summary(self, max_ids: int = 5) -> str:
        lines = [f"{self.source}: kept {self.kept}, rejected {self.n_rejected}, repaired {self.n_repaired}"]
        for kind, table in (("rejected", self.rejected), ("repaired", self.repaired)):
            for reason, ids in sorted(table.items()):
                shown = ", ".join(ids[:max_ids]) + (" ..." if len(ids) > max_ids else "")
                lines.append(f"  {kind} {reason}: {len(ids)} ({shown})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "kept": self.kept,
            "rejected": {k: list(v) for k, v in self.rejected.items()},
            "repaired": {k: list(v) for k, v in self.repaired.items()},
        }


class DataError(ValueError):
    """A fatal problem in input data; the message names file, position and id."""
