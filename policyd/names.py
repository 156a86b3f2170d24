"""Normalisation of domain names and addresses: lowercase, IDNA A-labels, no trailing dot."""
from __future__ import annotations

import re
from functools import lru_cache

import idna

_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")  # fullmatch: "$" would take a "\n"
_LOCAL = re.compile(r"[a-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}")
MAX_DOMAIN = 253   # RFC 1035 §2.3.4, without the final dot
MAX_ADDRESS = 254  # RFC 5321 §4.5.3.1.3 path limit minus the angle brackets
MAX_RAW = 1024     # longer input is rejected before any IDNA work is spent on it


class InvalidName(ValueError):
    """A domain or address that cannot be normalised."""


# C0 controls, DEL and C1 controls (Unicode category Cc): a newline in a name would forge a
# line in a log, a Postfix map answer or an alias list (SPEC §8), so no name carries one.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def has_control(text: str) -> bool:
    """True if text holds any C0 or C1 control character or DEL."""
    return _CONTROL.search(text) is not None


def clean_text(raw: object, what: str, *, max_len: int = 200) -> str:
    """A human-given name (partner, key, mailbox display name): stripped, non-empty, bounded,
    UTF-8 encodable and without control characters; else InvalidName."""
    if not isinstance(raw, str):
        raise InvalidName(f"{what} must be a string")
    if has_control(raw):
        raise InvalidName(f"{what} must not contain control characters")
    text = raw.strip()
    if not text or len(text) > max_len:
        raise InvalidName(f"{what} must be 1..{max_len} characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, which JSON can carry
        raise InvalidName(f"{what} must be valid UTF-8 text") from None
    return text


def _show(raw: str) -> str:
    """A short, printable form of rejected input for error messages."""
    return repr(raw if len(raw) <= 80 else raw[:80] + "...")


@lru_cache(maxsize=4096)
def to_a_labels(name: str) -> str:
    """IDNA 2008 (UTS #46, non-transitional) A-label form; raises idna.IDNAError.

    Not the stdlib codec: IDNA 2003 maps 'straße.de' to 'strasse.de', a different registered
    domain, which would let one tenant claim another's name. policyd.protocol uses this too,
    so a stored name and the one Postfix sends always agree.
    """
    return idna.encode(name, uts46=True, transitional=False).decode("ascii")


def _to_ascii(name: str, raw: str) -> str:
    """The A-label form of an internationalised name."""
    try:
        return to_a_labels(name)
    except (idna.IDNAError, UnicodeError):
        raise InvalidName(f"invalid internationalised domain {_show(raw)}") from None


def _check_labels(name: str, raw: str) -> None:
    """LDH labels (RFC 1123), at least two, a non-numeric TLD, and A-labels that decode."""
    labels = name.split(".")
    if (len(name) > MAX_DOMAIN or len(labels) < 2 or labels[-1].isdigit()
            or not all(_LABEL.fullmatch(label) for label in labels)):
        raise InvalidName(f"invalid domain name {_show(raw)}")
    for label in labels:
        if label.startswith("xn--"):
            try:
                idna.decode(label)
            except (idna.IDNAError, UnicodeError):
                raise InvalidName(f"invalid A-label {label!r} in {_show(raw)}") from None


def normalize_domain(raw: object) -> str:
    """Return the canonical A-label form of a domain name, or raise InvalidName."""
    if not isinstance(raw, str):
        raise InvalidName("domain must be a string")
    if has_control(raw):
        raise InvalidName(f"domain {_show(raw)} contains a control character")
    name = raw.strip()
    name = name[:-1] if name.endswith(".") else name  # the root's dot, once
    if not name or len(name) > MAX_RAW:
        raise InvalidName(f"domain must be 1..{MAX_DOMAIN} characters")
    name = name.lower() if name.isascii() else _to_ascii(name.lower(), raw)
    _check_labels(name, raw)
    return name


def normalize_email(raw: object) -> tuple[str, str]:
    """Return (local_part, domain) of a mailbox address, normalised, or raise InvalidName."""
    if not isinstance(raw, str):
        raise InvalidName("address must be a string")
    if has_control(raw):
        raise InvalidName(f"address {_show(raw)} contains a control character")
    local, sep, domain = raw.strip().rpartition("@")
    if not sep or not local:
        raise InvalidName(f"invalid address {_show(raw)}")
    local = local.lower()
    if not _LOCAL.fullmatch(local) or local.startswith(".") or local.endswith(".") or ".." in local:
        raise InvalidName(f"invalid local part in {_show(raw)}")
    domain = normalize_domain(domain)
    if len(local) + 1 + len(domain) > MAX_ADDRESS:
        raise InvalidName(f"address longer than {MAX_ADDRESS} characters")
    return local, domain


def normalize_alias_source(raw: object) -> tuple[str, str]:
    """Return (local_part or '' for a catch-all, domain) of an alias source."""
    if isinstance(raw, str) and raw.strip().startswith("@"):
        return "", normalize_domain(raw[raw.index("@") + 1:])
    return normalize_email(raw)

