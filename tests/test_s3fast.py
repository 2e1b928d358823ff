"""The per-image GET and PUT through obstore (``posebatch.s3fast``) behave as boto3's did: the
same bytes, the same errors for the same server answers, boto3 for keys obstore cannot address.
Real SeaweedFS on loopback."""

from __future__ import annotations

import pytest

from posebatch.errors import (
    ConfigError,
    ObjectTooLarge,
    ObjectUnreadable,
    StorageError,
    StorageNotFound,
    StorageUnreachable,
)
from posebatch.s3storage import S3Storage


def both(bucket: str, prefix: str = "p/") -> dict[str, S3Storage]:
    fast, plain = S3Storage(bucket, prefix), S3Storage(bucket, prefix)
    plain._use_fast = False
    assert fast.fast is not None and plain.fast is None
    return {"obstore": fast, "boto3": plain}


def test_get_and_put_give_boto3s_bytes_and_content_type(s3_server, bucket):
    client = s3_server.client()
    for name, st in both(bucket).items():
        for key in ("a.jpg", "sub/é ü+%20#?.jpg", "tab\t.jpg"):  # a tab: obstore refuses it
            st.write(f"{name}/{key}.json", b'{"x": 1}', "application/json")
            head = client.head_object(Bucket=bucket, Key=f"p/{name}/{key}.json")
            assert head["ContentType"] == "application/json", (name, key)
            assert st.read(f"{name}/{key}.json") == b'{"x": 1}'
        client.put_object(Bucket=bucket, Key="p/big.jpg", Body=b"x" * 1000)
        with pytest.raises(ObjectTooLarge):
            st.read("big.jpg", max_bytes=999)
        assert st.read("big.jpg", max_bytes=1000) == b"x" * 1000


@pytest.mark.parametrize("client_name", ["obstore", "boto3"])
def test_errors_map_as_boto3s_did(s3_server, bucket, monkeypatch, client_name):
    st = both(bucket)[client_name]
    with pytest.raises(StorageNotFound, match="does not exist"):
        st.read("missing.jpg")
    gone = both(f"{bucket}-none")[client_name]
    with pytest.raises(StorageNotFound, match="bucket .* does not exist"):
        gone.read("x.jpg")
    readonly = s3_server.readonly_env()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", readonly["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", readonly["AWS_SECRET_ACCESS_KEY"])
    with pytest.raises(StorageError, match="AccessDenied") as denied:
        both(bucket)[client_name].write("x.json", b"{}")
    assert not isinstance(denied.value, StorageUnreachable)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(ConfigError, match="SignatureDoesNotMatch"):
        both(bucket)[client_name].read("missing.jpg")
    s3_server.stop()
    try:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.env()["AWS_SECRET_ACCESS_KEY"])
        down = both(bucket)[client_name]
        with pytest.raises(StorageUnreachable):
            down.read("missing.jpg")
    finally:
        s3_server.start()


def test_denied_reads_of_one_object_are_unreadable_not_config(s3_server, bucket, monkeypatch):
    """A 403 AccessDenied on a GET is the object's (permissions, archive): an error result for
    that image, not a stopped job; the credential codes stay configuration errors."""
    from botocore.exceptions import ClientError

    st = both(bucket)["obstore"]
    err = ClientError({"Error": {"Code": "AccessDenied", "Message": "denied"},
                       "ResponseMetadata": {"HTTPStatusCode": 403}}, "GetObject")
    assert isinstance(st._error(err, "read", "k"), ObjectUnreadable)
    from posebatch.s3fast import translate

    msg = ("The operation lacked the necessary privileges: Error performing GET http://h/b/k in "
           "1ms - Server returned non-2xx status code: 403 Forbidden: <?xml version=\"1.0\"?>"
           "<Error><Code>InvalidObjectState</Code><Message>archived</Message></Error>")
    mapped = st._error(translate(RuntimeError(msg), "GetObject"), "read", "k")
    assert isinstance(mapped, ObjectUnreadable) and "Glacier" in str(mapped)
    plain = RuntimeError("Generic S3 error: error sending request")
    assert translate(plain, "GetObject") is plain
