"""policyd: a Postfix policy daemon with an embedded multi-tenant management API."""
__version__ = "0.1.0"
