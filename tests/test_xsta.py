"""X-STA pieces: knowledge sharing around a Hugging Face BertLayer, teacher-guided
calibration, sentence InfoNCE, token alignment entropy and the total loss."""
from __future__ import annotations

import math
import sys
from pathlib import Path

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


# --- sharing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_gdks_blocks_gradients_into_the_source_only_when_languages_differ(attention):
    layer = sharing(attention)
    h_src, h_tgt, src_tokens, tgt_tokens = pair()
    same_language = torch.tensor([False, True])
    _, next_tgt = layer(h_src, h_tgt, src_tokens, tgt_tokens, same_language)
    next_tgt.sum().backward()
    assert torch.count_nonzero(h_src.grad[0]) == 0  # S != T: only sg(h_S) reaches the target
    assert torch.count_nonzero(h_src.grad[1]) > 0  # S == T: h~_S = h_S, gradients flow
    assert torch.count_nonzero(h_tgt.grad) > 0
    assert layer.correction[1].weight.grad.abs().sum() > 0  # f trains on the S != T pair


def test_without_gdks_the_target_sends_gradients_into_every_source():
    layer = sharing(gradient_disentangled=False)
    h_src, h_tgt, src_tokens, tgt_tokens = pair()
    _, next_tgt = layer(h_src, h_tgt, src_tokens, tgt_tokens, torch.tensor([False, False]))
    next_tgt.sum().backward()
    assert torch.count_nonzero(h_src.grad[0]) > 0 and torch.count_nonzero(h_src.grad[1]) > 0


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
    from dist_xqa.roles.xsta import XstaModule

    module = XstaModule(tiny_qa("eager"), XstaConfig()).eval()
    torch.manual_seed(4)
    inputs = {"input_ids": torch.randint(1, 50, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long),
              "token_type_ids": torch.zeros(2, 8, dtype=torch.long)}
    positions = torch.ones(2, 8, dtype=torch.bool)
    positions[:, 1:3] = False
    same = torch.tensor([True, True])
    start, end = module.predict(inputs, inputs, same, positions, positions)
    for scores in (start, end):
        torch.testing.assert_close(scores.exp().where(positions, 0.0).sum(-1), torch.ones(2))
    out = module.encoder(inputs, inputs, same)
    p_t = torch.softmax(out.tgt_start.masked_fill(~positions, -1e9), -1)
    assert torch.all(start.exp()[positions] >= p_t[positions] / 2 - 1e-6)  # half of p~_T is p_T
    module.x = XstaConfig(calibrate_at_inference=False)
    start, _ = module.predict(inputs, inputs, same, positions, positions)
    torch.testing.assert_close(start, out.tgt_start)



def test_the_saved_folder_loads_as_the_whole_xsta_model_and_as_the_qa_model_alone(tmp_path):
    from transformers import AutoModelForQuestionAnswering

    from dist_xqa.config import XstaConfig
    from dist_xqa.roles.xsta import XstaModule, load_xsta, save_extras

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
    from dist_xqa.roles.xsta import XstaModule, translate_test_scores

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
    assert paired == 4 and start.shape == (5, 8)

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


# --- training end to end on 2 CPU ranks (slow) -----------------------------------------------------
# Until dist_xqa/train.py calls roles.xsta.run_xsta, this file run as a script under torchrun
# does what train.py will; the data are prepared as for translate_train (its union sets).


@pytest.mark.slow
def test_xsta_trains_on_pairs_logs_every_component_and_saves_the_qa_model(tmp_path):
    from transformers import AutoModelForQuestionAnswering

    from dist_xqa.roles.xsta import load_xsta
    from tests.test_skd import launch_worker, scalars

    launch_worker(Path(__file__).resolve(), tmp_path, "translate_train")
    assert (tmp_path / "student" / "DONE.json").exists()
    logged = scalars(tmp_path / "tb")
    for part in ("total", "mrc_src", "mrc_tgt", "teacher_guided", "sentence", "token"):
        assert logged.get(f"student/loss/{part}"), part
    assert type(AutoModelForQuestionAnswering.from_pretrained(tmp_path / "student")).__name__ == "BertForQuestionAnswering"
    assert load_xsta(tmp_path / "student").encoder.share_index == 0


if __name__ == "__main__":  # the torchrun worker of the slow test above
    import torch.distributed as dist

    from dist_xqa.distributed import init_distributed, load_ds_config, make_groups
    from dist_xqa.prepare import Prepared
    from dist_xqa.roles.plan import plan_roles
    from dist_xqa.roles.xsta import run_xsta
    from tests.test_skd import ROOT, worker_config

    cfg = worker_config(Path(sys.argv[1]), "strategy.name=xsta", *sys.argv[2:])
    ctx = init_distributed()
    plan = plan_roles(ctx.world_size, ["xsta"], student_min_ranks=ctx.world_size)
    groups = make_groups(plan)
    run_xsta(cfg, Prepared(cfg.run_path), load_ds_config(ROOT / "ds_configs" / "zero2.json"), plan, groups,
             ctx.device)
    dist.barrier()
