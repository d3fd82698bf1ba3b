"""Research scripts and their tests (benchmarks, the language-model table, state tracking); never imported by the
package or by tests/."""
