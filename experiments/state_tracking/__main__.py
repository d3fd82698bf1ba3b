"""``python -m experiments.state_tracking compare ...``: every mixer on one budget (:mod:`.compare`);
``python -m experiments.state_tracking [--groups ...]``: the ``state-tracking-*`` presets over seeds (:mod:`.sweep`)."""

from __future__ import annotations

import sys

from experiments.state_tracking import compare, sweep

if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] == ["compare"]:
        raise SystemExit(compare.main(argv[1:]))
    raise SystemExit(sweep.main(argv))
