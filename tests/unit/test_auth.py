"""API keys: the key file's format and the metadata check."""

from __future__ import annotations

import pytest

from entity_llm_server.auth import ApiKeys, load_api_keys

KEYS = ("key-one", "key-two")


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
        ((), "missing API key"),
        ((("authorization", "key-one"),), "malformed authorization"),
        ((("authorization", "Basic key-one"),), "malformed authorization"),
        ((("authorization", "Bearer "),), "malformed authorization"),
        ((("authorization", "Bearer key-on"),), "invalid API key"),
        ((("authorization", "Bearer key-one-"),), "invalid API key"),
        ((("authorization", "Bearer key-one"),), None),
        ((("authorization", "bearer key-two"),), None),
        # Two keys, the first valid: ambiguous, refused (it was let in).
        ((("authorization", "Bearer key-one"), ("authorization", "Bearer nope")), "2 authorization entries"),
        ((("authorization", "Bearer key-one"), ("authorization", "Bearer key-one")), "2 authorization entries"),
    ],
)
def test_api_key_checks(metadata, problem):
    outcome = ApiKeys(KEYS).check(metadata)
    assert outcome == problem if problem is None else problem in (outcome or "")
    assert ApiKeys().check(metadata) is None  # no keys configured: everyone is let in
