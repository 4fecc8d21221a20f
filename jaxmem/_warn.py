"""Warnings attributed to the user's own line."""

from __future__ import annotations

import os
import sys
import warnings

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the first frame outside jaxmem.

    A fixed ``stacklevel`` names the caller's line only at one depth: a public function that
    reaches a warning through another (``influence`` -> ``leverage`` -> the factorization)
    pointed it into jaxmem, where Python's once-per-location filter also merged the warnings
    of different call sites. (Python 3.12's ``skip_file_prefixes`` does this; 3.11 lacks it.)
    Their module is then the caller's: filter them by message or category, not by
    ``module="jaxmem"``.
    """
    frame, level = sys._getframe(1), 2  # stacklevel 2 is warn's caller
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warning = category(message)
    warning.jaxmem = True  # the command line shows jaxmem's own warnings as one line, wherever they point
    warnings.warn(warning, stacklevel=level)
