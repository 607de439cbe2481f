"""Redaction of secrets from text that will be persisted or logged.

Applied to every error message before it reaches ``last_error``, the
per-attempt ``errors`` history or a log line: API keys, passwords, SCRAM
verifiers and the password part of connection URLs become ``[REDACTED]``.
"""

from __future__ import annotations

import re

REDACTED = "[REDACTED]"

#: API keys: ``<prefix>_<43 base62 body><6 base62 checksum>``.
API_KEY_PATTERN = re.compile(r"\b[a-z][a-z0-9_]*_[0-9A-Za-z]{49}\b")

_PATTERNS = (
    API_KEY_PATTERN,
    re.compile(r"SCRAM-SHA-256\$[^\s'\"]+"),
    re.compile(r"(?i)(password\s*[=:]\s*)('[^']*'|\"[^\"]*\"|\S+)"),
    re.compile(r"(?i)(password\s+)('[^']*')"),
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"),
    re.compile(r"(://[^:/@\s]+:)[^@\s]+(@)"),
)


def redact(text: str) -> str:
    """``text`` with every secret-looking part replaced by ``[REDACTED]``."""
    for pattern in _PATTERNS:
        if pattern.groups == 0:
            text = pattern.sub(REDACTED, text)
        elif pattern.groups == 1:
            text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
        elif pattern.pattern.startswith("(://"):
            text = pattern.sub(lambda m: m.group(1) + REDACTED + m.group(2), text)
        else:
            text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
    return text
