"""Building and saving extractive-QA models.

`model.name: tiny` builds a small BERT from `model.tiny` (used by tests and the demo: no
download); any other name is a Hugging Face model name or local path. Every model is
saved in Hugging Face format with its tokenizer, so `AutoModelForQuestionAnswering` and
`pipeline("question-answering")` load it.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoModelForQuestionAnswering, AutoTokenizer, BertConfig, PreTrainedTokenizerBase

from dist_xqa.config import ModelConfig


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(str(path), use_fast=True)
    if not tok.is_fast:
        raise ValueError(f"tokenizer at {path} is not a fast tokenizer; offsets for span labels need one")
    return tok


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> torch.nn.Module:
    """A fresh QA model: tiny BERT from the config, or pretrained weights by name/path
    (the QA head is then newly initialised, seeded)."""
    torch.manual_seed(seed)
    if cfg.name == "tiny":
        config = BertConfig(
            **{**cfg.tiny, "vocab_size": len(tokenizer)},
            max_position_embeddings=max(512, cfg.max_length),
            pad_token_id=tokenizer.pad_token_id,
        )
        return AutoModelForQuestionAnswering.from_config(config)
    return AutoModelForQuestionAnswering.from_pretrained(cfg.name)


def load_trained(path: str | Path) -> torch.nn.Module:
    return AutoModelForQuestionAnswering.from_pretrained(str(path))


def save_hf(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path,
            state_dict: dict | None = None) -> None:
    """Save model + tokenizer in Hugging Face format; `state_dict` (e.g. gathered from
    ZeRO-3 partitions) replaces the module's own when given. The caller picks the one
    rank that writes. The files go to a temporary directory first, which then replaces
    `out_dir`, so a crash mid-save leaves the previous model whole."""
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.saving")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if not (tmp / "config.json").exists():
        raise RuntimeError(f"saving the model to {out} wrote no config.json")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
