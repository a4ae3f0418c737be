"""Progress bars for the long steps (data, training, reconstruction, scoring, downloads).

On a terminal a bar redraws in place; written to a file (CI logs, a worker's log, a pipe) it
prints one line a minute instead of one per update, so two bars side by side do not fill a log
with thousands of lines.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.auto import tqdm

LOG_INTERVAL_S = 60.0  # seconds between two lines of a bar that is not on a terminal
# Set (to anything) by ``diffad benchmark --no-progress`` and ``rerun --no-progress``: the flow's
# tasks run in that process (and processes it starts inherit it), so one switch turns off every bar.
NO_PROGRESS_ENV = "DIFFAD_NO_PROGRESS"


class _Bar(tqdm):
    """A tqdm bar whose postfix (a loss, a category name) shows at its next redraw: tqdm's
    default redraws at every ``set_postfix``, which defeats the redraw interval."""

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = False, **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=refresh, **kwargs)

    def set_postfix_str(self, s: str = "", refresh: bool = False) -> None:
        super().set_postfix_str(s, refresh=refresh)


def progress_bar(*, total: int | None, desc: str, enabled: bool = True, **options: Any) -> tqdm:
    """A tqdm bar on stderr (disabled unless ``enabled`` and ``NO_PROGRESS_ENV`` is unset);
    ``options`` go to tqdm (unit, ...)."""
    enabled = enabled and not os.environ.get(NO_PROGRESS_ENV)
    on_terminal = sys.stderr.isatty()
    options.setdefault("mininterval", 0.1 if on_terminal else LOG_INTERVAL_S)
    return _Bar(total=total, desc=desc, disable=not enabled, dynamic_ncols=on_terminal, **options)
