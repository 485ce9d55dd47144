"""API keys: the key file's format and the metadata check."""

from __future__ import annotations

import pytest

from entity_llm_server.auth import ApiKeys, load_api_keys

KEYS = ("key-one", "key-two")
MISSING = "missing API key: send metadata 'authorization: Bearer <key>'"
MALFORMED = "malformed authorization metadata: expected 'Bearer <key>'"
TWO = "2 authorization entries: send exactly one"


def test_the_api_key_file_format(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# operators\nkey-one\n\n   key-two  \n  # rotated out: old-key\n")
    assert load_api_keys(path) == ("key-one", "key-two")
    path.write_text("# nothing but comments\n\n")
    with pytest.raises(ValueError, match="holds no key"):
        load_api_keys(path)
    with pytest.raises(ValueError, match="cannot read API key file"):
        load_api_keys(tmp_path / "missing")


@pytest.mark.parametrize(
    ("metadata", "problem"),
    [
        ((), MISSING),
        ((("authorization", "key-one"),), MALFORMED),
        ((("authorization", "Basic key-one"),), MALFORMED),
        ((("authorization", "Bearer "),), MALFORMED),
        ((("authorization", "Bearer key-on"),), "invalid API key"),
        ((("authorization", "Bearer key-one-"),), "invalid API key"),
        ((("authorization", "Bearer key-one"),), None),
        ((("authorization", "bearer key-two"),), None),
        # Two keys, the first valid: ambiguous, refused (it was let in).
        ((("authorization", "Bearer key-one"), ("authorization", "Bearer nope")), TWO),
        ((("authorization", "Bearer key-one"), ("authorization", "Bearer key-one")), TWO),
    ],
)
def test_api_key_checks(metadata, problem):
    assert ApiKeys(KEYS).check(metadata) == problem
    assert ApiKeys().check(metadata) is None  # no keys configured: everyone is let in
