"""X-STA pieces: knowledge sharing around a Hugging Face BertLayer, teacher-guided
calibration, sentence InfoNCE, token alignment entropy and the total loss; the saved model
and its translate-test evaluation. The strategy end to end: tests/test_strategies_e2e.py."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertLayer

from dist_xqa.strategies.xsta import (
    KnowledgeSharingLayer,
    XstaEncoder,
    MaskedBatchNorm,
    Span,
    TeacherGuidedCalibration,
    additive_mask,
    calibrated_scores,
    default_share_layer,
    sentence_infonce,
    teacher_guided_loss,
    token_alignment,
    xsta_loss,
)

H = 16


def tiny_layer(attention: str = "eager") -> BertLayer:
    torch.manual_seed(0)
    config = BertConfig(hidden_size=H, num_attention_heads=2, intermediate_size=32,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        attn_implementation=attention)
    return BertLayer(config).eval()


def sharing(attention: str = "eager", **options) -> KnowledgeSharingLayer:
    return KnowledgeSharingLayer(tiny_layer(attention), H, dropout=0.0, **options).eval()


def pair(batch: int = 2, j: int = 6, i: int = 6):
    torch.manual_seed(1)
    h_src = torch.randn(batch, j, H, requires_grad=True)
    h_tgt = torch.randn(batch, i, H, requires_grad=True)
    src_tokens = torch.ones(batch, j, dtype=torch.bool)
    tgt_tokens = torch.ones(batch, i, dtype=torch.bool)
    src_tokens[:, -1] = False  # both padded to one length, with different real lengths
    tgt_tokens[0, -3:] = False
    return h_src, h_tgt, src_tokens, tgt_tokens


def uneven_sum(x: torch.Tensor) -> torch.Tensor:
    """A scalar to backpropagate from a layer's output. Not a plain sum: the layer ends in a
    LayerNorm, whose outputs sum to a constant over the hidden units, so a plain sum has no
    gradient beyond rounding."""
    return (x * torch.linspace(-1.0, 1.0, x.numel()).view_as(x)).sum()


# --- sharing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_gdks_blocks_gradients_into_the_source_only_when_languages_differ(attention):
    layer = sharing(attention)
    h_src, h_tgt, src_tokens, tgt_tokens = pair()
    same_language = torch.tensor([False, True])
    _, next_tgt = layer(h_src, h_tgt, src_tokens, tgt_tokens, same_language)
    uneven_sum(next_tgt).backward()
    assert torch.count_nonzero(h_src.grad[0]) == 0  # S != T: only sg(h_S) reaches the target
    assert torch.count_nonzero(h_src.grad[1]) > 0  # S == T: h~_S = h_S, gradients flow
    assert torch.count_nonzero(h_tgt.grad) > 0
    assert layer.correction[1].weight.grad.abs().sum() > 0  # f trains on the S != T pair


def test_without_gdks_the_target_sends_gradients_into_every_source():
    layer = sharing(gradient_disentangled=False)
    h_src, h_tgt, src_tokens, tgt_tokens = pair()
    _, next_tgt = layer(h_src, h_tgt, src_tokens, tgt_tokens, torch.tensor([False, False]))
    uneven_sum(next_tgt).backward()
    assert torch.count_nonzero(h_src.grad[0]) > 0 and torch.count_nonzero(h_src.grad[1]) > 0


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("gdks", [True, False])
def test_padded_source_tokens_take_no_attention_weight_and_no_gradient(attention, gdks):
    """Whatever the installed transformers release does with a cross-attention mask: the
    target's states never depend on the source's padding."""
    layer = sharing(attention, gradient_disentangled=gdks)
    h_src, h_tgt, src_tokens, tgt_tokens = pair()
    src_tokens[1, 3:] = False
    same_language = torch.tensor([False, True])  # row 1: h~_S = h_S, gradients reach the source
    _, next_tgt = layer(h_src, h_tgt, src_tokens, tgt_tokens, same_language)
    moved = h_src.detach().clone()
    moved[~src_tokens] = 100.0 * torch.randn(int((~src_tokens).sum()), H)
    _, again = layer(moved, h_tgt, src_tokens, tgt_tokens, same_language)
    torch.testing.assert_close(again, next_tgt)
    uneven_sum(next_tgt).backward()
    assert torch.count_nonzero(h_src.grad[~src_tokens]) == 0
    assert torch.count_nonzero(h_src.grad[1, :3]) > 0


def test_the_source_runs_through_the_wrapped_layer_unchanged():
    layer = sharing()
    h_src, h_tgt, src_tokens, tgt_tokens = pair()
    next_src, _ = layer(h_src, h_tgt, src_tokens, tgt_tokens, torch.tensor([False, True]))
    plain = layer.layer(h_src, attention_mask=additive_mask(src_tokens, h_src.dtype))[0]
    torch.testing.assert_close(next_src, plain)


def test_lambda_mixes_cross_and_self_attention_before_the_output_block():
    layer = sharing()
    cross, self_attended = torch.full((1, 2, H), 10.0), torch.zeros(1, 2, H)
    assert layer.mix_weight.item() == pytest.approx(0.3)  # w * lambda0 + b with w = 1, b = 0
    torch.testing.assert_close(layer.mix(cross, self_attended), torch.full((1, 2, H), 7.0))
    code = sharing(mix_on="cross")
    torch.testing.assert_close(code.mix(cross, self_attended), torch.full((1, 2, H), 3.0))
    # lambda = 1: the target's layer output is the plain layer's (self-attention only)
    h_src, h_tgt, src_tokens, tgt_tokens = pair()
    with torch.no_grad():
        layer.b.fill_(0.7)
    _, next_tgt = layer(h_src, h_tgt, src_tokens, tgt_tokens, torch.tensor([False, True]))
    plain = layer.layer(h_tgt, attention_mask=additive_mask(tgt_tokens, h_tgt.dtype))[0]
    torch.testing.assert_close(next_tgt, plain)
    next_tgt.sum().backward()
    assert layer.w.grad is not None and layer.b.grad is not None


def test_lambda_zero_attends_only_to_the_source():
    layer = sharing()
    with torch.no_grad():
        layer.w.fill_(0.0)
    h_src, h_tgt, src_tokens, tgt_tokens = pair()
    same = torch.tensor([True, True])
    _, a = layer(h_src, h_tgt, src_tokens, tgt_tokens, same)
    # change the target's self-attention weights: with lambda = 0 nothing changes
    with torch.no_grad():
        layer.layer.attention.self.value.weight.add_(1.0)
    _, b = layer(h_src, h_tgt, src_tokens, tgt_tokens, same)
    torch.testing.assert_close(a, b)


def tiny_qa(attention: str, layers: int = 3):
    from transformers import BertForQuestionAnswering

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=H, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation=attention)
    return BertForQuestionAnswering(config).eval()


def test_default_share_layer_is_two_thirds_of_the_depth():
    assert [default_share_layer(n) for n in (1, 2, 3, 12, 24)] == [1, 1, 2, 8, 16]


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_encoder_runs_pairs_and_keeps_the_hugging_face_model_whole(attention):
    qa = tiny_qa(attention)
    encoder = XstaEncoder(qa)
    assert encoder.share_index == 1 and encoder.sharing.layer is qa.bert.encoder.layer[1]
    torch.manual_seed(3)

    def inputs():
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[1, 6:] = 0
        return {"input_ids": torch.randint(1, 50, (2, 8)), "attention_mask": mask,
                "token_type_ids": torch.zeros(2, 8, dtype=torch.long)}

    src, tgt = inputs(), inputs()
    out = encoder(src, tgt, torch.tensor([False, True]))
    assert out.src_start.shape == out.tgt_end.shape == (2, 8) and out.h_tgt.shape == (2, 8, H)
    plain = qa(**src)  # the source side is the plain model's forward
    torch.testing.assert_close(out.src_start, plain.start_logits, atol=1e-5, rtol=1e-4)
    # lambda = 1: the target ignores the source and is the plain model's forward too
    with torch.no_grad():
        encoder.sharing.b.fill_(0.7)
    out = encoder(src, tgt, torch.tensor([False, True]))
    real = tgt["attention_mask"].bool()
    torch.testing.assert_close(out.tgt_end[real], qa(**tgt).end_logits[real], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="share_layer must be in 1..3"):
        XstaEncoder(tiny_qa(attention), share_layer=4)


def test_token_alignment_reads_the_final_states_or_those_entering_the_sharing_layer():
    qa = tiny_qa("eager")
    torch.manual_seed(3)
    inputs = {"input_ids": torch.randint(1, 50, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long),
              "token_type_ids": torch.zeros(2, 8, dtype=torch.long)}
    same = torch.tensor([False, True])
    torch.manual_seed(4)  # the sharing layer's f starts from a random draw: the same for both encoders
    final = XstaEncoder(qa)(inputs, inputs, same)
    assert torch.equal(final.align_src, final.h_src) and torch.equal(final.align_tgt, final.h_tgt)
    torch.manual_seed(4)
    share = XstaEncoder(qa, alignment_layer="share")(inputs, inputs, same)
    # before the sharing layer (2 of 3) both sides are the plain model's layer-1 states
    entering = qa.bert(**inputs, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(share.align_src, entering)
    torch.testing.assert_close(share.align_tgt, entering)
    torch.testing.assert_close(share.h_tgt, final.h_tgt)  # the option moves nothing else
    with pytest.raises(ValueError, match="alignment_layer"):
        XstaEncoder(qa, alignment_layer="first")


# --- teaching --------------------------------------------------------------------------------


def test_masked_batch_norm_uses_real_tokens_in_training_and_running_stats_at_inference():
    norm = MaskedBatchNorm(3, eps=1e-8, momentum=0.1)
    h = torch.randn(2, 4, 3) * 3 + 5
    tokens = torch.tensor([[True, True, True, False], [True, True, False, False]])
    h[~tokens] = 1e4  # padding must not move the statistics
    out = norm(h, tokens)
    real = out[tokens]
    torch.testing.assert_close(real.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(real.var(0, unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(norm.running_mean, 0.1 * h[tokens].mean(0))
    norm.eval()
    torch.testing.assert_close(norm(h, tokens), (h - norm.running_mean) / torch.sqrt(norm.running_var + 1e-8))


def test_calibration_normalises_each_side_on_its_own_or_both_sides_together():
    h_tgt = torch.tensor([[[1.0], [3.0], [1e4]]])  # the last token is padding
    h_src = torch.tensor([[[5.0], [7.0], [1e4]]])
    tokens = torch.tensor([[True, True, False]])
    side = TeacherGuidedCalibration(1, heads=1, eps=1e-8)
    tgt, src = side.normalized(h_tgt, h_src, tokens, tokens)
    # each side: mean 2 (target) or 6 (source), variance 1
    torch.testing.assert_close(tgt[0, :2, 0], torch.tensor([-1.0, 1.0]))
    torch.testing.assert_close(src[0, :2, 0], torch.tensor([-1.0, 1.0]))
    shared = TeacherGuidedCalibration(1, heads=1, eps=1e-8, norm_stats="shared")
    tgt, src = shared.normalized(h_tgt, h_src, tokens, tokens)
    # both sides: mean 4, variance (9 + 1 + 1 + 9) / 4 = 5
    root5 = math.sqrt(5.0)
    torch.testing.assert_close(tgt[0, :2, 0], torch.tensor([-3.0, -1.0]) / root5)
    torch.testing.assert_close(src[0, :2, 0], torch.tensor([1.0, 3.0]) / root5)
    torch.testing.assert_close(shared.norm.running_mean, torch.tensor([0.4]))  # momentum 0.1
    off = TeacherGuidedCalibration(1, heads=1, normalize=False, norm_stats="shared")
    assert off.normalized(h_tgt, h_src, tokens, tokens) == (h_tgt, h_src)
    with pytest.raises(ValueError, match="norm_stats"):
        TeacherGuidedCalibration(1, heads=1, norm_stats="language")


def permutation_case():
    """Target token i holds e_i, source token perm[i] holds e_i: sharp attention i -> perm[i]."""
    calibration = TeacherGuidedCalibration(4, heads=1, dropout=0.0, normalize=False)
    with torch.no_grad():
        for linear in (calibration.query, calibration.key):
            linear.weight.copy_(torch.eye(4) * 20)
            linear.bias.zero_()
    perm = [2, 0, 3, 1]
    h_tgt = torch.eye(4)[None]
    h_src = torch.zeros(1, 4, 4)
    h_src[0, perm] = torch.eye(4)
    src_start = torch.tensor([[0.0, 1.0, 2.0, 3.0]], requires_grad=True)
    src_end = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    return calibration, perm, h_tgt, h_src, src_start, src_end


def test_calibration_carries_the_source_distribution_through_attention():
    calibration, perm, h_tgt, h_src, src_start, src_end = permutation_case()
    every = torch.ones(1, 4, dtype=torch.bool)
    p_start, p_end = calibration(h_tgt, h_src, every, every, every, every, src_start, src_end)
    assert p_start.shape == p_end.shape == (1, 4)
    torch.testing.assert_close(p_start, torch.softmax(src_start, -1)[:, perm].detach(), atol=1e-4, rtol=0)
    torch.testing.assert_close(p_end, torch.softmax(src_end, -1)[:, perm], atol=1e-4, rtol=0)
    p_start.sum().backward()
    assert src_start.grad is None  # the source distribution is a detached value


def test_calibration_renormalises_over_the_targets_valid_positions():
    calibration, perm, h_tgt, h_src, src_start, src_end = permutation_case()
    every = torch.ones(1, 4, dtype=torch.bool)
    tgt_positions = torch.tensor([[True, False, True, True]])
    src_positions = torch.tensor([[True, True, True, False]])  # source token 3 holds no answer
    p_start, _ = calibration(h_tgt, h_src, every, every, tgt_positions, src_positions, src_start, src_end)
    p_src = torch.softmax(src_start[:, :3], -1)[0].detach()
    carried = torch.tensor([p_src[2], 0.0, 0.0, p_src[1]])  # target 2 attends source 3: p_S = 0
    torch.testing.assert_close(p_start[0], carried / carried.sum(), atol=1e-4, rtol=0)
    assert p_start[0, 1] == 0


def test_teacher_guided_loss_and_inference_averaging():
    positions = torch.tensor([[True, True, True, True, False]])
    uniform = torch.tensor([[0.25, 0.25, 0.25, 0.25, 0.0]])
    gold = torch.tensor([1])
    assert float(teacher_guided_loss(uniform, uniform, positions, gold, gold)) == pytest.approx(math.log(4))
    tgt_logits = torch.tensor([[math.log(5.0), 0.0, 0.0, 0.0, 9.0]])  # p_T = [5/8, 1/8, 1/8, 1/8, 0]
    scores = calibrated_scores(tgt_logits, uniform, positions)
    expected = (torch.tensor([5 / 8, 1 / 8, 1 / 8, 1 / 8]) + 0.25) / 2
    torch.testing.assert_close(scores[0, :4].exp(), expected)
    assert scores[0, 4] == torch.finfo(scores.dtype).min


# --- aligning --------------------------------------------------------------------------------


def test_sentence_infonce_on_pooled_states_with_in_batch_negatives():
    tokens = torch.tensor([[True, True, False], [True, True, False]])
    h_src = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [0.0, 99.0]], [[0.0, 2.0], [0.0, 1.0], [99.0, 0.0]]])
    h_tgt = h_src.clone()
    aligned = sentence_infonce(h_src, h_tgt, tokens, tokens, tau=0.5)
    assert float(aligned) == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-5)
    swapped = sentence_infonce(h_src, h_tgt.flip(0), tokens, tokens.flip(0), tau=0.05)
    assert float(swapped) == pytest.approx(20.0 + math.log(1 + math.exp(-20.0)), rel=1e-5)


def test_sentence_infonce_leaves_other_views_of_the_same_example_out_of_the_negatives():
    """Rows 0 and 1 are two pairs of one example (en_x with de_x, en_x with es_x): row 0's
    column 1 is the same example at cosine 1, no negative. Row 2 is another example."""
    tokens = torch.ones(3, 1, dtype=torch.bool)
    # cosines [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    h = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]], [[0.0, 1.0]]], requires_grad=True)
    tau = 0.5  # cosine / tau: 2 for a match, 0 otherwise
    own = math.log(1 + math.exp(-2.0))  # rows 0, 1: their positive and row 2's target only
    other = math.log(1 + 2 * math.exp(-2.0))  # row 2: two negatives at cosine 0
    grouped = sentence_infonce(h, h, tokens, tokens, tau=tau, groups=torch.tensor([7, 7, 3]))
    assert grouped.item() == pytest.approx((2 * own + other) / 3, rel=1e-6)
    grouped.backward()
    assert torch.isfinite(h.grad).all()  # the left-out columns take no gradient, and no NaN
    every = math.log(2 + math.exp(-2.0))  # without ids: the other view is a negative at cosine 1
    assert sentence_infonce(h, h, tokens, tokens, tau=tau).item() == pytest.approx((2 * every + other) / 3, rel=1e-6)
    distinct = sentence_infonce(h, h, tokens, tokens, tau=tau, groups=torch.tensor([0, 1, 2]))
    assert distinct.item() == pytest.approx((2 * every + other) / 3, rel=1e-6)


def test_token_alignment_entropy_is_masked_by_default_with_a_pair_option():
    h_src = torch.eye(8)[None, :5].clone().requires_grad_(True)
    h_tgt = torch.zeros(1, 4, 8)
    h_tgt[0, 2:, 0] = 100.0  # padded target rows align sharply with source token 0
    h_tgt.requires_grad_(True)
    tgt_tokens = torch.tensor([[True, True, False, False]])
    src_tokens = torch.tensor([[True, True, True, False, False]])
    masked = token_alignment(h_tgt, h_src, tgt_tokens, src_tokens)
    assert masked.item() == pytest.approx(math.log(3), rel=1e-5)  # zero queries: uniform over 3
    pair = token_alignment(h_tgt, h_src, tgt_tokens, src_tokens, variant="pair")
    # every target row counts (2 uniform, 2 sharp), plus source rows over the 2 real target
    # tokens, whose keys are zero: log 2
    assert pair.item() == pytest.approx(math.log(3) / 2 + math.log(2), rel=1e-4)
    (masked + pair).backward()
    assert h_src.grad is None and h_tgt.grad is not None  # sg(h_S)


def test_xsta_loss_weights_each_part_and_switches_parts_off():
    torch.manual_seed(2)
    b, length = 3, 6

    def side() -> Span:
        positions = torch.ones(b, length, dtype=torch.bool)
        positions[:, 1:3] = False
        return Span(torch.randn(b, length), torch.randn(b, length), positions,
                    torch.ones(b, length, dtype=torch.bool), torch.tensor([0, 3, 4]),
                    torch.tensor([0, 4, 5]), torch.randn(b, length, 8))

    src, tgt = side(), side()
    p = torch.softmax(torch.randn(b, length), -1)
    parts = xsta_loss(src, tgt, (p, p))
    expected = (0.2 * parts.mrc_src + 0.8 * parts.mrc_tgt + 0.1 * parts.teacher_guided
                + 0.05 * parts.sentence + 0.05 * parts.token)
    torch.testing.assert_close(parts.total, expected)
    assert all(float(x) > 0 for x in parts[1:])
    off = xsta_loss(src, tgt, None, sentence_weight=0.0, token_weight=0.0)
    assert float(off.teacher_guided) == float(off.sentence) == float(off.token) == 0.0
    torch.testing.assert_close(off.total, 0.2 * off.mrc_src + 0.8 * off.mrc_tgt)
    groups = torch.tensor([5, 5, 1])
    grouped = xsta_loss(src, tgt, (p, p), groups=groups)
    torch.testing.assert_close(grouped.sentence, sentence_infonce(src.hidden, tgt.hidden, src.tokens, tgt.tokens,
                                                                  0.05, groups))
    assert float(grouped.sentence) != float(parts.sentence)
    # token alignment reads Span.aligned when given (the sharing layer's states), else hidden
    entering_src, entering_tgt = torch.randn(b, length, 8), torch.randn(b, length, 8)
    moved = xsta_loss(src._replace(aligned=entering_src), tgt._replace(aligned=entering_tgt), (p, p))
    torch.testing.assert_close(moved.token, token_alignment(entering_tgt, entering_src, tgt.tokens, src.tokens))
    torch.testing.assert_close(moved.sentence, parts.sentence)


# --- pairing windows for training ----------------------------------------------------------------


def test_pairs_match_windows_by_index_and_repeat_the_shorter_sides_last_window():
    from dist_xqa.roles.xsta import pair_windows

    rows = [  # (key, window)
        (("a", "en", "en"), 0), (("a", "en", "en"), 1), (("a", "en", "en"), 2),
        (("a", "de", "de"), 0), (("a", "de", "de"), 1),
        (("a", "en", "de"), 0),  # a mixed-language example is never a pair side
        (("b", "es", "es"), 0),  # no English version of b: no pair
        (("c", "en", "en"), 0), (("c", "es", "es"), 0), (("c", "es", "es"), 1),
    ]
    pairs = pair_windows([k for k, _ in rows], [w for _, w in rows], "en")
    expected = {
        (0, 3), (1, 4), (2, 4),  # a: en windows 0-2 with de windows 0, 1, 1
        (0, 0), (1, 1), (2, 2),  # a: the S = T pair
        (7, 7),  # c: en-en
        (7, 8), (7, 9),  # c: es windows 0, 1 with en's only window
    }
    assert set(pairs) == expected and len(pairs) == len(expected)



def test_translate_test_prediction_averages_calibrated_and_own_distributions():
    from dist_xqa.config import XstaConfig
    from dist_xqa.strategies.xsta_model import XstaModule

    module = XstaModule(tiny_qa("eager"), XstaConfig()).eval()
    torch.manual_seed(4)
    inputs = {"input_ids": torch.randint(1, 50, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long),
              "token_type_ids": torch.zeros(2, 8, dtype=torch.long)}
    positions = torch.ones(2, 8, dtype=torch.bool)
    positions[:, 1:3] = False
    same = torch.tensor([True, True])
    # zero query and key maps: every target token attends evenly to the source, so p_T|S is
    # the same at every target token and, renormalised, uniform over the 6 valid positions
    with torch.no_grad():
        for linear in (module.calibration.query, module.calibration.key):
            linear.weight.zero_()
            linear.bias.zero_()
    start, end = module.predict(inputs, inputs, same, positions, positions)
    out = module.encoder(inputs, inputs, same)
    for scores, logits in ((start, out.tgt_start), (end, out.tgt_end)):
        p_t = torch.softmax(logits.masked_fill(~positions, -torch.inf), -1)
        torch.testing.assert_close(scores.exp()[positions], ((1 / 6 + p_t) / 2)[positions])
        assert torch.all(scores[~positions] == torch.finfo(scores.dtype).min)
    module.x = XstaConfig(calibrate_at_inference=False)
    start, _ = module.predict(inputs, inputs, same, positions, positions)
    torch.testing.assert_close(start, out.tgt_start)



def test_the_saved_folder_loads_as_the_whole_xsta_model_and_as_the_qa_model_alone(tmp_path):
    from transformers import AutoModelForQuestionAnswering

    from dist_xqa.config import XstaConfig
    from dist_xqa.strategies.xsta_model import XstaModule, load_xsta, save_extras

    module = XstaModule(tiny_qa("eager"), XstaConfig(alignment="pair"))
    with torch.no_grad():
        module.encoder.sharing.b.fill_(0.25)
        module.calibration.norm_tgt.running_mean.fill_(0.5)
        module.calibration.query.weight.mul_(3)
    module.encoder.qa.save_pretrained(tmp_path)
    save_extras(module, tmp_path)
    loaded = load_xsta(tmp_path)
    assert loaded.x.alignment == "pair" and loaded.encoder.share_index == module.encoder.share_index
    module.eval()
    torch.manual_seed(5)
    inputs = {"input_ids": torch.randint(1, 50, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long),
              "token_type_ids": torch.zeros(2, 8, dtype=torch.long)}
    positions = torch.ones(2, 8, dtype=torch.bool)
    same = torch.tensor([False, True])
    for a, b in zip(module.predict(inputs, inputs, same, positions, positions),
                    loaded.predict(inputs, inputs, same, positions, positions)):
        torch.testing.assert_close(a, b)
    qa = AutoModelForQuestionAnswering.from_pretrained(tmp_path)
    torch.testing.assert_close(qa(**inputs).start_logits, module.encoder.qa(**inputs).start_logits)



def test_translate_test_pairs_each_feature_with_its_source_version():
    from datasets import Dataset

    from dist_xqa.config import XstaConfig
    from dist_xqa.strategies.xsta_model import XstaModule, translate_test_scores

    module = XstaModule(tiny_qa("eager"), XstaConfig())
    rows = [("a", "en", "en", 0), ("a", "en", "en", 1), ("a", "de", "en", 0), ("a", "de", "de", 2),
            ("b", "de", "de", 0)]  # b has no English version: p_T alone
    torch.manual_seed(6)
    ids = torch.randint(1, 50, (len(rows), 8))
    answer = [[True] + [False] * 2 + [True] * 5] * len(rows)
    features = Dataset.from_dict({
        "example_id": [r[0] for r in rows], "question_lang": [r[1] for r in rows],
        "context_lang": [r[2] for r in rows], "window": [r[3] for r in rows], "input_ids": ids.tolist(),
        "attention_mask": [[1] * 8] * len(rows), "token_type_ids": [[0] * 8] * len(rows), "answer_mask": answer,
        "start_positions": [0] * len(rows), "end_positions": [0] * len(rows)})
    start, end, paired = translate_test_scores(module, features, "en", 2, torch.device("cpu"))
    assert paired == {("a", "en", "en"), ("a", "de", "en"), ("a", "de", "de")} and start.shape == (5, 8)

    def inputs(r):
        return {"input_ids": ids[r:r + 1], "attention_mask": torch.ones(1, 8, dtype=torch.long),
                "token_type_ids": torch.zeros(1, 8, dtype=torch.long)}

    positions = torch.tensor([answer[0]])
    module.eval()
    # ("a", de, de) window 2 reads the last English window (1); ("a", en, en) reads itself
    for row, source, same in ((3, 1, False), (0, 0, True), (2, 0, False)):
        expected = module.predict(inputs(source), inputs(row), torch.tensor([same]), positions, positions)[0]
        np.testing.assert_allclose(start[row], expected[0].numpy(), rtol=1e-5, atol=1e-5)
    alone = module.encoder.qa(**inputs(4)).start_logits[0].detach().numpy()
    np.testing.assert_allclose(start[4], alone, rtol=1e-5, atol=1e-5)


# --- translate-test evaluation -----------------------------------------------------------------


@pytest.fixture(scope="module")
def xsta_test_sets(tmp_path_factory):
    """A prepared xsta run (untrained model) with two test sets: a parallel one (en, es, de
    files; one id has no English version) and an MLQA-format one (en, de) whose ids are
    shared across its files, as MLQA's are."""
    from dist_xqa.config import load_config
    from dist_xqa.models import build_model
    from dist_xqa.prepare import prepare
    from dist_xqa.strategies.xsta_model import XstaModule
    from tests.test_testsets import mlqa_pair, squad_doc, write

    tmp = tmp_path_factory.mktemp("xsta_eval")
    ids = [f"q{i:02d}" for i in range(40)]
    no_english = "q31"  # in the test articles (6: q30-q34)
    for lang in ("en", "es", "de"):
        write(tmp / "corpus" / f"c.{lang}.json",
              squad_doc(lang, ids, leave_out=frozenset({no_english} if lang == "en" else ())))
    docs = {lang: squad_doc(lang, ids[30:35]) for lang in ("en", "de")}
    for c in ("en", "de"):
        for q in ("en", "de"):
            write(tmp / "mlqa" / f"test-context-{c}-question-{q}.json", mlqa_pair(docs[c], docs[q]))
    cfg = load_config(None, [
        f"run_dir={tmp / 'run'}", "strategy.name=xsta", "data.source=squad", f"data.train.folder={tmp / 'corpus'}",
        "data.train.pattern=c.{lang}.json", "data.train.split={train: [0, 6], dev: [7, 8]}",
        "model.max_length=64", "model.doc_stride=16", "model.tiny.vocab_size=300", "model.tiny.hidden_size=32",
        "model.tiny.intermediate_size=64",
        f"data.test=[{{name: par, folder: {tmp / 'corpus'}, pattern: 'c.{{lang}}.json', languages: [en, es, de], "
        f"articles: [6, 7]}}, {{name: ml, folder: {tmp / 'mlqa'}, format: mlqa, normalization: mlqa, "
        f"languages: [en, de]}}]"])
    prepared = prepare(cfg)
    module = XstaModule(build_model(cfg.model, prepared.tokenizer(), seed=3), cfg.strategy.xsta).eval()
    return cfg, prepared, module, no_english


