"""Redaction of secrets from text that will be persisted or logged.

Applied to every error message before it reaches ``last_error``, the
per-attempt ``errors`` history or a log line: API keys, passwords, SCRAM
verifiers, tokens and the password part of connection URLs become
``[REDACTED]``. Each pattern keeps its keyword, so a reader still sees what was
removed.
"""

from __future__ import annotations

import re

REDACTED = "[REDACTED]"

#: Length of an API key's body: 43 base62 characters of randomness + a 6-character checksum.
KEY_BODY_LEN = 49

#: The longest API key prefix: a prefix is a PostgreSQL identifier's part (``api_key_prefix``).
KEY_PREFIX_MAX_LEN = 63

#: Matches any API key (``<prefix>_<49 base62 characters>``). Not anchored on the left, so
#: a key glued to preceding text is still caught (possibly with a shorter prefix). The prefix
#: is bounded: unbounded, each position of a long run of ``[a-z0-9_]`` (a hex dump in an
#: error) read the rest of the run, and 80,000 such characters took 13 s to redact.
SECRET_PATTERN = re.compile(
    rf"[a-z][a-z0-9_]{{0,{KEY_PREFIX_MAX_LEN - 1}}}_[0-9A-Za-z]{{{KEY_BODY_LEN}}}(?![0-9A-Za-z])"
)

#: The words that name a secret, in a setting's, a field's or a keyword argument's name.
_KEYWORDS = "passwords?|passwd|pwd|secrets?|tokens?|peppers?|api_?keys?|access_?keys?|private_?keys?|credentials?"

#: A quoted string, with a Python prefix (b'...', r"..."), backslash escapes inside.
_QUOTED = r"""[bBrRuU]{0,2}(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")"""

_REDACTIONS: tuple[tuple[re.Pattern[str], str], ...] = (
    # PostgreSQL's DETAIL of a key (a unique, exclusion or foreign key violation in an actor's
    # statement): "Key (tenant, api_token)=(t1, tok_...) already exists." quotes the values of
    # the key's columns as they are; all of them go when a column's name (or an expression of
    # an index on one: lower(api_token::text)) names a secret. First: the patterns below would
    # take "token::text" for a name and its value.
    (
        re.compile(
            rf"""(\bkey \((?=[^=\n]{{0,512}}?(?:{_KEYWORDS})[^=\n]{{0,512}}?\)=\()[^=\n]{{0,1024}}?\)=\()"""
            r"[^\n]*?"
            r"(?=\)\s+(?:already exists|is not present in table|is still referenced from table|conflicts with)\b"
            r"|\)\.?[ \t]*(?:\n|$)|\n|$)",
            re.IGNORECASE,
        ),
        rf"\g<1>{REDACTED}",
    ),
    # A SCRAM verifier: SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>.
    (re.compile(r"SCRAM-SHA-256\$[^\s'\",;]*", re.IGNORECASE), REDACTED),
    # DDL: PASSWORD 'secret' (with '' escapes), E'...' (with backslash escapes too), $tag$...$tag$.
    (
        re.compile(
            r"(\bPASSWORD\s+)(?:E'(?:[^'\\]|\\.|'')*'|'(?:[^']|'')*'|\$(?P<tag>\w*)\$[\s\S]{0,4096}?\$(?P=tag)\$)",
            re.IGNORECASE,
        ),
        rf"\g<1>{REDACTED}",
    ),
    # key=value, key: value, "key": "value" (libpq DSNs, config dumps, JSON, Python reprs), the
    # keyword also at the end of a longer name (PGPASSWORD=, AUTH_SERVICE_TOKEN=, "client_secret":)
    # or "passwords"; the value a (b'', r'') quoted string, a list, tuple or dict (to its first
    # closing bracket, within its line), or a bare word.
    (
        re.compile(
            rf"""((?:{_KEYWORDS})["']?\s*[=:]\s*)(?:{_QUOTED}|\[[^\]\n]*\]?|\([^)\n]*\)?|\{{[^}}\n]*\}}?|[^\s&;,'"}}\])]+)""",
            re.IGNORECASE,
        ),
        rf"\g<1>{REDACTED}",
    ),
    # ('password', 'secret'): a quoted name and a quoted value as a pair in a tuple or a list.
    (re.compile(rf"""(["']\w*(?:{_KEYWORDS})["']\s*,\s*){_QUOTED}""", re.IGNORECASE), rf"\g<1>{REDACTED}"),
    # URL userinfo: scheme://user:secret@host, up to the authority's last '@' (a password
    # pasted without percent-encoding may hold one); host:port/path?q=a@b is not userinfo.
    (re.compile(r"(://[^/\s:@]*:)[^/\s'\"]*@"), rf"\g<1>{REDACTED}@"),
    # Bearer tokens, and other schemes' credentials in echoed Authorization headers.
    (re.compile(r"(\bBearer\s+)[^\s'\",;]+", re.IGNORECASE), rf"\g<1>{REDACTED}"),
    (re.compile(r"(\bAuthorization[\"']?\s*[=:]\s*[\"']?(?:Token|Basic)\s+)[^\s'\",;]+", re.IGNORECASE),
     rf"\g<1>{REDACTED}"),
)


