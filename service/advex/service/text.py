"""Client strings in server messages: quoted and cut short, so that an error about a 100 KB id
stays a short status (not a trailer too large for gRPC's metadata limit)."""
from __future__ import annotations

QUOTE_LIMIT = 100


def quote(value, limit: int = QUOTE_LIMIT) -> str:
    """repr(value), cut to about ``limit`` characters with how much was left out."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text) - limit} more characters)"
