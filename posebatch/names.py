"""Bytes-safe keys: a file name that is not valid UTF-8 becomes a key that is, reversibly.

Why: on Linux a file name is bytes, and a photo copied from an old camera card or a Windows
archive may hold a byte like 0xFF that no UTF-8 text can carry. Python lists it with a
"surrogate escape" (``'\\udcff'``) that crashes any UTF-8 writer: JSON, CSV, S3 keys, Redis. So
every key is text that *is* UTF-8, and the folder storage maps it to and from the real name:

- a byte that is not part of valid UTF-8 is written ``*xHH`` (two lowercase hex digits);
- a ``*`` in the name is written ``**`` so that the escape stays reversible.

Why ``*``: the key also names S3 objects, and ``*`` is one of S3's "safe" key characters, whereas
a backslash (the usual escape) is one to avoid: SeaweedFS turns it into ``/``. And ``*`` cannot
occur in a name that ever lived on Windows, so real names almost never change. Every other
character is kept as it is (accents, CJK, spaces, ``%``). ``name_from_key`` undoes it exactly;
a ``*`` that starts neither sequence is kept literally, so a key that came from S3 (where names
are always UTF-8 and never escaped) still maps to the file of the same name.
"""

from __future__ import annotations

import re

_ESCAPE = re.compile(r"\*(\*|x[89a-f][0-9a-f])")


def key_from_name(name: str) -> str:
    """A name as ``os`` functions return it (surrogate-escaped) -> a UTF-8-safe key segment."""
    if "*" not in name and name.isascii():
        return name
    out = []
    for ch in name:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, as surrogateescape lists it
            out.append(f"*x{code - 0xDC00:02x}")
        elif ch == "*":
            out.append("**")
        else:
            out.append(ch)
    return "".join(out)


def name_from_key(key: str) -> str:
    """The inverse of ``key_from_name``: a name for ``os`` functions (surrogate-escaped)."""
    if "*" not in key:
        return key

    def undo(m: re.Match[str]) -> str:
        seq = m.group(1)
        return "*" if seq == "*" else chr(0xDC00 + int(seq[1:], 16))

    return _ESCAPE.sub(undo, key)


def display_path(path: str) -> str:
    """A path for messages and job records: undecodable bytes escaped like keys."""
    return "/".join(key_from_name(part) for part in path.split("/"))
