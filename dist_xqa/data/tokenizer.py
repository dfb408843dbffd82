"""A tiny BERT-style WordPiece tokenizer built on the fly from a corpus (tests and the demo).

Cased, accents kept: the demo's answers are names, cities and German nouns whose capital
letter is the cheapest cue a tiny model has for "this is an entity", and accents tell words
apart in es/de (año / ano); the multilingual backbones used for real runs (mBERT-cased,
XLM-R) are cased too. CJK characters are split one per token, as BERT does, so text in
languages without spaces still gets character offsets. Real runs load any Hugging Face
tokenizer by name or path instead.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4, [PAD] = 0 as BertConfig expects
TRAINING_FILE = "dist_xqa_tokenizer.json"  # the training parameters, beside the tokenizer files


def train_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 2000,
                    model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """Builds a WordPiece tokenizer from `texts` and saves it in Hugging Face format in
    `out_dir` (loadable with AutoTokenizer.from_pretrained as a fast tokenizer).

    BERT's pipeline: clean text, CJK characters as single tokens, split on whitespace and
    punctuation, "##" continuation pieces; encodes a pair as [CLS] A [SEP] B [SEP] with
    token type ids 0/1. The vocabulary: the special tokens, every character of the texts
    (alone and as a "##" continuation, so nothing is unknown), then the most frequent
    words whole (ties alphabetical) up to `vocab_size` tokens; a rarer word is spelled out
    from its longest known prefix. Unlike the `tokenizers` WordPiece trainer, whose ties
    fall in hash order, the same texts always give the same tokenizer, so a run is
    reproducible. Size a model with `len(tokenizer)`."""
    normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in texts:
        words.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({char for word in words for char in word})
    base = [*SPECIAL_TOKENS, *chars, *(f"##{char}" for char in chars)]
    whole = sorted((w for w in words if len(w) > 1), key=lambda w: (-words[w], w))
    vocab = base + whole[:max(0, vocab_size - len(base))]
    tokenizer = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]",
                                           continuing_subword_prefix="##"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_max_length=model_max_length, padding_side="right",
        pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    fast.save_pretrained(str(out_dir))
    return fast


def ensure_tokenizer(target: str | os.PathLike, texts: Iterable[str], vocab_size: int = 2000,
                     model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """Returns the run's tokenizer in the folder `target`, training it from `texts` on
    first use only (texts are not read when it exists). Every role of a run must tokenize
    alike, so a later call with other training parameters is refused, not retrained.

    Trained in a temporary folder and renamed into place, so ranks racing here all end up
    loading the one tokenizer that won."""
    target = Path(target)
    params = {"vocab_size": vocab_size, "model_max_length": model_max_length}
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=target.parent))
        train_tokenizer(texts, tmp, vocab_size, model_max_length)
        (tmp / TRAINING_FILE).write_text(json.dumps(params, indent=1) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, target)
        except OSError:  # another rank renamed its copy first; use that one
            shutil.rmtree(tmp)
    if not (target / TRAINING_FILE).exists():
        raise ValueError(f"{target} holds no tokenizer trained by ensure_tokenizer ({TRAINING_FILE} "
                         f"missing); remove it or use a new run directory")
    recorded = json.loads((target / TRAINING_FILE).read_text(encoding="utf-8"))
    if recorded != params:
        raise ValueError(f"tokenizer in {target} was trained with {recorded}, asked for {params}; "
                         f"use a new run directory or the recorded parameters")
    return AutoTokenizer.from_pretrained(str(target))
