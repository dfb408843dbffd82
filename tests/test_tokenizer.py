from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForQuestionAnswering

from dist_xqa.data.tokenizer import SPECIAL_TOKENS, ensure_tokenizer, train_tokenizer

TEXTS = [
    "Anna Keller was born in Vienna in 1873.",
    "¿En qué año nació José Núñez? Nació en Múnich.",
    "Die Lieblingsfarbe von Jürgen war Grün, nicht Weiß.",
    "東京は日本の首都です。",
] * 3


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(TEXTS, out, vocab_size=300)
    return out


def test_loads_as_fast_tokenizer_with_bert_special_tokens(tok_dir):
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    assert tok.is_fast
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3, 4]
    assert (tok.pad_token, tok.cls_token, tok.sep_token) == ("[PAD]", "[CLS]", "[SEP]")
    assert len(tok) <= 300


@pytest.mark.parametrize("text", ["Jürgen nació en Múnich, Grün.", "東京は日本の首都です。"])
def test_offsets_point_at_the_tokens_text(tok_dir, text):
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    tokens = tok.convert_ids_to_tokens(enc["input_ids"])
    assert "[UNK]" not in tokens  # every character was seen in training
    for token, (start, end) in zip(tokens, enc["offset_mapping"]):
        assert text[start:end] == token.removeprefix("##")
    if text.startswith("東"):
        assert tokens[:3] == ["東", "京", "は"]  # one token per CJK character


def test_keeps_case_and_accents(tok_dir):
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    assert tok.tokenize("Grün") != tok.tokenize("grun")
    assert "".join(tok.tokenize("Núñez")).replace("##", "") == "Núñez"


def test_pair_encoding_and_bert_forward(tok_dir):
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    enc = tok(["Wo wurde Anna geboren?"], ["Anna Keller was born in Vienna."], padding="max_length",
              max_length=24, return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    assert ids[0] == tok.cls_token_id and ids.count(tok.sep_token_id) == 2
    first_sep = ids.index(tok.sep_token_id)
    assert enc["token_type_ids"][0, first_sep + 1].item() == 1
    assert ids[-1] == tok.pad_token_id
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
    out = BertForQuestionAnswering(config)(**enc)
    assert out.start_logits.shape == (1, 24) and torch.isfinite(out.start_logits).all()


def test_ensure_tokenizer_trains_once(tmp_path):
    first = ensure_tokenizer(tmp_path / "tokenizer", TEXTS, vocab_size=300)

    def unread():
        raise AssertionError("texts read although the tokenizer exists")
        yield

    again = ensure_tokenizer(tmp_path / "tokenizer", unread(), vocab_size=300)
    assert again.get_vocab() == first.get_vocab()
    with pytest.raises(ValueError, match="vocab_size"):
        ensure_tokenizer(tmp_path / "tokenizer", TEXTS, vocab_size=500)


def test_a_teacher_saved_with_another_tokenizer_is_refused(tmp_path):
    from dist_xqa.data.features import TokenizerSettings
    from dist_xqa.roles.producer import check_teacher_tokenizers

    train_tokenizer(["the cat sat on the mat"] * 5, tmp_path / "same")
    train_tokenizer(["ein Hund lief durch den Park"] * 5, tmp_path / "other")
    run = TokenizerSettings.from_tokenizer(AutoTokenizer.from_pretrained(tmp_path / "same"), "tiny", 64, 16)
    check_teacher_tokenizers({"en": tmp_path / "same"}, run)
    with pytest.raises(ValueError, match=r"(?s)teacher .de. \(.*other\).*vocab_hash"):
        check_teacher_tokenizers({"en": tmp_path / "same", "de": tmp_path / "other"}, run)


def test_same_texts_same_tokenizer_frequent_words_whole(tmp_path):
    texts = TEXTS + ["Anna Anna Anna Keller"]
    train_tokenizer(texts, tmp_path / "a", vocab_size=130)
    train_tokenizer(texts, tmp_path / "b", vocab_size=130)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "a"))
    assert len(tok) == 130  # capped: characters first, then the most frequent words
    assert tok.tokenize("Anna") == ["Anna"]  # the most frequent word is one token
    assert tok.tokenize("Annae") == ["Anna", "##e"]  # a rarer word: longest known prefix, then pieces
