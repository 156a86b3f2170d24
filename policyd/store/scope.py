"""Tenant scoping, written once: every store query that a client token runs goes through here."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Scope:
    """Who is asking: the master, or a client key of one partner."""

    actor: str                    # 'master' or the key id ('key_...')
    partner_id: int | None = None  # None for the master

    @property
    def is_master(self) -> bool:
        """True for the master token."""
        return self.partner_id is None

    def where(self, column: str = "partner_id") -> tuple[str, tuple[object, ...]]:
        """SQL condition and parameters that limit rows to what this scope may see."""
        if self.is_master:
            return "1", ()
        return f"{column} = ?", (self.partner_id,)


MASTER = Scope(actor="master")
