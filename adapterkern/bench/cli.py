"""``python -m adapterkern.bench [SUBCOMMAND] [...]``: which module's ``main(argv)`` runs which command.

Without a subcommand the grid runs; ``python -m adapterkern.bench SUBCOMMAND --help`` for each one.
"""
from __future__ import annotations

import sys
from typing import List, Optional

from . import adapterdrop, grid, inference, layer, multi, plot, report, tradeoffs

COMMANDS = {
    "layer": layer.main,
    "inference": inference.main,
    "tradeoffs": tradeoffs.main,
    "adapterdrop": adapterdrop.main,
    "multi": multi.main,
    "plot": plot.main,
    "table": report.main,
}


def main(argv: Optional[List[str]] = None) -> int:
    """Run the subcommand ``argv[0]`` names with the rest of ``argv``, else the grid with all of it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    return grid.main(argv, subcommands=tuple(COMMANDS))
