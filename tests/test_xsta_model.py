"""What the X-STA model trains on (dist_xqa/strategies/xsta_model.py XstaModule): the
options of strategy.xsta reach its modules, and a batch's pairs are told which example
they are views of, so that InfoNCE's negatives are other examples (the paper's)."""
from __future__ import annotations

import torch
from transformers import BertConfig, BertForQuestionAnswering

from dist_xqa.config import XstaConfig
from dist_xqa.strategies.xsta import mean_pool
from dist_xqa.strategies.xsta_model import XstaModule


def tiny_qa() -> BertForQuestionAnswering:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return BertForQuestionAnswering(config).eval()


def batch(rows: int = 3, length: int = 8):
    torch.manual_seed(1)
    inputs = lambda: {"input_ids": torch.randint(1, 50, (rows, length)),  # noqa: E731
                      "attention_mask": torch.ones(rows, length, dtype=torch.long),
                      "token_type_ids": torch.zeros(rows, length, dtype=torch.long)}
    src, tgt = inputs(), inputs()
    positions = torch.ones(rows, length, dtype=torch.bool)
    positions[:, 1:3] = False
    labels = (positions, torch.full((rows,), 4), torch.full((rows,), 5))
    return src, tgt, torch.zeros(rows, dtype=torch.bool), labels


def infonce_by_hand(h_src: torch.Tensor, h_tgt: torch.Tensor, tau: float, negatives: list[list[int]]) -> float:
    """-1/B sum_i log(exp(s_ii / tau) / sum_{j in {i} + negatives[i]} exp(s_ij / tau)), s: cosine."""
    ones = torch.ones(h_src.shape[:2], dtype=torch.bool)
    src, tgt = mean_pool(h_src, ones), mean_pool(h_tgt, ones)
    total = 0.0
    for i, others in enumerate(negatives):
        s = {j: torch.nn.functional.cosine_similarity(src[i], tgt[j], dim=0).item() / tau for j in [i, *others]}
        total -= s[i] - torch.logsumexp(torch.tensor(list(s.values())), 0).item()
    return total / len(negatives)


def test_the_pairs_of_one_example_are_not_each_others_negatives():
    x = XstaConfig(gamma=0.0, token_weight=0.0)
    module = XstaModule(tiny_qa(), x)
    src, tgt, same, labels = batch()
    with torch.no_grad():
        out = module.encoder(src, tgt, same)
        # rows 0 and 1: two views of one example (say its de and es versions); row 2 another
        views = module(src, tgt, same, labels, labels, examples=torch.tensor([7, 7, 9])).sentence
        apart = module(src, tgt, same, labels, labels).sentence
    torch.testing.assert_close(views.item(), infonce_by_hand(out.h_src, out.h_tgt, x.infonce_tau,
                                                             [[2], [2], [0, 1]]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(apart.item(), infonce_by_hand(out.h_src, out.h_tgt, x.infonce_tau,
                                                             [[1, 2], [0, 2], [0, 1]]), rtol=1e-5, atol=1e-5)
    assert views.item() != apart.item()


def test_the_readings_of_the_config_reach_the_modules():
    module = XstaModule(tiny_qa(), XstaConfig(alignment_layer="share", norm_stats="shared"))
    assert module.encoder.alignment_layer == "share"
    src, tgt, same, _ = batch()
    with torch.no_grad():
        out = module.encoder(src, tgt, same)
    assert not torch.equal(out.align_src, out.h_src), "token alignment reads the sharing layer's input"
    default = XstaModule(tiny_qa(), XstaConfig())
    assert default.encoder.alignment_layer == "final"
    assert module.calibration.norm is not None and module.calibration.norm_src is None  # one set of statistics
    assert default.calibration.norm is None and default.calibration.norm_src is not None  # one a side
