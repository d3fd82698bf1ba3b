"""Settings of every pytest run (``tests/`` and the experiments' tests beside their code).

Many tests compile the same programs (the tiny train step of every Trainer, the tiny models): JAX's persistent
compilation cache, shared by the xdist workers of a run, turns the repeats into disk reads (docs/testing.md).
An explicit JAX_COMPILATION_CACHE_DIR wins; subprocesses started by tests do not inherit the setting.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import jax

if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", str(Path(tempfile.gettempdir()) / "m2rnn-jax-test-compile-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
