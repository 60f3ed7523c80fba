"""`jaxgen`'s argument values, checked as argparse parses them: one `jaxgen: error:` line naming the
argument, the value and what would be valid, before any command runs."""

from __future__ import annotations

import argparse
import difflib
import math
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from jaxgen.config import MAX_GUIDANCE
from jaxgen.config_section import MAX_SEED
from jaxgen.errors import UsageError
from jaxgen.files import unwritable_place


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every real default; options whose default depends on something else say so in their help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == []:
            return action.help or ""
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """A usage mistake ends like every other mistake: one `jaxgen: error:` line."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        # argparse's "invalid choice: 'trian' (choose from 'train', ...)": the choice meant, where one is close
        if (wrong := re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)) is not None:
            close = difflib.get_close_matches(wrong[1], re.findall(r"'([^']*)'", wrong[2]), n=1, cutoff=0.6)
            message += f"; did you mean {close[0]!r}?" if close else ""
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def _argument(parse: Callable[[str], Any], accepted: Callable[[Any], bool], says: str) -> Callable[[str], Any]:
    """An argparse type: `parse`d, then refused with `says` (formatted with the value) unless `accepted`."""
    def checked(text: str):
        value = parse(text)
        if not accepted(value):
            raise argparse.ArgumentTypeError(says.format(value))
        return value
    return checked


positive_int = _argument(_integer, lambda n: n >= 1, "{} is not a positive integer")
non_negative_int = _argument(_integer, lambda n: n >= 0, "{} is negative; give 0 or more")
seed = _argument(_integer, lambda n: 0 <= n <= MAX_SEED, f"{{}} is not a seed; give an integer from 0 to {MAX_SEED}")
non_negative_float = _argument(_finite, lambda x: x >= 0, "{:g} is negative; give 0 or more")
probability_mass = _argument(_finite, lambda x: 0 < x <= 1,
                             "{:g} is not a probability mass; give a number above 0, at most 1")
port_number = _argument(_integer, lambda n: 1 <= n <= 65535, "{} is not a TCP port; give 1 to 65535")

guidance_scale = _argument(_finite, lambda x: 0 <= x <= MAX_GUIDANCE,
                           f"{{:g}} is not a guidance scale; give 0 to {MAX_GUIDANCE:g} (1 = no guidance)")

# Simulated devices take XLA seconds per thousand to create; 100,000 hung for minutes, then crashed.
MAX_CPU_DEVICES = 4096
cpu_device_count = _argument(_integer, lambda n: 1 <= n <= MAX_CPU_DEVICES,
                             f"{{}} is not a simulated device count; give 1 to {MAX_CPU_DEVICES}")


def label_list(text: str) -> list[int]:
    """An argparse type for comma-separated class labels: plain decimal integers (int() would also take '0_1' as
    label 1, or other scripts' digits); whether each is a class of the model is the command's check."""
    pieces = [piece.strip() for piece in text.split(",")]
    bad = next((piece for piece in pieces if not re.fullmatch(r"-?[0-9]+", piece)), None)
    if bad is not None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers ({bad!r} is not one), "
                                         "e.g. 0,1,2")
    return [int(piece) for piece in pieces]


def utf8_text(text: str) -> str:
    """An argparse type for text to encode (a prompt, a caption): what the command line held was UTF-8. Other
    bytes reach Python as lone surrogates, which the LM's tokenizer refused with an internal error and the
    text encoder took as text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        byte = ord(text[err.start]) - 0xDC00 if 0xDC80 <= ord(text[err.start]) <= 0xDCFF else None
        what = f"byte 0x{byte:02x}" if byte is not None else f"{text[err.start]!r}"
        raise argparse.ArgumentTypeError(f"holds {what} at character {err.start + 1}, which is not UTF-8 text; "
                                         "give UTF-8 text") from None
    return text


def path_given(gives: str) -> Callable[[str], str]:
    """An argparse type for a path a command reads: not empty. An empty one is most often a variable that was
    not set (`--run-dir "$RUN_DIR"` in a job script); taken as no value or as the current folder, it would start
    a new run where the job meant to continue one, or read the wrong thing."""
    def checked(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"an empty path (a variable not set?); give {gives}")
        return text
    return checked


def file_to_write(suffix: str = "", kind: str = "") -> Callable[[str], str]:
    """An argparse type for an output file, checked before any work (writing it at the end would fail then):
    not empty, not a directory, and named `suffix` when given (`kind` says what the file holds)."""
    def checked(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError("an empty path; give the file to write")
        if os.path.isdir(text):
            raise argparse.ArgumentTypeError(f"{text!r} is a directory; give the file to write, e.g. "
                                             f"{os.path.join(text, 'NAME' + suffix)}")
        if not text.lower().endswith(suffix):
            raise argparse.ArgumentTypeError(f"{text!r} does not end in {suffix}; the file written is {kind}")
        refuse_unwritable_place(text)
        return text
    return checked


def refuse_unwritable_place(text: str, directory: bool = False) -> None:
    """Output path `text` (a file, or a `directory`) must be one this process can make (`files.unwritable_place`)."""
    if (why := unwritable_place(text, directory)) is not None:
        raise argparse.ArgumentTypeError(why)


def directory_to_write(text: str) -> str:
    """An argparse type for an output directory: not empty, not a file or under one, and in a place that takes
    new files (whether it may already exist is the command's own check)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give a directory")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # the checkpoint writer takes only UTF-8 paths
        shown = os.fsencode(text).decode("ascii", "backslashreplace")
        if sys.getfilesystemencoding().lower().replace("-", "") == "utf8":  # bytes that are no UTF-8 text
            raise argparse.ArgumentTypeError(f"'{shown}' is not a UTF-8 path; give a UTF-8 name") from None
        raise argparse.ArgumentTypeError(f"'{shown}' is not a UTF-8 path (the locale is {sys.getfilesystemencoding()}"
                                         "); set a UTF-8 locale (e.g. LANG=C.UTF-8) or give another path") from None
    refuse_unwritable_place(text, directory=True)
    return text
