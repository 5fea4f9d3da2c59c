"""Redaction of secret-named variables whose values are lists or mappings, at any depth, in every output shape."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runbook.audit import (
    MIN_SECRET_LINE_LEN,
    MIN_SECRET_NUMBER_LEN,
    MIN_SECRET_TEXT_LEN,
    SETTING_WORDS,
    Redactor,
    is_secret_name,
    secret_values_in,
)

MASK = "***"


# ---------------------------------------------------------------------------------------------
# Which names are secret
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "password", "db_password", "PASSWD", "passphrase", "api_token", "tokens", "client_secret", "secrets",
    "ssh_key", "x_key", "AWS_SECRET_ACCESS_KEY", "deploy-key", "apikey", "api_key", "Api-Key", "aws_credentials",
    "ansible_become_pass", "ansible_ssh_pass", "backup-pass", "vault_pass",
])
def test_secret_names(name: str) -> None:
    assert is_secret_name(name)


@pytest.mark.parametrize("name", [
    "user", "keyboard", "monkey", "keys", "ansible_ssh_private_key_file", "key_file", "passenger", "compass",
    "bypass", "pass_count", "host", "url", "port", "ansible_port", "log_dir",
])
def test_names_that_are_not_secret(name: str) -> None:
    assert not is_secret_name(name)


# ---------------------------------------------------------------------------------------------
# What is found inside a mapping of variables
# ---------------------------------------------------------------------------------------------

def found(values: dict) -> set[str]:
    return set(secret_values_in(values))


def test_a_list_under_a_secret_name() -> None:
    assert found({"api_tokens": ["tok-aaaa-1", "tok-bbbb-2"], "users": ["alice", "bob"]}) == {"tok-aaaa-1", "tok-bbbb-2"}


def test_a_mapping_under_a_secret_name_yields_every_value_at_any_depth_and_no_key() -> None:
    values = {"tls_secret": {"cert": "cert-body-1", "chain": ["chain-1", {"inner": "deep-value"}], "user": "svc"}}
    assert found(values) == {"cert-body-1", "chain-1", "deep-value", "svc"}


def test_a_secret_name_at_any_depth() -> None:
    values = {
        "svc": {"token": "svc-token-1", "url": "https://svc.example"},
        "db": {"users": [{"name": "app", "password": "db-pw-1"}, {"name": "ro", "password": "db-pw-2"}]},
        "a": {"b": {"c": {"d_key": ["k-1", ("k-2",), {"e": "k-3"}]}}},
        "extra": {"x_key": "x-key-1"},
    }
    assert found(values) == {"svc-token-1", "db-pw-1", "db-pw-2", "k-1", "k-2", "k-3", "x-key-1"}


def test_scalars_that_are_not_secrets() -> None:
    values = {"password": None, "use_token": True, "token_ttl": 3600, "empty_secret": "", "blank_secret": "   ",
              "tokens": [False, None, 12, 1.5, ""], "port_secret": 12345}
    assert found(values) == set()
    assert len(str(12345)) < MIN_SECRET_NUMBER_LEN


def test_numbers_from_the_minimum_length_on() -> None:
    values = {"pin_secret": 123456, "tokens": [9876543, 12.5, 123456.5, -12345], "short": {"api_key": 99999}}
    assert found(values) == {"123456", "9876543", "123456.5", "-12345"}
    assert MIN_SECRET_NUMBER_LEN == 6
    # Written as a string, a short numeric secret is masked like any other string.
    assert found({"pin_secret": "4711"}) == {"4711"}


def test_trimmed_and_line_forms() -> None:
    key = "-----BEGIN KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nshort\n-----END KEY-----\n"
    got = found({"padded_token": "  pad-tok-1 \n", "tls_key": key})
    assert got == {"  pad-tok-1 \n", "pad-tok-1", key, key.strip(), "-----BEGIN KEY-----", "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC",
                   "-----END KEY-----"}
    assert len("short") < MIN_SECRET_LINE_LEN


def test_bytes_and_other_scalars() -> None:
    import datetime

    got = found({"raw_secret": b"bytes-secret-1", "date_token": datetime.date(2031, 2, 3)})
    assert got == {"bytes-secret-1", "2031-02-03"}


def test_non_string_keys_and_sets() -> None:
    assert found({1: "not secret", "tokens": {1: "one-secret", 2: frozenset({"two-secret"})}}) == {"one-secret", "two-secret"}


def test_self_reference_and_deep_nesting_terminate() -> None:
    loop: list = ["loop-secret"]
    loop.append(loop)
    assert found({"tokens": loop}) == {"loop-secret"}
    deep: dict = {"password": "deep-secret"}
    for _ in range(50_000):
        deep = {"level": deep}
    assert found(deep) == {"deep-secret"}
    wide = {"tokens": [f"tok-{i:06d}" for i in range(20_000)]}
    assert len(found(wide)) == 20_000


# ---------------------------------------------------------------------------------------------
# Redactor.add_secrets_in + redact: every output shape
# ---------------------------------------------------------------------------------------------

INVENTORY_VARS = {
    "ansible_host": "10.0.0.1",
    "api_tokens": ["tok-A-8f3b2c1d", "tok-B-7e6d5c4b"],
    "svc": {"token": "svc-tok-1a2b3c4d", "url": "https://svc.example"},
    "users": [{"name": "app", "password": "pw-app-9z8y7x"}],
    "pin_secret": 73914628,
}
SECRETS = ["tok-A-8f3b2c1d", "tok-B-7e6d5c4b", "svc-tok-1a2b3c4d", "pw-app-9z8y7x", "73914628"]


@pytest.fixture
def redactor() -> Redactor:
    r = Redactor()
    r.add_secrets_in(INVENTORY_VARS)
    r.add_secrets_in({"extra": {"x_key": "xk-5566-7788"}})
    return r


def test_add_secrets_in_registers_every_secret(redactor: Redactor) -> None:
    assert redactor.secrets == {*SECRETS, "xk-5566-7788"}


def test_redact_every_rendering_of_a_structured_secret(redactor: Redactor) -> None:
    renderings = [
        " ".join(INVENTORY_VARS["api_tokens"]),                    # {{ api_tokens | join(' ') }}
        ",".join(INVENTORY_VARS["api_tokens"]),
        str(INVENTORY_VARS["api_tokens"]),                          # a Python list's repr
        json.dumps(INVENTORY_VARS),                                 # {{ svc | to_json }}
        json.dumps(INVENTORY_VARS, indent=2),
        "token='svc-tok-1a2b3c4d'\npin=73914628",
    ]
    for text in renderings:
        out = redactor.redact_text(text)
        assert not any(s in out for s in SECRETS), out
        assert MASK in out
    assert redactor.redact_text(json.dumps(INVENTORY_VARS["svc"])) == '{"token": "***", "url": "https://svc.example"}'


def test_redact_nested_plain_structures(redactor: Redactor) -> None:
    result = {
        "stdout": "tok-A-8f3b2c1d\n",
        "stdout_lines": ["tok-A-8f3b2c1d", "fine"],
        "data": {"registered": {"stdout": "svc-tok-1a2b3c4d"}, "rc": 0, "pin": 73914628, "pair": ("pw-app-9z8y7x", 3)},
        "tags": {"xk-5566-7788"},
        "svc-tok-1a2b3c4d": "a key that holds a secret",
    }
    assert redactor.redact(result) == {
        "stdout": "***\n",
        "stdout_lines": ["***", "fine"],
        "data": {"registered": {"stdout": "***"}, "rc": 0, "pin": "***", "pair": ("***", 3)},
        "tags": ["***"],
        "***": "a key that holds a secret",
    }


def test_redact_dataclasses_and_pydantic_models(redactor: Redactor) -> None:
    @dataclass
    class Result:
        host: str
        stdout: str
        extra: dict

    class Model(pydantic.BaseModel):
        name: str
        values: list[str]

    assert redactor.redact(Result("h0", "tok-B-7e6d5c4b", {"k": ["pw-app-9z8y7x"]})) == \
        {"host": "h0", "stdout": "***", "extra": {"k": ["***"]}}
    assert redactor.redact(Model(name="svc-tok-1a2b3c4d", values=["ok", "xk-5566-7788"])) == \
        {"name": "***", "values": ["ok", "***"]}
    assert redactor.redact(Model) is Model            # a class is not an instance


def test_from_vars_walks_like_add_secrets_in() -> None:
    r = Redactor.from_vars(INVENTORY_VARS, {"pager": "pager-token-value"})
    assert r.secrets == {*SECRETS, "pager-token-value"}


def test_secret_values_are_text_not_patterns() -> None:
    # Injection into the pattern: a secret full of regex syntax masks only itself.
    r = Redactor()
    r.add_secrets_in({"tokens": ["a.*b", "(x|y)", "back\\slash", "^$^"]})
    assert r.redact_text("aXXb x y a.*b (x|y) back\\slash ^$^") == "aXXb x y *** *** *** ***"


def test_longest_secret_wins_when_one_contains_another() -> None:
    r = Redactor()
    r.add_secrets_in({"tokens": ["abcdef", "abcdefghij"], "x_key": "cdefgh"})
    assert r.redact_text("abcdefghij abcdef cdefgh") == "*** *** ***"


def test_add_all_is_one_rebuild_and_ignores_known_and_empty_values() -> None:
    r = Redactor(["one-secret"])
    pattern = r._pattern
    r.add_all(["one-secret", ""])
    assert r._pattern is pattern                       # nothing new: the pattern is kept
    r.add_all(["two-secret", "three-secret"])
    assert r.secrets == {"one-secret", "two-secret", "three-secret"}
    assert r.redact_text("two-secret three-secret") == "*** ***"


def test_many_secrets_at_once() -> None:
    tokens = [f"tok-{i:06d}-x" for i in range(5_000)]
    r = Redactor()
    r.add_secrets_in({"api_tokens": tokens})
    text = " ".join(tokens[::97])
    assert set(r.redact_text(text).split()) == {MASK}


_scalar = st.one_of(st.text(min_size=1, max_size=12), st.integers(), st.booleans(), st.none())
_tree = st.recursive(_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.sampled_from(["a", "b", "token", "x_key", "name", "url", "password"]), inner, max_size=4)),
    max_leaves=20)


def _under_secret_names(value: object, secret: bool = False) -> list[object]:
    """Reference walk: every scalar that sits (at any depth) under a secret-named key."""
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _under_secret_names(v, secret or is_secret_name(k))]
    if isinstance(value, list):
        return [s for v in value for s in _under_secret_names(v, secret)]
    return [value] if secret else []


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["svc", "api_tokens", "db", "users", "plain"]), _tree, max_size=4))
def test_property_no_secret_string_survives_redaction(values: dict) -> None:
    r = Redactor()
    r.add_secrets_in(values)
    for leaf in _under_secret_names(values):
        if leaf is None or isinstance(leaf, bool):
            continue
        text = str(leaf)
        if isinstance(leaf, int) and len(text) < MIN_SECRET_NUMBER_LEN or not text.strip():
            continue
        if isinstance(leaf, str) and (len(text.strip()) < MIN_SECRET_TEXT_LEN or text.strip().lower() in SETTING_WORDS):
            continue   # a setting (`password_authentication: "no"`), not a secret: see audit.py
        rendered = r.redact_text(f"<{text}> {json.dumps(values, default=str)}")
        assert text not in rendered.replace(MASK, "\0"), (text, rendered)


def test_settings_under_secret_like_names_are_not_masked() -> None:
    # `password_authentication: "no"` is a setting: masking "no" would blank every "no" of a run.
    r = Redactor()
    r.add_secrets_in({"password_authentication": "no", "token_refresh": "on", "pin_secret": "ab", "db_password": "hunter2"})
    assert r.redact_text("no on ab hunter2") == "no on ab ***"
