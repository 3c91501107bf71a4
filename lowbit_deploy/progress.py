"""When a progress bar shows: the one rule the training loop and the sensitivity analysis share."""

from __future__ import annotations

import sys
from typing import TextIO


def show_progress(progress: bool | None, stream: TextIO | None = None) -> bool:
    """``True`` forces a bar, ``False`` hides it, ``None`` (the CLI's default) shows it only when ``stream``
    (stderr, where tqdm writes) is a terminal: in CI logs and pipes a bar is only carriage-return noise."""
    if progress is not None:
        return bool(progress)
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())
