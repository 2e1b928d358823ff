"""Keys, tokens and rate limits of ``posebatch serve`` (pure functions; no server)."""

from __future__ import annotations

import pytest

from posebatch.errors import ConfigError
from workers.serve.auth import (
    TOKEN_TTL_S,
    ApiKey,
    Authority,
    BadClient,
    RateLimiter,
    TokenExpired,
    TokenInvalid,
    load_keys,
    parse_keys,
)

NOW = 1_800_000_000.0


def test_keys_parse_from_commas_lines_and_comments():
    keys = parse_keys("a:sa, b:sb:2.5\n# comment\nc:sc  # trailing\n\n", "test")
    assert keys == {"a": ApiKey("a", "sa"), "b": ApiKey("b", "sb", 2.5), "c": ApiKey("c", "sc")}
    assert "sa" not in repr(keys["a"])


@pytest.mark.parametrize("text", ["a", "a:", ":SEKRIT", "a:SEKRIT:x", "a:SEKRIT:-1",
                                  "a:SEKRIT:1:2", "a:SEKRIT,a:SEKRIT2"])
def test_bad_key_entries_are_refused_without_echoing_secrets(text):
    with pytest.raises(ConfigError) as err:
        parse_keys(text, "POSEBATCH_API_KEYS")
    assert "SEKRIT" not in str(err.value)


def test_keys_from_env_and_file_and_default_qps(tmp_path):
    path = tmp_path / "keys"
    path.write_text("b:sb:5\n")
    keys = load_keys("a:sa", str(path), default_qps=1.0)
    assert keys["a"].qps == 1.0 and keys["b"].qps == 5.0
    with pytest.raises(ConfigError, match="in both"):
        load_keys("b:other", str(path))
    with pytest.raises(ConfigError, match="cannot read the API key file"):
        load_keys(None, str(tmp_path / "missing"))


@pytest.fixture
def authority() -> Authority:
    return Authority(parse_keys("alice:s1,bob:s2", "test"))


def test_tokens_verify_for_their_key_until_they_expire(authority):
    alice = authority.authenticate("alice", "s1")
    token = authority.issue(alice, now=NOW)
    assert authority.verify(token, now=NOW + TOKEN_TTL_S - 1) == alice
    with pytest.raises(TokenExpired):
        authority.verify(token, now=NOW + TOKEN_TTL_S)


def test_tampered_tokens_are_invalid(authority):
    token = authority.issue(authority.authenticate("alice", "s1"), now=NOW)
    version, kid, expires, sig = token.split(".")
    bob_kid = authority.issue(authority.authenticate("bob", "s2"), now=NOW).split(".")[1]
    flipped = sig[:-1] + ("B" if sig.endswith("A") else "A")
    for bad in (f"{version}.{kid}.{int(expires) + 1}.{sig}",  # extended expiry
                f"{version}.{bob_kid}.{expires}.{sig}",  # another key's id
                f"{version}.{kid}.{expires}.{flipped}", "x.y", "", f"pb2.{kid}.{expires}.{sig}"):
        with pytest.raises(TokenInvalid):
            authority.verify(bad, now=NOW)


def test_a_new_secret_revokes_old_tokens_and_replicas_agree(authority):
    token = authority.issue(authority.authenticate("alice", "s1"), now=NOW)
    replica = Authority(parse_keys("bob:s2,alice:s1", "test"))
    assert replica.verify(token, now=NOW).key == "alice"
    rotated = Authority(parse_keys("alice:new-secret", "test"))
    with pytest.raises(TokenInvalid):
        rotated.verify(token, now=NOW)


def test_wrong_credentials_say_which_like_the_original(authority):
    with pytest.raises(BadClient, match="unknown client id"):
        authority.authenticate("carol", "s1")
    with pytest.raises(BadClient, match="Client authentication failed"):
        authority.authenticate("alice", "s2")
    with pytest.raises(BadClient):
        authority.authenticate("alice", "s1\u00e9")  # non-ASCII input: refused, no crash


def test_rate_limiter_allows_qps_with_a_one_second_burst():
    limiter = RateLimiter()
    key = ApiKey("k", "s", 2.0)
    assert [limiter.allow(key, now=10.0) for _ in range(3)] == [True, True, False]
    assert limiter.allow(key, now=10.4) is False  # 0.8 of a request refilled
    assert limiter.allow(key, now=10.6) is True
    assert all(limiter.allow(ApiKey("free", "s"), now=10.0) for _ in range(100))
