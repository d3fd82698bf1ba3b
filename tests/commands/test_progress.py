"""``m2rnn_jax.train.progress``: header, phase lines, record lines with step/total and ETA, the live tqdm bar."""

from __future__ import annotations

import io
import time

from m2rnn_jax.train.progress import Console, format_duration, format_value


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_header_and_phases_on_a_pipe():
    stream = io.StringIO()
    console = Console(stream)
    assert not console.live
    console.header("m2rnn-jax train: tiny", [("model", "M (1 layer)"), ("workdir", "runs/x (new run)")])
    with console.timed_phase("compiling the train step", "compiled"):
        pass
    lines = stream.getvalue().splitlines()
    assert lines[0] == "m2rnn-jax train: tiny"
    assert lines[1] == "  model    M (1 layer)" and lines[2] == "  workdir  runs/x (new run)"
    assert lines[3] == "-- compiling the train step ..."
    assert lines[4].startswith("-- compiling the train step: compiled in ") and lines[4].endswith(" s")


def test_records_carry_step_total_rate_and_eta_without_a_bar():
    stream = io.StringIO()
    console = Console(stream)
    progress = console.start_progress(100, initial=10, desc="train")
    time.sleep(0.02)
    progress.update(20)
    console.record("train", 20, {"loss": 2.345678, "seq_len": 16})
    console.record("eval_len16", 20, {"loss": 1.5})
    train, evaluation = stream.getvalue().splitlines()
    assert train.startswith("train step 20: loss=2.346 seq_len=16 [20/100 (")
    rate = float(train.split("(")[1].split(" step/s")[0])
    assert 0 < rate < 10 / 0.02 * 1.01  # 10 steps in >= 20 ms
    assert "eta " in train and train.endswith(")]")
    assert evaluation == "eval_len16 step 20: loss=1.5"  # no progress of that name
    progress.update(30)
    progress.restart_clock()  # e.g. a compile: nothing timed since
    console.record("train", 30, {"loss": 2.0})
    assert stream.getvalue().splitlines()[-1] == "train step 30: loss=2 [30/100]"


def test_plain_status_lines_every_interval():
    stream = io.StringIO()
    console = Console(stream)
    progress = console.start_progress(4, desc="eval", unit="batch", plain_every=0.0)
    for position in range(1, 5):
        progress.update(position)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert all(line.startswith("eval ") for line in lines)
    assert console.progress is None


def test_live_bar_on_a_terminal_prints_lines_above_it():
    stream = _Terminal()
    console = Console(stream)
    assert console.live
    progress = console.start_progress(10, desc="train")
    progress.update(3, loss=1.25)
    console.phase("curriculum: sequence length 8 -> 16 at step 3")
    progress.update(10)
    console.close()
    text = stream.getvalue()
    assert "\r" in text and "/10" in text  # the tqdm bar, redrawn in place
    assert "-- curriculum: sequence length 8 -> 16 at step 3\n" in text


def test_disabled_console_prints_nothing():
    stream = _Terminal()
    console = Console(stream, enabled=False)
    assert not console.live
    console.header("x", [("a", 1)])
    console.phase("y")
    console.start_progress(3, desc="train").update(3)
    console.record("train", 3, {"loss": 1.0})
    assert stream.getvalue() == ""


def test_formats():
    assert format_value(0.123456) == "0.1235" and format_value(3) == "3"
    assert [format_duration(s) for s in (0.4, 42, 187, 7500)] == ["0s", "42s", "3m07s", "2h05m"]
