"""Which keys of INPUT a job processes: the listing's images, a key list, include/exclude globs.

Why one module: ``run`` and ``submit`` must pick the same images from the same input, and every
rule here (extensions, extensionless files, globs, duplicates) is one the user sees in the
counts.

- Listed files are images by extension (``posebatch.keys``). A file whose name has no
  extension at all (``IMG_0001``, or an upload keyed by a hash) is read for its first bytes and
  taken when they are an image signature; costs one small read per such file.
- ``--include``/``--exclude`` take gitignore-style patterns (``*.png`` at any depth,
  ``raw/`` a folder, ``/top.jpg`` anchored, ``**`` any depth; matched by ``pathspec``). They
  narrow the selection; they never add a non-image file.
- A key list (``--keys-from``, or one file named on the command line) is taken as given, any
  extension, each key once after normalising (``./a.jpg`` and ``a.jpg`` are one image).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pathspec

from posebatch.errors import ObjectUnreadable, StorageNotFound, UnsafeKeyError
from posebatch.keys import is_image_key
from posebatch.names import key_from_name
from posebatch.storage import LocalStorage, Storage, safe_key

SNIFF_BYTES = 16
_BMP_HEADER_SIZES = (12, 40, 52, 56, 64, 108, 124)


@dataclass(frozen=True)
class Selection:
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    keys: tuple[str, ...] | None = None
    """Explicit keys (a key list or a single file); None: list INPUT."""


def looks_like_image(head: bytes) -> bool:
    """An image signature: the formats the API takes, and those we reject with an error result
    (GIF, WebP, TIFF), so that an extensionless GIF is reported rather than ignored."""
    if head.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a",
                        b"II*\x00", b"MM\x00*")):
        return True
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    return (len(head) >= 16 and head[:2] == b"BM"
            and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES)


def has_extension(key: str) -> bool:
    name = posixpath.basename(key)
    return "." in name.lstrip(".")


def _matcher(patterns: Iterable[str]) -> pathspec.PathSpec | None:
    patterns = list(patterns)
    return pathspec.GitIgnoreSpec.from_lines(patterns) if patterns else None


def select_keys(src: Storage, sel: Selection | None = None) -> Iterator[str]:
    """The keys of the job, each once, streamed (a listing is never held whole)."""
    sel = sel or Selection()
    include, exclude = _matcher(sel.include), _matcher(sel.exclude)

    def wanted(key: str) -> bool:
        return ((include is None or include.match_file(key))
                and (exclude is None or not exclude.match_file(key)))

    if sel.keys is not None:
        seen: set[str] = set()
        for raw in sel.keys:
            try:
                key = safe_key(raw)
            except UnsafeKeyError:
                key = raw  # passed on: the batch gives it an error result that says why
            if key not in seen and wanted(key):
                seen.add(key)
                yield key
        return
    for key in src.iter_keys():
        if not wanted(key):
            continue
        if is_image_key(key) or (not has_extension(key) and _sniff(src, key)):
            yield key


def _sniff(src: Storage, key: str) -> bool:
    try:
        return looks_like_image(src.peek(key, SNIFF_BYTES))
    except (ObjectUnreadable, StorageNotFound):  # no evidence of an image: not one
        return False


def keys_from_lines(data: bytes, src: Storage) -> tuple[str, ...]:
    """Keys from a ``--keys-from`` file: one per line, blank lines ignored. For a folder, a line
    is a file name's bytes (any encoding: mapped like a listed name, ``posebatch.names``); for
    S3 a line is the key itself, UTF-8."""
    keys = []
    for line in data.split(b"\n"):
        line = line.rstrip(b"\r")
        if not line.strip():
            continue
        if isinstance(src, LocalStorage):
            text = line.decode("utf-8", "surrogateescape")
            keys.append("/".join(key_from_name(part) for part in text.split("/")))
        else:
            keys.append(line.decode("utf-8", "replace"))
    return tuple(keys)


def open_input(url: str) -> tuple[Storage, str | None]:
    """INPUT as storage, plus the key when INPUT names one file or object (``run photo.jpg``)
    instead of a folder or prefix; its result is then ``OUT/photo.jpg.json``."""
    import os

    from posebatch.storage import open_storage

    store = open_storage(url)
    if isinstance(store, LocalStorage):
        path = store.root
        if os.path.lexists(path) and not os.path.isdir(path):
            parent, name = os.path.split(path)
            return LocalStorage(parent), key_from_name(name)
        return store, None
    from posebatch.s3storage import S3Storage  # an S3 URL: boto3 is loaded by now anyway

    if isinstance(store, S3Storage) and store.prefix and not url.endswith("/"):
        parent_prefix, _, name = store.prefix.rstrip("/").rpartition("/")
        parent = S3Storage(store.bucket, parent_prefix)
        if parent.size(name) is not None:
            return parent, name
    return store, None
