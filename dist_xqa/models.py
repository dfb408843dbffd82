"""Building and saving extractive-QA models.

`model.name: tiny` builds a small BERT from `model.tiny` (used by tests and the demo: no
download); any other name is a Hugging Face model name or local path, checked at start-up
(`check_model_name`) before any data work. Every model is
saved in Hugging Face format with its tokenizer, so `AutoModelForQuestionAnswering` and
`pipeline("question-answering")` load it.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoModelForQuestionAnswering, AutoTokenizer, BertConfig, PreTrainedTokenizerBase

from dist_xqa.config import ConfigError, ModelConfig

MODEL_FILE = "config.json"  # what every Hugging Face model folder and Hub repository holds


def check_model_name(name: str) -> None:
    """ConfigError unless `model.name` can be loaded: tiny, a folder holding a model, or a
    Hub name that is in the Hugging Face cache or, online, may be downloaded. A name that
    can be neither (a mistyped path, a Hub name missing from an offline cache) would
    otherwise fail deep in the data preparation with the Hub's own words about repo ids,
    after minutes of it; this names the key, what was tried and where the cache is."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    if name == "tiny":
        return
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / MODEL_FILE).is_file():
            raise ConfigError(f"model.name {name!r} is a folder without {MODEL_FILE}: not a Hugging Face model")
        return
    tried = [f"a local folder {folder.absolute()} (no such folder)"]
    cache = f"the Hugging Face cache {constants.HF_HUB_CACHE} (HF_HOME={constants.HF_HOME})"
    try:
        cached = try_to_load_from_cache(name, MODEL_FILE)
    except HFValidationError:
        cached = None
        tried.append("a Hub model of that name (not a valid Hub name: a path, or a typo)")
    else:
        if isinstance(cached, str):
            return
        if not constants.HF_HUB_OFFLINE:
            return  # online: from_pretrained downloads it (and names a Hub error itself)
        tried.append(f"{cache}, offline (HF_HUB_OFFLINE=1): not there")
    raise ConfigError(f"model.name {name!r} cannot be loaded; tried {'; '.join(tried)}. Give a folder holding "
                      f"a model ({MODEL_FILE}, weights, tokenizer) or a Hub name present in {cache}: fill it "
                      f"where the Hub is reachable, e.g. `huggingface-cli download <name>` with the same HF_HOME")


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
