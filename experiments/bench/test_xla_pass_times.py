"""experiments/bench/xla_pass_times.py: XLA's compile log summed by outermost pass, with the time outside them."""

from experiments.bench.xla_pass_times import parse, report

# The shape of a GPU compile's log (jax 0.11): a small module, then the train step, whose autotuning pass compiles a
# candidate fusion as its own module (with its own pipeline and passes) and whose "simplification" pipeline runs as
# a pass of "optimization". Times have decimals, as XLA writes them.
LOG = """\
I1205 10:00:00.000000   1 hlo_pass_pipeline.cc:302] Running HLO pass pipeline on module jit_small: opt
I1205 10:00:00.000100   1 hlo_pass_pipeline.cc:211]   HLO pass dce
I1205 10:00:00.100000   1 hlo_pass_pipeline.cc:206] HLO pass: dce time: 99.9 ms (99900 us) (cumulative: 1 s)
I1205 10:00:01.000000   1 hlo_pass_pipeline.cc:302] Running HLO pass pipeline on module jit_step: optimization
I1205 10:00:01.000100   1 hlo_pass_pipeline.cc:211]   HLO pass simplification
I1205 10:00:01.500000   1 hlo_pass_pipeline.cc:211]   HLO pass algsimp
I1205 10:00:02.000000   1 hlo_pass_pipeline.cc:206] HLO pass: algsimp time: 500 ms (500000 us) (cumulative: 1 s)
I1205 10:00:02.000100   1 hlo_pass_pipeline.cc:206] HLO pass: simplification time: 1 s (1000000 us) (cumulative: 1 s)
I1205 10:00:02.000200   1 hlo_pass_pipeline.cc:211]   HLO pass config-assigner
I1205 10:00:02.100000   1 hlo_pass_pipeline.cc:302] Running HLO pass pipeline on module gemm_fusion_dot.1: fusion
I1205 10:00:02.100100   1 hlo_pass_pipeline.cc:211]   HLO pass priority-fusion
I1205 10:00:03.100000   1 hlo_pass_pipeline.cc:206] HLO pass: priority-fusion time: 1 s (1000000 us) (cumulative: 1 s)
I1205 10:00:04.250000   1 hlo_pass_pipeline.cc:206] HLO pass: config-assigner time: 2.25 s (2250000 us) (cumulative: 3)
I1205 10:00:04.250100   1 gpu_compiler.cc:1] emitting LLVM IR
I1205 10:00:14.250100   1 nvptx_compiler.cc:1] ptx compiled
not a log line
"""


def test_report_sums_outermost_passes_of_the_longest_module_and_finds_the_codegen_gap():
    records = parse(LOG.splitlines())
    assert len(records) == 15 and records[0][0] == 0.0
    text = report(records, top=3)
    # jit_step spans 13.25 s; its outermost passes are simplification (1 s, algsimp inside) and config-assigner
    # (2.25 s, the candidate module's priority-fusion inside): 3.25 s.
    assert text.splitlines()[0] == (
        "module jit_step: 13.3 s from its first to its last log line; HLO passes 3.2 s; outside the passes 10.0 s"
    )
    passes = text.split("outermost passes (summed over")[1].split("largest gaps")[0]
    assert "2.25 s  config-assigner" in passes and "1.00 s  simplification" in passes
    assert "algsimp" not in passes and "priority-fusion" not in passes
    gaps = text.split("largest gaps")[1].splitlines()[1:]
    assert "10.00 s" in gaps[0] and "emitting LLVM IR" in gaps[0]
    assert report(records, module="jit_small").splitlines()[0].startswith("module jit_small: 0.1 s")


def test_report_without_pass_lines_says_which_logging_to_turn_on():
    assert "TF_CPP_VMODULE=hlo_pass_pipeline=1" in report(parse(["I1205 10:00:00.000000 1 x.cc:1] hello"]))
