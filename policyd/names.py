"""Normalisation of domain names and addresses: lowercase, IDNA A-labels, no trailing dot."""
from __future__ import annotations

import re

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_LOCAL = re.compile(r"^[a-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}$")


class NameError_(ValueError):
    """A domain or address that cannot be normalised."""


def normalize_domain(raw: object) -> str:
    """Return the canonical A-label form of a domain name, or raise NameError_."""
    if not isinstance(raw, str):
        raise NameError_("domain must be a string")
    name = raw.strip().rstrip(".").lower()
    if not name or len(name) > 253:
        raise NameError_("domain must be 1..253 characters")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise NameError_(f"invalid internationalised domain {raw!r}") from None
    labels = name.split(".")
    if len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        raise NameError_(f"invalid domain name {raw!r}")
    if labels[-1].isdigit():
        raise NameError_(f"invalid domain name {raw!r}")
    return name


def normalize_email(raw: object) -> tuple[str, str]:
    """Return (local_part, domain) of a mailbox address, normalised, or raise NameError_."""
    if not isinstance(raw, str):
        raise NameError_("address must be a string")
    local, sep, domain = raw.strip().rpartition("@")
    if not sep or not local:
        raise NameError_(f"invalid address {raw!r}")
    local = local.lower()
    if not _LOCAL.match(local) or local.startswith(".") or local.endswith(".") or ".." in local:
        raise NameError_(f"invalid local part in {raw!r}")
    return local, normalize_domain(domain)


def normalize_alias_source(raw: object) -> tuple[str, str]:
    """Return (local_part or '' for a catch-all, domain) of an alias source."""
    if isinstance(raw, str) and raw.strip().startswith("@"):
        return "", normalize_domain(raw.strip()[1:])
    return normalize_email(raw)


def email(local: str, domain: str) -> str:
    """Join a local part and domain ('' local part gives the catch-all '@domain')."""
    return f"{local}@{domain}"
