"""The small language-model table compares models of equal size: check the parameter budgets and patterns."""

from __future__ import annotations

from experiments.lm_table.configs import PAPER_PERPLEXITY_400M, PATTERNS, small_config
from m2rnn_jax.models.counting import abstract_decoder, count_parameters


def test_every_variant_has_the_same_parameter_budget_within_4_percent():
    totals = {variant: count_parameters(abstract_decoder(small_config(variant, 8192))).total for variant in PATTERNS}
    assert set(PATTERNS) == set(PAPER_PERPLEXITY_400M)
    assert max(totals.values()) / min(totals.values()) < 1.04, totals
    assert 20e6 < min(totals.values()) and max(totals.values()) < 50e6


def test_hybrid_patterns_place_attention_and_m2rnn_as_the_paper():
    assert PATTERNS["hybrid-gdn"] == "GGAGGGAGGGAG"
    assert PATTERNS["hybrid-gdn-m2rnn-1l"] == "MGAGGGAGGGAG"
    assert PATTERNS["hybrid-gdn-m2rnn-3l"] == "GMAGGMAGGMAG"
    assert small_config("attention", 8192).attention.position_embedding == "rope"
    assert small_config("hybrid-m2rnn", 8192).attention.position_embedding != "rope"
