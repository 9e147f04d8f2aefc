"""Secrets kept out of text: every line and file orch writes goes through here first.

Three layers, because a secret reaches text in three ways:
- by shape: credentials inside URIs (`https://u:pw@host`, `?sig=...`), and the token formats of the services users
  hold tokens for (Hugging Face `hf_...`, GitHub, OpenAI-style `sk-...`, AWS keys, JWT bearer tokens, Azure
  connection-string keys) are masked wherever they appear;
- by name: a value under a secret-looking key (`hub_token`, `password`, `client_secret`, ...) in a config dict;
- by value: the exact secrets this process knows (a token resolved for a job, a tracking URI's password) are
  masked in whatever a library prints, through `MaskedStream` on sys.stdout / sys.stderr and `MaskingFilter` on
  logging handlers (MLflow's "View run ... at <uri>" line, transformers' warnings, tracebacks).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, TextIO

MASK = "***"

# user:password@ (or a bare token@) in a URI, and secret-looking query parameters (SAS sig=, token=, ...)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s]*)(?::(?P<pw>[^/@\s]*))?@")
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&;](?:sig|signature|token|access_token|password|passwd|pwd|secret|api_key|apikey|key|"
    r"client_secret|sas|se?kret)=)(?!REDACTED(?:[&#\s'\"]|$))(?P<value>[^&#\s'\"]+)",  # REDACTED: logstream's mask
    re.IGNORECASE,
)
# Token formats: the value alone is enough to recognise them, wherever they are printed.
_TOKEN_SHAPES = re.compile(
    r"\bhf_[A-Za-z0-9]{20,}"  # Hugging Face
    r"|\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})"  # GitHub
    r"|\bsk-(?:proj-)?[A-Za-z0-9_-]{20,}"  # OpenAI-style API keys
    r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"  # AWS access key ids
    r"|\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JWT (Azure AD / Entra bearer tokens)
)
# key=value pairs of connection strings and headers: AccountKey=...; Authorization: Bearer ...
_PAIR_SECRET = re.compile(
    r"(?P<key>\b(?:AccountKey|SharedAccessKey|SharedAccessSignature|Password|Pwd|client_secret|api_key|"
    r"hub_token|hf_token|access_token|auth_token)\s*=\s*)(?P<value>[^;&\s'\",]+)"
    r"|(?P<auth>\b(?:Bearer|Basic)\s+)(?P<cred>[A-Za-z0-9._~+/=-]{12,})",
    re.IGNORECASE,
)
_PLAIN = frozenset({"true", "false", "none", "null", MASK})


def redact(text: str) -> str:
    """Credentials inside URIs and token-shaped values in any text -> ***: `https://u:pw@host` ->
    `https://u:***@host`, `https://tok@host` -> `https://***@host`, `?sig=...` -> `?sig=***`, `hf_...` -> ***."""
    if not isinstance(text, str):
        return text
    if "@" in text or "=" in text:

        def userinfo(m: re.Match[str]) -> str:
            if m.group("pw") is not None:
                return f"{m.group('scheme')}{m.group('user')}:{MASK}@"
            return f"{m.group('scheme')}{MASK}@"

        text = _QUERY_SECRET.sub(lambda m: m.group("key") + MASK, _USERINFO.sub(userinfo, text))
    text = _TOKEN_SHAPES.sub(MASK, text)
    return _PAIR_SECRET.sub(_pair, text)


def secret_parts(text: str) -> list[str]:
    """The credential substrings redact() would mask in `text` (a URI's password, a sig= value, a token), so
    that exactly those are remembered, not the whole text around them."""
    parts = [m.group("pw") or m.group("user") for m in _USERINFO.finditer(text)]
    parts += [m.group("value") for m in _QUERY_SECRET.finditer(text)]
    parts += [m.group(0) for m in _TOKEN_SHAPES.finditer(text)]
    parts += [m.group("value") or m.group("cred") for m in _PAIR_SECRET.finditer(text)]
    return [p for p in parts if p and p.lower() not in _PLAIN]


def _pair(m: re.Match[str]) -> str:
    if m.group("auth") is not None:
        return m.group("auth") + MASK
    value = m.group("value")
    return m.group(0) if value.lower() in _PLAIN else m.group("key") + MASK


# Keys whose string values are secrets. Tokenizer words (pad_token, max_new_tokens, ...) are not.
_SECRET_KEY = re.compile(
    r"(?:^|[_-])(?:token|secret|password|passwd|pwd|api[_-]?key|apikey|access[_-]?key|account[_-]?key|"
    r"private[_-]?key|secret[_-]?key|sas|sas[_-]?token|credentials?|connection[_-]?string|auth)$"
    r"|^(?:key|token|secret|password|authorization)$",
    re.IGNORECASE,
)
_NOT_SECRET_KEY = re.compile(
    r"^(?:pad|eos|bos|unk|sep|cls|mask|additional_special|chat|image|audio|video|start|end|"
    r"decoder_start|forced_bos|forced_eos)_token$|tokens?_id|^(?:max|min|num)_",
    re.IGNORECASE,
)


def is_secret_key(key: Any) -> bool:
    """A config key whose string value is a secret (hub_token, hf_token, password, client_secret, ...)."""
    return isinstance(key, str) and bool(_SECRET_KEY.search(key)) and not _NOT_SECRET_KEY.search(key)


def redact_obj(obj: Any) -> Any:
    """mask() over every string of a JSON-like object, and the string values of secret-looking keys masked."""
    if isinstance(obj, dict):
        return {k: MASK if is_secret_key(k) and isinstance(v, str) and v else redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact_obj(v) for v in obj]
    return mask(obj) if isinstance(obj, str) else obj


# ---- exact values: what this process knows to be secret ------------------------------------------------------
_KNOWN: set[str] = set()


def remember_secret(value: str | None) -> None:
    """Mask this exact value in everything this process prints from now on (short values would mask words)."""
    if isinstance(value, str) and len(value) >= 6 and value.lower() not in _PLAIN:
        _KNOWN.add(value)


def mask(text: str) -> str:
    """redact() plus every remembered secret value."""
    if not isinstance(text, str):
        return text
    for value in sorted(_KNOWN, key=len, reverse=True):
        if value in text:
            text = text.replace(value, MASK)
    return redact(text)


class MaskedStream:
    """A text stream that masks secrets in what is written through it, line by line (a secret split across two
    writes of one line is still caught: text is held until its newline)."""

    def __init__(self, inner: TextIO) -> None:
        self.inner = inner
        self._pending = ""

    def write(self, text: str) -> int:
        data = self._pending + text
        head, sep, tail = data.rpartition("\n")
        if sep:
            self.inner.write(mask(head + sep))
        self._pending = tail
        if len(self._pending) > 4096 or "\r" in self._pending:  # progress bars redraw without newlines
            self.inner.write(mask(self._pending))
            self._pending = ""
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self.inner.write(mask(self._pending))
            self._pending = ""
        self.inner.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...: the inner stream's
        return getattr(self.inner, name)


class MaskingFilter(logging.Filter):
    """Masks secrets in log records (message and arguments) before any handler formats them."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to logging's own error path
            return True
        masked = mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


_FILTER = MaskingFilter()


@contextmanager
def masked_output(secrets: Iterable[str | None] = ()) -> Iterator[None]:
    """While the block runs, sys.stdout / sys.stderr and every logging handler mask secrets: the remembered ones,
    `secrets`, and every token-shaped value."""
    for value in secrets:
        remember_secret(value)
    old_out, old_err = sys.stdout, sys.stderr
    wrapped = not isinstance(old_out, MaskedStream)
    if wrapped:
        sys.stdout, sys.stderr = MaskedStream(old_out), MaskedStream(old_err)  # type: ignore[assignment]
    handlers = _all_handlers()
    for handler in handlers:
        handler.addFilter(_FILTER)
    try:
        yield
    finally:
        if wrapped:
            for stream in (sys.stdout, sys.stderr):
                with suppress(OSError, ValueError):
                    stream.flush()
            sys.stdout, sys.stderr = old_out, old_err
        for handler in handlers:
            handler.removeFilter(_FILTER)


def install_masking() -> None:
    """For a whole process (the runner): sys.stdout / sys.stderr and logging handlers mask secrets for good."""
    if not isinstance(sys.stdout, MaskedStream):
        sys.stdout = MaskedStream(sys.stdout)  # type: ignore[assignment]
        sys.stderr = MaskedStream(sys.stderr)  # type: ignore[assignment]
    logging.getLogger().addFilter(_FILTER)
    for handler in _all_handlers():
        handler.addFilter(_FILTER)


def _all_handlers() -> list[logging.Handler]:
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    return list({id(h): h for lg in loggers for h in lg.handlers}.values())
