"""The JAX decoder against the independent torch twin: logits, aux loss, loss, decode path, every gradient.

Each case is one layer of a mixer letter with the MoE channel mixer; ``test_dense_swiglu`` covers the dense MLP.
JAX compilation makes each case take 10-40 s on a 2-core CPU, so all but one are marked slow.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from m2rnn_jax.cli import main  # noqa: E402
from m2rnn_jax.interop.model_parity import compare_model_with_torch, randomize_model_params  # noqa: E402
from m2rnn_jax.models import Decoder  # noqa: E402
from m2rnn_jax.models.presets import tiny_config  # noqa: E402

TOLERANCES = {"float32": 1e-5, "float64": 1e-10}


def _worst(pattern: str, dtype: str, moe: bool = True, seq_len: int = 6) -> tuple[str, float]:
    """(name, relative error) of the worst row; the MoE aux loss, which the decoder returns in float32 whatever its
    dtype (DecoderOutput contract), and the loss that includes it are checked against the float32 tolerance and
    left out (``cross_entropy`` stays)."""
    with jax.enable_x64(dtype == "float64"), jax.default_matmul_precision("highest"):
        config = tiny_config(pattern, moe=moe, vocab_size=32, hidden_size=32).replace(dtype=dtype, param_dtype=dtype)
        model = Decoder(config, rngs=nnx.Rngs(0))
        randomize_model_params(model, 1)
        rng = np.random.default_rng(2)
        ids, targets = rng.integers(0, 32, (2, seq_len)), rng.integers(0, 32, (2, seq_len))
        errors = compare_model_with_torch(model, ids, targets)
    assert {"logits", "cross_entropy", "aux_loss", "loss", "decode", "grad/lm_head.weight"} <= set(errors)
    assert sum(name.startswith("grad/") for name in errors) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    name = max(errors, key=lambda key: errors[key]["rel"])
    return name, errors[name]["rel"]


def test_m2rnn_moe_float32():
    name, rel = _worst("M", "float32")
    assert rel < TOLERANCES["float32"], (name, rel)


@pytest.mark.slow
@pytest.mark.parametrize(
    "letter, dtype",
    # ("M", "float32") is the default test above
    [(letter, dtype) for dtype in ("float32", "float64") for letter in "MGSARU" if (letter, dtype) != ("M", "float32")],
)
def test_every_mixer_with_moe(letter, dtype):
    name, rel = _worst(letter, dtype)
    assert rel < TOLERANCES[dtype], (name, rel)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dense_swiglu(dtype):
    name, rel = _worst("RM", dtype, moe=False)
    assert rel < TOLERANCES[dtype], (name, rel)


@pytest.mark.slow
def test_compare_model_cli(capsys):
    args = ["compare", "--model", "tiny-m2rnn", "--seq-len", "5", "--batch", "1"]
    assert main(args + ["--dtypes", "float32", "float64"]) == 0
    out = capsys.readouterr().out
    for row in (
        "logits",
        "aux_loss",
        "decode",
        "grad/transformer.h.2.sequence_mixer.c_attn.weight",
        "grad/transformer.h.0.mlp_block.c_fc.weight",
        "PASS",
    ):
        assert row in out
    assert main(args + ["--dtypes", "float32", "--tol-float32", "1e-30"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_compare_model_bad_input_exits_2(capsys):
    assert main(["compare", "--model", "no-such-preset"]) == 2
    assert "--model: expected a run directory holding config.json or a preset name" in capsys.readouterr().err
    assert main(["compare", "--step", "3"]) == 2
    assert "--step: only with --model" in capsys.readouterr().err
