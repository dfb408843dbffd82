"""Model features: examples tokenized into overflow windows with answer labels.

Follows Hugging Face's run_qa.py: the question and the context are encoded as a pair with
`truncation="only_second"`, so a long context becomes several windows of `max_length`
tokens overlapping by `doc_stride`, and the offsets of the context tokens map predictions
back to characters. Each window (a feature) gets a stable integer id derived from its
example key and window index, so logits stored on disk by one process can be joined back
to features built by another.

Teachers, producers and the student must tokenize identically (they share one mask of
answer positions and exchange logits position by position), so the tokenizer settings are
stored with the features and compared with `TokenizerSettings.check_same`.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
from datasets import Features, List, Value
from datasets.arrow_writer import ArrowWriter
from transformers import PreTrainedTokenizerBase

from dist_xqa.data.records import QAExample, key_str

SETTINGS_FILE = "tokenizer_settings.json"

# Bumped whenever build_features' output changes, so cached features are rebuilt.
FEATURES_VERSION = 1

FEATURES = Features({
    "feature_id": Value("int64"),
    "example_id": Value("string"),
    "question_lang": Value("string"),
    "context_lang": Value("string"),
    "window": Value("int32"),
    # int32 ids and masks: half the disk of int64 and accepted as they are by Hugging Face
    # encoders (embedding lookups take int32 indices).
    "input_ids": List(Value("int32")),
    "attention_mask": List(Value("int32")),
    "token_type_ids": List(Value("int32")),
    "offsets": List(List(Value("int32"), length=2)),
    "answer_mask": List(Value("bool")),
    "start_positions": Value("int64"),  # int64: the class-index dtype cross-entropy takes
    "end_positions": Value("int64"),
})

NO_OFFSET = [-1, -1]  # offsets of tokens outside the context


@dataclass(frozen=True)
class TokenizerSettings:
    """How features were tokenized. `tokenizer` is the name or path it was loaded from
    (informative only: two copies of one tokenizer at different paths are the same
    tokenizer); `vocab_hash` identifies it (vocabulary and text-splitting rules)."""

    tokenizer: str
    max_length: int
    doc_stride: int
    vocab_hash: str

    def __post_init__(self) -> None:
        if not 0 <= self.doc_stride < self.max_length:
            raise ValueError(f"doc_stride must be in [0, max_length); got doc_stride="
                             f"{self.doc_stride}, max_length={self.max_length}")

    @classmethod
    def from_tokenizer(cls, tok: PreTrainedTokenizerBase, name: str, max_length: int,
                       doc_stride: int) -> TokenizerSettings:
        """Settings of a fast tokenizer; the hash covers its vocabulary, normalizer,
        pre-tokenizer, post-processor and added tokens, not its transient padding and
        truncation state."""
        if not tok.is_fast:
            raise TypeError(f"tokenizer {name!r} is not a fast tokenizer; features need "
                            f"character offsets, which only fast tokenizers provide")
        state = json.loads(tok.backend_tokenizer.to_str())
        identity = {k: state.get(k) for k in ("added_tokens", "normalizer", "pre_tokenizer",
                                              "post_processor", "model")}
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        return cls(name, max_length, doc_stride, digest)

    def _compared(self) -> dict[str, object]:
        return {"max_length": self.max_length, "doc_stride": self.doc_stride,
                "vocab_hash": self.vocab_hash}

    def fingerprint(self) -> str:
        """Short hash of what makes features comparable (length, stride, vocabulary)."""
        return hashlib.sha256(json.dumps(self._compared(), sort_keys=True).encode()).hexdigest()[:16]

    def check_same(self, other: TokenizerSettings, what_self: str, what_other: str) -> None:
        """Raises ValueError naming every differing setting with both values."""
        differing = [f"{field}: {what_self} has {mine!r}, {what_other} has {theirs!r}"
                     for field, mine in self._compared().items()
                     if mine != (theirs := other._compared()[field])]
        if differing:
            if self.vocab_hash != other.vocab_hash:
                differing.append(f"(tokenizers: {what_self} {self.tokenizer!r}, "
                                 f"{what_other} {other.tokenizer!r})")
            raise ValueError(f"{what_self} and {what_other} were not tokenized alike (teachers "
                             f"and student must share tokenizer, max length and stride):\n  "
                             + "\n  ".join(differing))


def feature_id(key: tuple[str, str, str], window: int) -> int:
    """Stable 63-bit id of window `window` of example `key`: the same in every process and
    whatever the order of the examples (a hash, not a counter), non-negative in int64."""
    digest = hashlib.blake2b(f"{key_str(key)}|{window}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def _label(offsets: list[tuple[int, int]], context_tokens: list[int], start_char: int,
           end_char: int) -> tuple[int, int]:
    """Token positions of the answer [start_char, end_char) in one window; (0, 0), the CLS
    token, when the answer is not wholly inside the window's context."""
    if start_char < 0 or not context_tokens:
        return 0, 0
    if offsets[context_tokens[0]][0] > start_char or offsets[context_tokens[-1]][1] < end_char:
        return 0, 0
    start = next(t for t in context_tokens if offsets[t][1] > start_char)
    end = next(t for t in reversed(context_tokens) if offsets[t][0] < end_char)
    return start, end


