"""Project API keys: generation, checksum, storage hash, display hint and log redaction.

A key reads ``<prefix>_<body>``, where ``body`` is 49 base62 characters (``0-9A-Za-z``):
43 encode 32 random bytes and the last 6 encode the CRC32 of those 43, both left-padded
with ``0``. The checksum lets a secrets scanner or a support engineer tell a real key from
a typo without a database lookup; it adds no secrecy. Only :func:`hash_key` (an HMAC with a
server-side pepper) and :func:`hint` are ever stored; the plaintext is shown once.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import zlib

__all__ = [
    "KEY_BODY_LEN",
    "REDACTED",
    "SECRET_PATTERN",
    "checksum_ok",
    "from_random_bytes",
    "generate",
    "hash_key",
    "hint",
    "redact",
]

from tasks.redaction import KEY_BODY_LEN, REDACTED, SECRET_PATTERN, redact

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_INDEX = {ch: i for i, ch in enumerate(_ALPHABET)}
_RANDOM_BYTES = 32
# 62**43 > 2**256 and 62**6 > 2**32: the shortest fixed widths that hold every value.
_RANDOM_LEN = 43
_CHECKSUM_LEN = 6
assert KEY_BODY_LEN == _RANDOM_LEN + _CHECKSUM_LEN

_PREFIX_RE = re.compile(r"[a-z][a-z0-9_]*")

def generate(prefix: str) -> str:
    """A new random key with the given prefix (``^[a-z][a-z0-9_]*$``)."""
    return from_random_bytes(prefix, secrets.token_bytes(_RANDOM_BYTES))


def from_random_bytes(prefix: str, raw: bytes) -> str:
    """The key whose random part is ``raw`` (32 bytes from a CSPRNG or a keyed derivation)."""
    if not _PREFIX_RE.fullmatch(prefix):
        raise ValueError("an API key prefix must match ^[a-z][a-z0-9_]*$")
    if len(raw) != _RANDOM_BYTES:
        raise ValueError(f"an API key needs {_RANDOM_BYTES} random bytes")
    random_part = _b62encode(int.from_bytes(raw, "big"), _RANDOM_LEN)
    return f"{prefix}_{random_part}{_checksum(random_part)}"


def checksum_ok(key: str) -> bool:
    """Whether ``key`` has the key format and its checksum matches (says nothing about validity)."""
    prefix, sep, body = key.rpartition("_")
    if not sep or not _PREFIX_RE.fullmatch(prefix) or len(body) != KEY_BODY_LEN:
        return False
    if any(ch not in _INDEX for ch in body):
        return False
    random_part, checksum = body[:_RANDOM_LEN], body[_RANDOM_LEN:]
    return hmac.compare_digest(checksum, _checksum(random_part))


def hash_key(key: str, pepper: bytes) -> str:
    """HMAC-SHA256 of the key under the server-side pepper, as hex: what the database stores."""
    if not pepper:
        # An empty pepper would make the stored hash a plain, offline-guessable SHA-256.
        raise ValueError("the API key pepper must not be empty")
    return hmac.new(pepper, key.encode("utf-8"), hashlib.sha256).hexdigest()


def hint(key: str) -> str:
    """A display hint, ``<prefix>_<first 4>…<last 4>``: enough to recognise, useless to guess."""
    prefix, _, body = key.rpartition("_")
    return f"{prefix}_{body[:4]}…{body[-4:]}"


def _checksum(random_part: str) -> str:
    return _b62encode(zlib.crc32(random_part.encode("ascii")), _CHECKSUM_LEN)


def _b62encode(number: int, width: int) -> str:
    digits: list[str] = []
    while number:
        number, rem = divmod(number, 62)
        digits.append(_ALPHABET[rem])
    if len(digits) > width:
        raise ValueError(f"{width} base62 digits cannot hold this value")
    return "".join(reversed(digits)).rjust(width, _ALPHABET[0])
