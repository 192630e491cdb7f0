"""What the benchmark scripts share beside svp itself (they run as scripts: this folder is on
``sys.path``)."""
from __future__ import annotations

import argparse
import os


def json_path(path: str) -> str:
    """``--json``'s argparse type: a file whose folder exists and can be written, checked before
    the minutes of measuring (an unwritable path lost them at the end)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path}: is a folder; expected a file name for the results")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"{path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"{path}: the folder {folder} cannot be written")
    return path
