"""``m2rnn-jax info``: describe a model preset (parameter counts, layer pattern, state sizes) or list presets.

Counts come from the abstract model (``nnx.eval_shape``), so even the 7B presets are described without allocating
their parameters.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from m2rnn_jax.commands.arguments import check_preset
from m2rnn_jax.commands.errors import fail

NAME = "info"


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(NAME, help="describe a model preset (parameters, layer pattern, state) or list presets")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--preset", help="preset name, e.g. hybrid-m2rnn-400m")
    what.add_argument("--list", action="store_true", help="print every preset name (one per line) and its description")
    p.add_argument("--json", action="store_true", help="print the description as one JSON object")
    p.set_defaults(run=run)


def _format_text(summary: dict[str, Any]) -> str:
    lines = [f"{summary['preset']}: {summary['description']}"]
    for key, value in summary.items():
        if key in ("preset", "description"):
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            value = f"{value:,}"
        lines.append(f"  {key:<30} {value}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from m2rnn_jax.models.counting import model_summary
    from m2rnn_jax.train.presets import get_preset, list_presets, preset_description

    if args.list:
        names = list_presets()
        width = max(len(name) for name in names)
        for name in names:
            print(f"{name:<{width}}  {preset_description(name)}")
        return 0
    try:
        check_preset("--preset", args.preset)
        config = get_preset(args.preset)
    except ValueError as err:
        return fail(NAME, err)
    summary = {"preset": args.preset, "description": preset_description(args.preset), **model_summary(config)}
    print(json.dumps(summary, indent=2) if args.json else _format_text(summary))
    return 0
