"""Authentication of requests: bearer token or basic auth for Alertmanager, HMAC-SHA256 signatures for generic hooks."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from runbook.errors import Location, ValidationError
from runbook.serve.rules import HookConfig, RuleSet

TOKEN_ENV = "RUNBOOK_SERVE_TOKEN"
MIN_TOKEN = 16


def _eq(a: str | bytes, b: str | bytes) -> bool:
    """Constant-time comparison (as bytes: compare_digest refuses non-ASCII str)."""
    return hmac.compare_digest(a.encode() if isinstance(a, str) else a, b.encode() if isinstance(b, str) else b)


def token_matches(header: str | None, token: str) -> bool:
    """True for `Authorization: Bearer TOKEN`, or basic auth whose password is the token (any user name)."""
    if not header:
        return False
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return _eq(value, token)
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        _, sep, password = decoded.partition(":")
        return bool(sep) and _eq(password, token)
    return False


def read_secret(ref: str, what: str, location: Location | None = None) -> str:
    """`env:NAME` or `file:PATH` (relative to the rules file's directory when `location` names it)."""
    kind, _, target = ref.partition(":")
    if kind == "env":
        value = os.environ.get(target)
        if not value:
            raise ValidationError(f"{what}: environment variable {target} is not set", location=location,
                                  hint=f"export {target}=... before starting the server")
        return value
    path = Path(os.path.expanduser(target))
    if not path.is_absolute() and location is not None:
        path = Path(location.file).resolve().parent / path
    try:
        value = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValidationError(f"{what}: cannot read {path}: {exc}", location=location,
                              hint="check the path and its permissions") from None
    if not value:
        raise ValidationError(f"{what}: {path} is empty", location=location, hint="write the secret into the file")
    return value


def load_token(token_file: str | None) -> tuple[str, list[str]]:
    """The server token from --token-file or $RUNBOOK_SERVE_TOKEN, and warnings about how it is kept."""
    warnings = []
    if token_file:
        path = Path(token_file)
        token = read_secret(f"file:{path}", "--token-file", Location(str(path)))
        try:
            mode = path.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                warnings.append(f"{path} is readable by other users (mode {stat.S_IMODE(mode):o}): chmod 600 it")
        except OSError:
            pass
    elif os.environ.get(TOKEN_ENV):
        token = os.environ[TOKEN_ENV].strip()
    else:
        raise ValidationError("no token: the server refuses to run without authentication",
                              hint=f"give --token-file FILE or set {TOKEN_ENV}; --insecure-no-auth turns authentication off")
    if len(token) < MIN_TOKEN:
        raise ValidationError(f"the token is too short ({len(token)} characters, at least {MIN_TOKEN})",
                              hint="generate one: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return token, warnings


@dataclass
class HookAuth:
    """One hook's HMAC settings with its secret read."""

    config: HookConfig
    secret: bytes

    def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> str | None:
        """None when the signature is good; otherwise why not (said to the client: reveals nothing secret)."""
        c = self.config
        provided = headers.get(c.header.lower())
        if not provided:
            return f"missing signature header {c.header}"
        message = body
        if c.timestamp_header:
            raw = headers.get(c.timestamp_header.lower(), "")
            try:
                stamp = float(raw)
            except ValueError:
                return f"missing or invalid timestamp header {c.timestamp_header} (seconds since the epoch)"
            if abs(now - stamp) > c.tolerance:
                return f"timestamp outside the accepted window of {c.tolerance:g}s (replayed or clock skew)"
            message = raw.encode() + b"." + body
        text = provided.strip()
        if c.prefix and text.startswith(c.prefix):
            text = text[len(c.prefix):]
        try:
            given = bytes.fromhex(text) if c.encoding == "hex" else base64.b64decode(text, validate=True)
        except (ValueError, binascii.Error):
            return f"malformed signature (expected {c.encoding})"
        expected = hmac.new(self.secret, message, hashlib.sha256).digest()
        return None if _eq(given, expected) else "signature does not match"


def hook_auth(rules: RuleSet) -> dict[str, HookAuth]:
    """Every configured hook secret, read now so a missing one stops the server at start."""
    out = {}
    for name, config in rules.hooks.items():
        if config.secret:
            out[name] = HookAuth(config, read_secret(config.secret, f"hook `{name}` secret", Location(str(rules.path))).encode())
    return out


def sign(secret: bytes, body: bytes, timestamp: str | None = None, encoding: str = "hex") -> str:
    """The signature a sender puts in the header (documented for senders; the tests use it too)."""
    message = (timestamp.encode() + b"." + body) if timestamp is not None else body
    digest = hmac.new(secret, message, hashlib.sha256).digest()
    return digest.hex() if encoding == "hex" else base64.b64encode(digest).decode()
