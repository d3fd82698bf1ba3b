"""``m2rnn-jax compare``: prints the error table and signals failure through its exit code."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from m2rnn_jax.cli import main  # noqa: E402

TINY = ["compare", "--hidden-size", "8", "--num-heads", "2", "--k-head-dim", "3", "--v-head-dim", "2", "--seq-len", "4"]


def test_compare_passes_and_prints_table(capsys):
    assert main(TINY + ["--dtypes", "float32", "--with-state"]) == 0
    out = capsys.readouterr().out
    for row in ("y ", "recurrent_state", "grad/x", "grad/state_weight", "grad/state.recurrent", "PASS"):
        assert row in out


def test_compare_fails_over_tolerance(capsys):
    assert main(TINY + ["--dtypes", "float32", "--with-state", "--tol-float32", "1e-30"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_compare_bad_config_is_a_clear_error(capsys):
    assert main(TINY + ["--dtypes", "float32", "--num-q-heads", "3"]) == 2
    assert "num_q_heads" in capsys.readouterr().err
