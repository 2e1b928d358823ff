"""The ``image`` field of ``posebatch serve``: URL-decoding and base64 (pure functions)."""

from __future__ import annotations

import base64
import os
import re
import urllib.parse

import pytest

from posebatch.errors import BAD_BASE64, ImageError
from workers.serve.form import decode_base64, urlencoded_field


@pytest.mark.parametrize("quote", [urllib.parse.quote_plus, urllib.parse.quote,
                                   lambda s: re.sub(r"%[0-9A-F]{2}", lambda m: m[0].lower(),
                                                    urllib.parse.quote_plus(s))])
def test_the_image_field_round_trips_whatever_the_escaping(quote):
    data = os.urandom(3000) + b"\xff\xfb\xef" * 50  # plenty of '+', '/' and '='
    b64 = base64.b64encode(data).decode()
    body = f"a=1&image={quote(b64)}&aipSdk=python".encode()
    assert decode_base64(urlencoded_field(body, "image")) == data


def test_other_escapes_and_missing_fields():
    assert urlencoded_field(b"image=aGVs%0AbG8%3d", "image") == b"aGVs\nbG8="
    assert decode_base64(b"aGVs\nbG8=") == b"hello"
    assert urlencoded_field(b"picture=aGVsbG8%3D", "image") is None
    assert urlencoded_field(b"", "image") is None
    assert urlencoded_field(b"im%61ge=x", "image") == b"x"  # the name is URL-decoded too


@pytest.mark.parametrize("bad", [b"@@@@", b"abc", b"aGVsbG8=!", b"data:image/jpeg;base64,aGk="])
def test_anything_but_base64_is_216203(bad):
    with pytest.raises(ImageError) as err:
        decode_base64(bad)
    assert err.value.code == BAD_BASE64


def test_spaces_are_plus_signs_a_client_forgot_to_encode():
    data = b"\xfb\xef\xbe" * 10
    assert decode_base64(base64.b64encode(data).replace(b"+", b" ")) == data
