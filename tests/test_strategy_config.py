"""The xsta and skd strategy sections: defaults (the papers'), accepted values, and refusals
that name the key to fix."""
from __future__ import annotations

import pytest
import yaml

from dist_xqa.config import STRATEGIES, ConfigError, load_config


def refused(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    return str(info.value)


def test_both_strategies_are_selectable_with_the_papers_defaults():
    assert {"xsta", "skd"} <= set(STRATEGIES)
    x = load_config(None, ["strategy.name=xsta"]).strategy.xsta
    assert (x.lambda0, x.alpha, x.gamma, x.sentence_weight, x.token_weight, x.infonce_tau, x.norm_eps) == (
        0.3, 0.2, 0.1, 0.05, 0.05, 0.05, 1e-8)
    assert (x.gdks, x.mix_on, x.alignment, x.normalize, x.calibrate_at_inference) == (True, "self", "masked", True, True)
    assert (x.alignment_layer, x.norm_stats) == ("final", "side")
    k = load_config(None, ["strategy.name=skd"]).strategy.skd
    assert (k.coefficient, k.map_k, k.map_delta, k.map_reduction, k.temperature) == ("map", 10, 5, "batch", 2.0)
    assert (k.alpha_ce, k.alpha_kl, k.tau_squared, k.kl_start_end) == (1.0, 1.0, False, "sum")


@pytest.mark.parametrize("override", [
    "strategy.xsta.mix_on=cross", "strategy.xsta.alignment=pair", "strategy.xsta.gdks=false",
    "strategy.xsta.gamma=0", "strategy.xsta.share_layer=2", "strategy.xsta.source_lang=es",
    "strategy.xsta.alignment_layer=share", "strategy.xsta.norm_stats=shared",
    "strategy.skd.coefficient=mrr", "strategy.skd.coefficient=fixed", "strategy.skd.coefficient=none",
    "strategy.skd.map_reduction=example", "strategy.skd.tau_squared=true", "strategy.skd.kl_start_end=mean",
    "strategy.skd.alpha_ce=0", "strategy.skd.sampled_languages=1", "strategy.skd.phase1=false",
])
def test_the_papers_ablations_and_the_public_codes_options_are_accepted(override):
    key, value = override.split("=")
    _, strategy, name = key.split(".")
    cfg = load_config(None, [f"strategy.name={strategy}", override])
    assert getattr(getattr(cfg.strategy, strategy), name) == yaml.safe_load(value)


@pytest.mark.parametrize("overrides, key, hint", [
    (["strategy.xsta.mix_on=both"], "strategy.xsta.mix_on", "self (paper) or cross (public code)"),
    (["strategy.xsta.alignment=full"], "strategy.xsta.alignment", "masked (paper) or pair (public code)"),
    (["strategy.xsta.alpha=1.5"], "strategy.xsta.alpha", "[0, 1]"),
    (["strategy.xsta.alignment_layer=first"], "strategy.xsta.alignment_layer", "final (the final layer's"),
    (["strategy.xsta.norm_stats=language"], "strategy.xsta.norm_stats", "side (statistics per side) or shared"),
    (["strategy.xsta.gamma=-0.1"], "strategy.xsta.gamma", "switches the term off"),
    (["strategy.xsta.infonce_tau=0"], "strategy.xsta.infonce_tau", "positive"),
    (["strategy.xsta.share_layer=0"], "strategy.xsta.share_layer", "counts from 1"),
    (["strategy.xsta.share_layer=3"], "strategy.xsta.share_layer", "deeper than the 2 layers"),
    (["strategy.xsta.source_lang=fr"], "strategy.xsta.source_lang", "leave it null"),
    (["strategy.skd.coefficient=ndcg"], "strategy.skd.coefficient", "map (paper), mrr (public code)"),
    (["strategy.skd.map_reduction=row"], "strategy.skd.map_reduction", "batch (paper) or example"),
    (["strategy.skd.kl_start_end=max"], "strategy.skd.kl_start_end", "sum (paper) or mean (public code)"),
    (["strategy.skd.map_k=0"], "strategy.skd.map_k", ">= 1"),
    (["strategy.skd.temperature=0"], "strategy.skd.temperature", "positive"),
    (["strategy.skd.sampled_languages=5"], "strategy.skd.sampled_languages", "0..2"),
    (["strategy.skd.init_from=runs/x/model"], "strategy.skd.phase1", "false"),
    (["strategy.skd.alpha_ce=0", "strategy.skd.coefficient=none"], "strategy.skd", "nothing to train"),
    (["strategy.skd.temprature=2"], "strategy.skd.temprature", "valid keys here"),
])
def test_bad_values_are_refused_naming_the_key_and_what_to_do(overrides, key, hint):
    message = refused(["strategy.name=skd", *overrides])
    assert key in message and hint in message


def test_the_demo_configs_of_both_strategies_load():
    from dist_xqa.config import REPO_ROOT

    skd = load_config(REPO_ROOT / "configs" / "demo_skd.yaml")
    assert skd.strategy.name == "skd" and skd.strategy.skd.phase1 and skd.strategy.skd.sampled_languages == 1
    xsta = load_config(REPO_ROOT / "configs" / "demo_xsta.yaml")
    assert xsta.strategy.name == "xsta" and xsta.strategy.xsta.alpha == 0.2


def test_skd_refuses_a_top_k_store_keeping_fewer_positions_than_map_k_ranks():
    """mAP@k ranks the teacher's map_k best positions; a top-k store keeps k of them and gives
    every other position one shared value, so ranks past k would be ties broken at random."""
    message = refused(["strategy.name=skd", "distill.store_topk=8"])
    assert "distill.store_topk" in message and "strategy.skd.map_k" in message
    assert "8" in message and "10" in message
    assert refused(["strategy.name=skd", "strategy.skd.coefficient=mrr", "distill.store_topk=9"])
    for overrides in (["distill.store_topk=10"], ["distill.store_topk=8", "strategy.skd.map_k=8"],
                      ["distill.store_topk=4", "strategy.skd.coefficient=fixed"],
                      ["distill.store_topk=4", "strategy.skd.coefficient=none"]):
        assert load_config(None, ["strategy.name=skd", *overrides]).distill.store_topk is not None
    # lbmrc's top-k store ranks nothing: the skd keys do not bound it
    assert load_config(None, ["distill.store_topk=4"]).distill.store_topk == 4