def hand_translate_test(module, features, source_lang: str) -> tuple[np.ndarray, np.ndarray, set]:
    """The translate-test formula computed row by row from the model's parts: a feature whose
    id has a source-language (q = p = source) feature reads that example's window
    min(w, last), log((p_T|S + softmax(z_T)) / 2) over the valid positions; any other
    feature its QA model's logits (p_T)."""
    from dist_xqa.inference import label_tensors, model_inputs

    rows = features.select_columns(["example_id", "question_lang", "context_lang", "window"])[:]
    keys = list(zip(rows["example_id"], rows["question_lang"], rows["context_lang"]))
    source = {}
    for r, (key, w) in enumerate(zip(keys, rows["window"])):
        if key[1] == key[2] == source_lang:
            source.setdefault(key[0], {})[w] = r
    every = range(len(features))
    inputs, valid = model_inputs(features, every, torch.device("cpu")), label_tensors(features, list(every), "cpu")[0]

    def row(r: int) -> dict:
        return {k: v[r:r + 1] for k, v in inputs.items()}

    start, end, paired = [], [], set()
    with torch.no_grad():
        for r, (key, w) in enumerate(zip(keys, rows["window"])):
            if key[0] not in source:
                out = module.encoder.qa(**row(r))
                start.append(out.start_logits[0].numpy())
                end.append(out.end_logits[0].numpy())
                continue
            paired.add(key)
            s = source[key[0]][min(w, max(source[key[0]]))]
            src, tgt, positions = row(s), row(r), valid[r:r + 1]
            out = module.encoder(src, tgt, torch.tensor([key[1] == key[2] == source_lang]))
            given_source = module.calibration(out.h_tgt, out.h_src, tgt["attention_mask"].bool(),
                                              src["attention_mask"].bool(), positions, valid[s:s + 1],
                                              out.src_start, out.src_end)
            for logits, p_ts, acc in ((out.tgt_start, given_source[0], start), (out.tgt_end, given_source[1], end)):
                p_t = torch.softmax(logits.masked_fill(~positions, -torch.inf), -1)
                mixed = ((p_ts + p_t) / 2)[0]
                acc.append(torch.where(positions[0], mixed.log(), torch.finfo(mixed.dtype).min).numpy())
    return np.stack(start), np.stack(end), paired


