"""experiments/bench/xla_pass_times.py: XLA's compile log summed by pass, with the time outside the passes."""

from experiments.bench.xla_pass_times import parse, report

LOG = """\
I1205 10:00:00.000000   1 hlo_pass_pipeline.cc:303] Running HLO pass pipeline on module jit_small: opt
I1205 10:00:00.100000   1 hlo_pass_pipeline.cc:176] HLO pass: dce time: 100 ms (100000 us) (cumulative: 1 s)
I1205 10:00:01.000000   1 hlo_pass_pipeline.cc:303] Running HLO pass pipeline on module jit_step: optimization
I1205 10:00:01.500000   1 hlo_pass_pipeline.cc:303] Running HLO pass pipeline on module jit_step: simplification
I1205 10:00:02.000000   1 hlo_pass_pipeline.cc:176] HLO pass: algsimp time: 500 ms (500000 us) (cumulative: 1 s)
I1205 10:00:02.000100   1 hlo_pass_pipeline.cc:176] HLO pass: simplification time: 500 ms (500000 us) (cumulative: 1 s)
I1205 10:00:04.000000   1 hlo_pass_pipeline.cc:176] HLO pass: fusion time: 2 s (2000000 us) (cumulative: 3 s)
I1205 10:00:04.000100   1 gpu_compiler.cc:1] emitting LLVM IR
I1205 10:00:14.000100   1 nvptx_compiler.cc:1] ptx compiled
not a log line
"""


def test_report_sums_leaf_passes_of_the_longest_module_and_finds_the_codegen_gap():
    records = parse(LOG.splitlines())
    assert len(records) == 9 and records[0][0] == 0.0
    text = report(records, top=3)
    # jit_step spans 13 s: algsimp 0.5 + fusion 2 (the nested "simplification" pipeline's own line is not added)
    assert text.splitlines()[0] == (
        "module jit_step: 13.0 s from its first to its last log line; HLO passes 2.5 s; outside the passes 10.5 s"
    )
    gaps = text.split("largest gaps")[1].splitlines()[1:]
    assert "10.00 s" in gaps[0] and "emitting LLVM IR" in gaps[0]
    assert "jit_small" in report(records, module="jit_small").splitlines()[0]


def test_report_without_pass_lines_says_which_logging_to_turn_on():
    assert "TF_CPP_VMODULE=hlo_pass_pipeline=1" in report(parse(["I1205 10:00:00.000000 1 x.cc:1] hello"]))
