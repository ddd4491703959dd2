"""Credentials out of what the project prints and logs: one helper, :func:`redact`.

What counts as a credential in a line of text:

* the password of a URL's user information – ``postgresql://app:s3cret@db/x`` becomes
  ``postgresql://app:***@db/x`` (the user name stays: it says which account);
* every value of a URL's query and its fragment – webhooks carry their secret there
  (``https://hooks.example/x?token=abc`` becomes ``...?token=***``);
* a WinCenter bearer token (``wct_`` and 43 URL-safe characters, see
  :mod:`agentless.wincenter.tokens`): ``wct_***``;
* any string the caller names as a secret (a token read from a file, a password).

Paths and URLs without credentials pass unchanged, so a redacted line still says which
server or file it is about. The function is for output, never for values that are used
again (a redacted URL does not connect).
"""

from __future__ import annotations

import re
import urllib.parse

__all__ = ["MASK", "redact"]

MASK = "***"
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")
_TOKEN = re.compile(r"\bwct_[A-Za-z0-9_\-]{16,}")


def _redact_url(url: str) -> str:
    trail = len(url) - len(url.rstrip(".,:;)]"))  # punctuation of the sentence around it
    url, tail = (url[:-trail], url[-trail:]) if trail else (url, "")
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # not parseable as a URL: hide everything after the scheme
        return url.split("://", 1)[0] + "://" + MASK + tail
    netloc = parts.netloc
    if "@" in netloc:  # user:password@, or a lone token@: only a user name with a password stays
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{hostport}" if colon and user else f"{MASK}@{hostport}"
    redacted = f"{parts.scheme}://{netloc}{parts.path}"
    if parts.query:
        pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        redacted += "?" + ("&".join(f"{key}={MASK}" for key, _value in pairs) if pairs else MASK)
    if parts.fragment:
        redacted += "#" + MASK
    return redacted + tail


def redact(text: object, *secrets: str | None) -> str:
    """*text* (str() of anything) with every credential it holds masked: URL passwords,
    query strings and fragments, WinCenter tokens, and each non-empty string of
    *secrets*. Idempotent."""
    line = str(text)
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        line = line.replace(secret, MASK)
    line = _URL.sub(lambda match: _redact_url(match.group(0)), line)
    return _TOKEN.sub("wct_" + MASK, line)