def _fit_questions(questions: list[str], tokenizer: PreTrainedTokenizerBase,
                   settings: TokenizerSettings) -> list[str]:
    """Questions cut to leave every window more context tokens than the stride (the
    tokenizer cannot slide windows otherwise). Only questions that would not fit are cut,
    at a token boundary: in practice a question in a script the vocabulary never saw
    (zero-shot test languages), which splits into one token per character."""
    room = settings.max_length - settings.doc_stride - 4  # CLS, 2 SEP, one context token more than the stride
    enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    return [q if len(offsets) <= room else q[:offsets[room - 1][1]]
            for q, offsets in zip(questions, enc["offset_mapping"])]


def _tokenize(batch: dict[str, list], tokenizer: PreTrainedTokenizerBase,
              settings: TokenizerSettings) -> dict[str, list]:
    """One batch of examples -> its features (a batched `datasets.map` function)."""
    enc = tokenizer(
        _fit_questions([q.lstrip() for q in batch["question"]], tokenizer, settings),  # lstrip: as run_qa.py
        batch["context"],
        truncation="only_second", max_length=settings.max_length, stride=settings.doc_stride,
        return_overflowing_tokens=True, return_offsets_mapping=True, return_token_type_ids=True,
        padding="max_length",
    )
    out: dict[str, list] = {name: [] for name in FEATURES}
    windows: Counter[int] = Counter()
    for i, example in enumerate(enc["overflow_to_sample_mapping"]):
        window = windows[example]
        windows[example] += 1
        if enc["input_ids"][i][0] != tokenizer.cls_token_id:
            raise ValueError(f"tokenizer {settings.tokenizer!r} does not put its CLS token at "
                             f"position 0, where unanswerable windows are labelled")
        sequence_ids = enc.sequence_ids(i)
        offsets = enc["offset_mapping"][i]
        context_tokens = [t for t, s in enumerate(sequence_ids) if s == 1]
        answer_start = batch["answer_start"][example]
        start, end = _label(offsets, context_tokens, answer_start,
                            answer_start + len(batch["answer_text"][example]))
        key = (batch["id"][example], batch["question_lang"][example], batch["context_lang"][example])
        out["feature_id"].append(feature_id(key, window))
        out["example_id"].append(key[0])
        out["question_lang"].append(key[1])
        out["context_lang"].append(key[2])
        out["window"].append(window)
        out["input_ids"].append(enc["input_ids"][i])
        out["attention_mask"].append(enc["attention_mask"][i])
        out["token_type_ids"].append(enc["token_type_ids"][i])
        out["offsets"].append([list(offsets[t]) if s == 1 else NO_OFFSET
                               for t, s in enumerate(sequence_ids)])
        out["answer_mask"].append([t == 0 or s == 1 for t, s in enumerate(sequence_ids)])
        out["start_positions"].append(start)
        out["end_positions"].append(end)
    return out


