"""Secrets out of everything the pipeline prints, logs or writes: one function, used everywhere.

A URL's password (``https://alice:s3cr3t@host/...``, ``postgresql://mlflow:pw@db/mlflow``) becomes
``alice:***@``, a user name alone in an HTTP URL (``https://<token>@host``) ``***@``, and every
value of its query string (a presigned object-store URL's signature, ``?X-Amz-Signature=...``)
``***``: the keys stay, so a reader still sees what kind of URL it was. Used on log lines (:func:`progress.say`), error messages (the stage runner, predict, the
server launcher), MLflow params, tags and run names, and the JSON files the stages write.
"""

from __future__ import annotations

import re

HIDDEN = "***"
# A URL inside free text: a scheme, ://, then anything up to white space or a quote.
_URL = re.compile(r"""[A-Za-z][A-Za-z0-9+.-]*://[^\s'"<>`]+""")
TOKEN_SCHEMES = ("http", "https", "ftp")  # where a user name alone is a token (git, GitHub)
_TRAILING = ").,;:]}"  # punctuation that ends a sentence, not the URL


def redact(text: str) -> str:
    """``text`` with every URL's password and query values replaced by ``***``."""
    if "://" not in text:
        return text
    return _URL.sub(_redact_match, text)


def _redact_match(match: re.Match) -> str:
    url = match.group(0)
    tail = ""
    while url and url[-1] in _TRAILING:
        url, tail = url[:-1], url[-1] + tail
    return redact_url(url) + tail


def redact_url(url: str) -> str:
    """One URL without its secrets: ``scheme://user:***@host/path?key=***`` (taken apart by hand:
    ``urlunsplit`` would rewrite ``sqlite:////abs/path`` and other URLs it does not know)."""
    scheme, sep, rest = url.partition("://")
    authority, tail = _authority(rest)
    if "@" in authority:
        userinfo, host = authority.rsplit("@", 1)
        if ":" in userinfo:
            authority = f"{userinfo.split(':', 1)[0]}:{HIDDEN}@{host}"
        elif scheme.lower() in TOKEN_SCHEMES:  # https://<token>@host: the name is the secret
            authority = f"{HIDDEN}@{host}"
    before_fragment, hash_, fragment = tail.partition("#")
    path, question, query = before_fragment.partition("?")
    if question:
        query = "&".join(
            f"{pair.split('=', 1)[0]}={HIDDEN}" if "=" in pair else pair
            for pair in query.split("&")
        )
    return f"{scheme}{sep}{authority}{path}{question}{query}{hash_}{fragment}"


def _authority(rest: str) -> tuple[str, str]:
    """(``user:password@host:port``, the path, query and fragment after it)."""
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    return rest[:end], rest[end:]


def redact_values(obj):
    """Every string inside ``obj`` (dicts, lists, tuples: e.g. MLflow params, a JSON file's
    content) redacted; other values as they are."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_values(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(redact_values(v) for v in obj)
    return obj


def has_credentials(url: str) -> bool:
    """Whether ``url`` carries credentials in its authority: ``user:password@``, or ``token@``
    (a user name standing in for a token)."""
    scheme, sep, rest = url.partition("://")
    return bool(sep) and "@" in _authority(rest)[0]
