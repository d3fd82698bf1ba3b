"""m2rnn_jax.train.compile_cache: JAX's persistent compilation cache behind ``--compile-cache`` (train, bench)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

from m2rnn_jax.cli import main
from m2rnn_jax.train.compile_cache import (
    DEFAULT_MAX_BYTES,
    complete_access_times,
    default_compile_cache,
    describe_compile_cache,
    use_compile_cache,
)
from tests.train.tiny import tiny_train_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def jax_cache_config():
    """Restores the session's cache settings (the repository conftest's test cache) after the test."""
    names = (
        "jax_compilation_cache_dir",
        "jax_enable_compilation_cache",
        "jax_compilation_cache_max_size",
        "jax_persistent_cache_min_compile_time_secs",
    )
    saved = {name: getattr(jax.config, name) for name in names}
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


def test_default_is_the_cache_root_unless_jax_already_has_a_directory(jax_cache_config, monkeypatch, tmp_path):
    monkeypatch.setenv("M2RNN_JAX_CACHE", str(tmp_path / "root"))
    assert default_compile_cache() == tmp_path / "root" / "compile"
    jax.config.update("jax_compilation_cache_dir", None)
    assert use_compile_cache(None) == tmp_path / "root" / "compile"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "root" / "compile")
    assert describe_compile_cache() == f"cached in {tmp_path / 'root' / 'compile'}"
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))  # as JAX_COMPILATION_CACHE_DIR sets it
    jax.config.update("jax_compilation_cache_max_size", -1)
    assert use_compile_cache(None) == tmp_path / "mine"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
    assert jax.config.jax_compilation_cache_max_size == -1  # JAX's own settings are left as they are


def test_a_directory_chosen_here_is_capped_unless_jax_has_a_size(jax_cache_config, tmp_path):
    jax.config.update("jax_compilation_cache_max_size", -1)  # JAX's default: unbounded
    use_compile_cache(str(tmp_path / "a"))
    assert jax.config.jax_compilation_cache_max_size == DEFAULT_MAX_BYTES == 16 * 2**30
    jax.config.update("jax_compilation_cache_max_size", 12345)  # as JAX_COMPILATION_CACHE_MAX_SIZE sets it
    use_compile_cache(str(tmp_path / "b"))
    assert jax.config.jax_compilation_cache_max_size == 12345


def test_an_explicit_directory_wins_and_off_turns_the_cache_off(jax_cache_config, tmp_path):
    assert use_compile_cache(str(tmp_path / "given")) == tmp_path / "given"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "given") and jax.config.jax_enable_compilation_cache
    assert use_compile_cache("off") is None
    assert not jax.config.jax_enable_compilation_cache
    assert describe_compile_cache() == "not cached (--compile-cache DIR keeps them)"
    use_compile_cache(str(tmp_path / "given"))  # on again
    assert jax.config.jax_enable_compilation_cache


def test_a_directory_written_uncapped_keeps_caching_once_capped(jax_cache_config, tmp_path):
    """Programs written by an uncapped cache (JAX's default) have no access-time file; the capped cache that
    m2rnn-jax opens on the same directory must still write new programs (JAX's eviction reads every access time)."""
    directory = tmp_path / "shared"
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_compilation_cache_max_size", -1)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_enable_compilation_cache", True)
    compilation_cache.reset_cache()
    jax.jit(lambda x: x * 3.0 + 1.0).lower(jax.numpy.ones(5)).compile()
    uncapped = sorted(directory.glob("*-cache"))
    assert uncapped and not list(directory.glob("*-atime"))

    jax.config.update("jax_compilation_cache_max_size", -1)  # no size given: use_compile_cache caps the directory
    use_compile_cache(str(directory))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # JAX reports a failed write as a warning
        jax.jit(lambda x: x * 5.0 - 2.0).lower(jax.numpy.ones(5)).compile()
    assert len(list(directory.glob("*-cache"))) == len(uncapped) + 1
    assert len(list(directory.glob("*-atime"))) == len(uncapped) + 1
    assert complete_access_times(directory) == 0  # nothing left to complete


def test_a_file_is_refused_naming_the_flag(jax_cache_config, tmp_path):
    (tmp_path / "file").write_text("x")
    before = jax.config.jax_compilation_cache_dir
    with pytest.raises(ValueError, match=r"^--compile-cache: expected a directory .* \(a file\)$"):
        use_compile_cache(str(tmp_path / "file"))
    with pytest.raises(ValueError, match=r"^--other: "):
        use_compile_cache(str(tmp_path / "file"), flag="--other")
    assert jax.config.jax_compilation_cache_dir == before


def _cli(env: dict, *argv: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "m2rnn_jax", *argv]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_train_eval_and_generate_read_their_programs_from_the_default_cache(tmp_path):
    """Separate processes, each with the default cache ($M2RNN_JAX_CACHE/compile): a run writes its compiled train
    step there and its --restart finds it; eval finds the evaluation step the run compiled at its end; a second
    generate finds the first one's programs. JAX logs every hit with JAX_LOG_COMPILES."""
    config_file = tmp_path / "tiny.json"
    config_file.write_text(json.dumps(tiny_train_config(steps=1, eval_every=0).to_dict()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(M2RNN_JAX_CACHE=str(tmp_path / "root"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    train = ["train", "--config", str(config_file), "--workdir", str(tmp_path / "run")]
    first = _cli(env, *train)
    cache = tmp_path / "root" / "compile"
    assert f"compiles  cached in {cache}" in first.stdout
    assert any(path.name.startswith("jit_train_step-") for path in cache.iterdir())
    logged = {**env, "JAX_LOG_COMPILES": "1"}
    hit = "Persistent compilation cache hit for '{}'"
    assert hit.format("jit_train_step") in _cli(logged, *train, "--restart").stderr
    assert hit.format("jit_eval_step") in _cli(logged, "eval", "--workdir", str(tmp_path / "run")).stderr
    generate = ["generate", "--checkpoint", str(tmp_path / "run"), "--prompt-ids", "1,2,3", "--max-new-tokens", "2"]
    assert hit.format("jit__generate") not in _cli(logged, *generate).stderr
    assert hit.format("jit__generate") in _cli(logged, *generate).stderr


def test_bench_compile_cache_moves_the_open_cache(jax_cache_config, tmp_path):
    """In a process that has compiled already (this test session, with the conftest's cache open), bench
    --compile-cache DIR writes the step to DIR."""
    min_seconds = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        jax.jit(lambda x: x * 3 + 1)(jax.numpy.arange(5.0)).block_until_ready()  # opens the session's cache
        argv = ["bench", "--model", "tiny-hybrid", "--batch", "2", "--seq-len", "16", "--compile-only"]
        assert main([*argv, "--compile-cache", str(tmp_path / "bench"), "--json", str(tmp_path / "b.json")]) == 0
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds)
    assert any(path.name.startswith("jit_train_step-") for path in (tmp_path / "bench").iterdir())
    assert json.loads((tmp_path / "b.json").read_text())["compile_cache"] == f"cached in {tmp_path / 'bench'}"