def _examples_table(examples: list[QAExample]) -> dict[str, list]:
    """Columns of the examples, with the first answer (empty text at -1 when none)."""
    first = [ex.answers[0] if ex.answers else None for ex in examples]
    return {
        "id": [ex.id for ex in examples],
        "question_lang": [ex.question_lang for ex in examples],
        "context_lang": [ex.context_lang for ex in examples],
        "question": [ex.question for ex in examples],
        "context": [ex.context for ex in examples],
        "answer_text": [a.text if a else "" for a in first],
        "answer_start": [a.answer_start if a else -1 for a in first],
    }


def _content_fingerprint(table: dict[str, list], settings: TokenizerSettings) -> str:
    """Hash of everything the features depend on: the examples, the tokenizer settings
    and FEATURES_VERSION."""
    h = hashlib.sha256(f"{FEATURES_VERSION}|{settings.fingerprint()}".encode())
    for column in table.values():
        h.update(json.dumps(column, ensure_ascii=False).encode())
    return h.hexdigest()[:32]


def _check_unique_ids(ds: datasets.Dataset) -> None:
    counts = Counter(ds["feature_id"])
    repeated = {fid for fid, n in counts.items() if n > 1}
    if repeated:
        rows = ds.filter(lambda fid: fid in repeated, input_columns="feature_id")
        clashes = sorted({f"{key_str((r['example_id'], r['question_lang'], r['context_lang']))}"
                          f" window {r['window']}" for r in rows})
        raise ValueError(f"feature ids are not unique (duplicate example keys in the input?): "
                         f"{clashes[:10]}")


def build_features(examples: list[QAExample], tokenizer: PreTrainedTokenizerBase,
                   settings: TokenizerSettings, cache_dir: str | os.PathLike | None = None,
                   num_proc: int = 1, beat: Callable[[], None] | None = None) -> datasets.Dataset:
    """Builds one row per window of each example (columns: FEATURES).

    Labels use the first answer. `offsets` holds the [start, end) character offsets into
    the context of context tokens and [-1, -1] elsewhere; `answer_mask` marks the positions
    that may hold an answer: the context tokens and CLS at index 0, the label of a window
    that does not wholly contain the answer. With `cache_dir`, the features are stored there
    as Arrow under a hash of the examples and settings and reused by a later identical call.

    The examples are tokenised in chunks of CHUNK_EXAMPLES by `num_proc` processes (the
    same features, in the same order, for any number); `beat` is called after each chunk,
    from this process (the preparation's heartbeat: other ranks wait on it).
    """
    TokenizerSettings.from_tokenizer(tokenizer, settings.tokenizer, settings.max_length,
                                     settings.doc_stride).check_same(
        settings, "the tokenizer given to build_features", "the settings given with it")
    if tokenizer.padding_side != "right":
        raise ValueError(f"tokenizer {settings.tokenizer!r} pads on the {tokenizer.padding_side}; "
                         f"features need right padding (CLS at position 0)")
    if num_proc < 1:
        raise ValueError(f"num_proc must be at least 1, got {num_proc}")
    table = _examples_table(examples)
    fingerprint = _content_fingerprint(table, settings)
    cache_file = None
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        cache_file = Path(cache_dir) / f"features-{fingerprint}.arrow"
        if cache_file.exists():
            ds = datasets.Dataset.from_file(str(cache_file))
            _check_unique_ids(ds)
            return ds
    chunks = [{k: v[i:i + CHUNK_EXAMPLES] for k, v in table.items()} for i in range(0, len(examples), CHUNK_EXAMPLES)]
    # Written chunk by chunk to a temporary file renamed when whole: a preparation killed
    # midway leaves no cache file a rerun would take for complete.
    out = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp") if cache_file else None
    writer = ArrowWriter(features=FEATURES, path=str(out)) if out else None
    parts = []
    try:
        with _tokenizing_pool(tokenizer, settings, num_proc, len(chunks)) as tokenize:
            for batch in tokenize(chunks):
                if writer is not None:
                    writer.write_batch(batch)
                else:
                    parts.append(datasets.Dataset.from_dict(batch, features=FEATURES))
                if beat is not None:
                    beat()
        if writer is not None:
            writer.finalize()
    finally:
        if writer is not None:
            writer.close()
    if writer is not None:
        os.replace(out, cache_file)
        ds = datasets.Dataset.from_file(str(cache_file))
    else:
        ds = (datasets.concatenate_datasets(parts) if parts
              else datasets.Dataset.from_dict({name: [] for name in FEATURES}, features=FEATURES))
    _check_unique_ids(ds)
    return ds