#: What a message quotes (``invalid input syntax for type uuid: "..."``, ``value "..." is out of
#: range``, libpq's ``invalid percent-encoded token: "..."``): from its first '"' to its last.
#: PostgreSQL and libpq quote a value as it is, a '"' in it not escaped: a password holding one
#: ended a shorter match early, and the rest of it was kept ("…"Lw3%zz").
_DOUBLE_QUOTED = re.compile(r'"[\s\S]*"')


def unquoted(text: str) -> str:
    """``text`` with what it quotes left out (``"…"``): a value, a statement's data, a URL's part."""
    return _DOUBLE_QUOTED.sub('"…"', text)


def redact(text: str) -> str:
    """``text`` with API keys, passwords, SCRAM verifiers, tokens and URL credentials replaced."""
    text = SECRET_PATTERN.sub(REDACTED, text)
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


#: The longest text :func:`redact_head` redacts whole. Redaction is pure-Python regular
#: expressions, about 3 MB/s, holding the GIL: a log line quoting a failed job's 10 MB arguments
#: (Dramatiq's "Failed to process message ...") froze every thread of its worker for 4.5 s, its
#: heartbeats too, and 8 such failures of 90 MB for minutes, until other workers reaped its jobs.
REDACT_MAX_CHARS = 32_768

#: How much of a cut's last token goes (a key's body, a URL's userinfo cut in two would not
#: match as a secret): all of it, up to this; of a longer one (data: base64, hex), its end.
_LAST_TOKEN_MAX = 4096

#: A dollar-quoted password's opening (``PASSWORD $tag$``): its pattern needs the closing tag.
_DOLLAR_PASSWORD = re.compile(r"\bPASSWORD\s+\$(\w*)\$", re.IGNORECASE)

#: What closes a quoted string a cut left open, so that the patterns see a secret's head as one.
_CLOSERS = "'\""


def _without_open_secret(head: str) -> str:
    """``head`` less what a cut at its end could have left of a secret the patterns would not
    see whole: its last token, and a dollar-quoted password left open. In time linear in what
    it looks at (a regular expression anchored at the end is tried from every position)."""
    end, stop = len(head), max(len(head) - _LAST_TOKEN_MAX, 0)
    while end > stop and not head[end - 1].isspace():
        end -= 1
    head = head[:end]
    window = max(len(head) - _LAST_TOKEN_MAX - 256, 0)  # (the pattern's body is at most 4,096 long)
    opened = None
    for found in _DOLLAR_PASSWORD.finditer(head, window):
        opened = found
    if opened is not None and f"${opened.group(1)}$" not in head[opened.end() :]:
        head = head[: opened.end() - len(opened.group(1)) - 2]
    return head


def redact_head(text: str, max_chars: int = REDACT_MAX_CHARS) -> str:
    """``text`` redacted, or, past ``max_chars``, its first ``max_chars`` redacted and the rest cut
    (said at the end): for text of any size (a log line, an exception's message, a traceback).

    What the cut could leave of a secret is not kept: its last token goes, a dollar-quoted
    password it left open goes, and a quoted string it left open is closed before the patterns
    run (``password='two wor`` is redacted whole).
    """
    if len(text) <= max_chars:
        return redact(text)
    head = _without_open_secret(text[:max_chars])
    cleaned = redact(head + _CLOSERS)
    for closer in reversed(_CLOSERS):  # (those the patterns did not take with a secret)
        cleaned = cleaned.removesuffix(closer)
    return f"{cleaned} … [cut: {len(text):,} characters in all]"


#: A surrogate code point in a Python string: always unpaired (a pair is one code point).
_SURROGATE = re.compile("[\ud800-\udfff]")


def storable_text(text: str) -> str:
    """``text`` as PostgreSQL's text can hold it: NUL as ``\\x00``, an unpaired surrogate as U+FFFD.

    Python makes such surrogates when it decodes bytes that are not UTF-8 with
    ``surrogateescape`` (file names, arguments); a statement carrying one is refused.
    """
    text = text.replace("\x00", "\\x00")
    return _SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text


def persistable(text: str) -> str:
    """An error's text as it may be written to a table or a result: redacted (its head, past
    ``REDACT_MAX_CHARS``), then storable."""
    return storable_text(redact_head(text))