def test_translate_test_evaluation_averages_with_the_source_version_and_says_so(xsta_test_sets):
    """On a parallel set the X-STA student scores p~_T = (p_T|S + p_T) / 2 from each example's
    English version in the set's own English file (an oracle translation), p_T where the id
    has no English version; the section keeps p_T alone and counts the examples each way."""
    from dist_xqa.eval.decode import postprocess
    from dist_xqa.eval.report import score
    from dist_xqa.eval.stage import score_test_set, score_xsta_test_set

    cfg, prepared, module, no_english = xsta_test_sets
    (spec,) = [s for s in cfg.data.test if s.name == "par"]
    test = prepared.test_set("par")
    features = test.features()
    section, preds = score_xsta_test_set(module, spec, cfg, prepared, torch.device("cpu"), desc="par")

    start, end, paired = hand_translate_test(module, features, "en")
    expected = postprocess(features, start, end, test.examples(), cfg.eval.n_best, cfg.eval.max_answer_length)
    assert preds == {"|".join(k): v for k, v in expected.items()}
    assert section["pairs"] == score(test.gold(), expected, spec.normalization)["pairs"]
    alone_section, alone_preds = score_test_set(module.encoder.qa, spec, cfg, prepared, torch.device("cpu"), "par")
    assert section["p_T_alone"] == {k: alone_section[k] for k in ("per_language", "xlt", "g_xlt", "pooled", "matrix")}
    assert preds != alone_preds  # the averaged distribution changes answers

    inference = section["inference"]
    examples = test.examples()
    lacking = [ex.key for ex in examples if ex.id == no_english]
    assert len(lacking) == 4  # es/de questions x es/de passages
    assert inference["translate_test_examples"] == len(examples) - 4 == len({k for k in paired})
    assert inference["p_T_examples"] == 4 and "no en version" in inference["p_T_because"]
    assert inference["oracle_translation"].endswith("c.en.json")
    assert inference["translate_test_scores"].startswith("p~_T = (p_T|S + p_T) / 2")
    assert inference["settings"] == {"translate_test": True, "calibrate_at_inference": True}