CHUNK_EXAMPLES = 1000  # examples a worker tokenises at a time: seconds of work, a heartbeat after each

_worker: tuple[PreTrainedTokenizerBase, TokenizerSettings] | None = None  # a pool worker's tokenizer


def _set_worker(tokenizer: PreTrainedTokenizerBase, settings: TokenizerSettings) -> None:
    global _worker
    _worker = (tokenizer, settings)
    # A forked worker inherits the trainer's stop handlers (SIGTERM and USR1 ask for a
    # checkpoint, dist_xqa.waiting), but it has nothing to save, and the pool stops its
    # workers with SIGTERM while it holds their task queue's lock: a worker that caught
    # the signal instead of dying would wait for that lock, and the pool for it, forever.
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_DFL)


def _tokenize_in_worker(chunk: dict[str, list]) -> dict[str, list]:
    return _tokenize(chunk, *_worker)


@contextmanager
def _tokenizing_pool(tokenizer: PreTrainedTokenizerBase, settings: TokenizerSettings, num_proc: int,
                     chunks: int) -> Iterator[Callable[[list[dict]], Iterable[dict]]]:
    """A function mapping chunks of examples to their features, in order: in this process,
    or in a pool of `num_proc` processes (no more than there are chunks). The pool forks,
    so that workers start in milliseconds with the tokenizer already loaded (a spawned
    worker imports torch and transformers first); the tokenizers library turns its own
    thread pool off in a forked child, and the workers touch nothing else of the parent."""
    procs = min(num_proc, chunks)
    if procs <= 1:
        yield lambda batches: (_tokenize(batch, tokenizer, settings) for batch in batches)
        return
    pool = multiprocessing.get_context("fork").Pool(procs, initializer=_set_worker, initargs=(tokenizer, settings))
    try:
        yield lambda batches: pool.imap(_tokenize_in_worker, batches)
    except BaseException:
        pool.terminate()
        pool.join()
        raise
    pool.close()  # every chunk done: the workers leave on their own
    pool.join()


def save_features(ds: datasets.Dataset, settings: TokenizerSettings, directory: str | os.PathLike) -> None:
    """Saves the features (Arrow, `save_to_disk`) with their tokenizer settings beside
    them; the settings file is written last, so its presence means a complete save."""
    ds.save_to_disk(str(directory))
    (Path(directory) / SETTINGS_FILE).write_text(json.dumps(asdict(settings), indent=1) + "\n",
                                                 encoding="utf-8")


def load_features(directory: str | os.PathLike) -> tuple[datasets.Dataset, TokenizerSettings]:
    """Loads features saved by save_features, with their tokenizer settings."""
    settings_path = Path(directory) / SETTINGS_FILE
    if not settings_path.exists():
        raise FileNotFoundError(f"{settings_path} missing: {directory} holds no completely "
                                f"saved features")
    settings = TokenizerSettings(**json.loads(settings_path.read_text(encoding="utf-8")))
    return datasets.load_from_disk(str(directory)), settings