def test_mlqa_sets_and_translate_test_off_score_p_t_alone_and_say_why(xsta_test_sets):
    """MLQA's English file holds other passages (ids shared, passages not translations):
    p_T alone, stated. strategy.xsta.translate_test=false: p_T alone on a parallel set too."""
    from dataclasses import replace

    from dist_xqa.eval.stage import score_test_set, score_xsta_test_set

    cfg, prepared, module, _ = xsta_test_sets
    off = replace(cfg, strategy=replace(cfg.strategy, xsta=replace(cfg.strategy.xsta, translate_test=False)))
    for run, name, reason in ((cfg, "ml", "format mlqa"), (off, "par", "strategy.xsta.translate_test is false")):
        (spec,) = [s for s in run.data.test if s.name == name]
        section, preds = score_xsta_test_set(module, spec, run, prepared, torch.device("cpu"), desc=name)
        alone_section, alone_preds = score_test_set(module.encoder.qa, spec, run, prepared, torch.device("cpu"), name)
        assert preds == alone_preds and section["pairs"] == alone_section["pairs"]
        assert "p_T_alone" not in section
        inference = section["inference"]
        assert inference["translate_test_examples"] == 0 and inference["oracle_translation"] is None
        assert inference["p_T_examples"] == len(prepared.test_set(name).examples())
        assert reason in inference["p_T_because"]


def test_translate_test_is_a_checked_boolean_key():
    from dist_xqa.config import ConfigError, load_config

    assert load_config(None, ["strategy.name=xsta"]).strategy.xsta.translate_test is True
    assert load_config(None, ["strategy.name=xsta", "strategy.xsta.translate_test=false"]).strategy.xsta.translate_test is False
    with pytest.raises(ConfigError, match="strategy.xsta.translate_test"):
        load_config(None, ["strategy.name=xsta", "strategy.xsta.translate_test=sometimes"])
