"""Paging of the list RPCs (ListModels, ListDatasets, ListOperations): page sizes, the byte
budget of a page, and page tokens.

A page token is the position after the last item of its page: that item's (created, id), the
key the store orders the list by. It names the list it belongs to (the RPC, and for
ListOperations the kind filter, as a digest) and carries an HMAC-SHA256 tag made with a key kept
in the store, so a client cannot make one up, change one, or carry one to another list: every
such token is INVALID_ARGUMENT naming page_token, checked before any of it is used. Even a
valid token only moves the start of the same query over the same table: it holds no table,
column, filter or SQL, and the store binds its values as parameters.

Layout (URL-safe base64 without padding):
    version (1) | list (1) | scope digest (8) | created (8, IEEE double, big-endian) | id (UTF-8) | tag (16)
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import re
import struct
from dataclasses import dataclass
from typing import Optional, Sequence

from advex.service.errors import invalid

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# A page is cut at this many bytes of items whatever its page_size: the default receive limit of
# gRPC clients (4 MiB), so that a client with stock settings reads any page. The record limits
# keep every item well under it (a dataset's class names: registry.MAX_CLASS_NAMES_BYTES); an item
# larger than that would come alone in its page.
PAGE_BYTES = 4 << 20
ITEM_OVERHEAD = 6          # a repeated message field: its tag (1 byte) and length (at most 5 bytes)
TOKEN_ROOM = 1024          # what the rest of a response (next_page_token) may take
KEY_NAME = "page_token"    # the store secret that signs tokens

VERSION = 1
LISTS = {"models": 1, "datasets": 2, "operations": 3, "audits": 4}
RPC_NAMES = {"models": "ListModels", "datasets": "ListDatasets", "operations": "ListOperations",
             "audits": "ListAudits"}
_HEAD = struct.Struct(">BB8sd")
_TAG_BYTES = 16
_MAX_ID_BYTES = 512
MAX_TOKEN_CHARS = 4 * (_HEAD.size + _MAX_ID_BYTES + _TAG_BYTES) // 3 + 4
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_-]+")
_CONTEXT = b"advex page token\x00"

NOT_OURS = ("not a token this server issued: pass the next_page_token of the previous page unchanged, "
            "or \"\" for the first page")


def page_size(value: int, field: str = "page_size") -> int:
    """A request's page_size, checked: 0 -> DEFAULT_PAGE_SIZE."""
    if value < 0 or value > MAX_PAGE_SIZE:
        raise invalid(field, f"must be in [0, {MAX_PAGE_SIZE}] (0 = {DEFAULT_PAGE_SIZE}), got {value}")
    return value or DEFAULT_PAGE_SIZE


@dataclass(frozen=True, order=True)
class Position:
    """Where a list's order puts an item: its created time (seconds, the store's column), then its id."""
    created: float
    id: str


class Page:
    """Counts what goes into one page: at most `size` items and `max_bytes` of them, but always
    the first item, whatever its size (the record limits keep any one item under the message
    limit). Once an item does not fit, the page is full."""

    def __init__(self, size: int, max_bytes: int = PAGE_BYTES) -> None:
        self.size = size
        self.max_bytes = max_bytes - TOKEN_ROOM
        self.count = 0
        self.bytes = 0
        self.full = False

    @property
    def room(self) -> int:
        return 0 if self.full else self.size - self.count

    def take(self, item_bytes: int) -> bool:
        cost = item_bytes + ITEM_OVERHEAD
        if self.full or self.count >= self.size or (self.count and self.bytes + cost > self.max_bytes):
            self.full = True
            return False
        self.count += 1
        self.bytes += cost
        return True


def _digest(scope: str) -> bytes:
    return hashlib.sha256(scope.encode("utf-8", "surrogatepass")).digest()[:8]


class PageTokens:
    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("a page token key needs at least 16 bytes")
        self._key = key

    def _tag(self, body: bytes) -> bytes:
        return hmac.new(self._key, _CONTEXT + body, hashlib.sha256).digest()[:_TAG_BYTES]

    def issue(self, listing: str, position: Position, scope: str = "") -> str:
        """The token of the page after `position` in list `listing`, with filter `scope`."""
        ident = position.id.encode("utf-8")
        if not math.isfinite(position.created) or not ident or len(ident) > _MAX_ID_BYTES:
            raise ValueError(f"no page token for position {position!r}")
        body = _HEAD.pack(VERSION, LISTS[listing], _digest(scope), position.created) + ident
        return base64.urlsafe_b64encode(body + self._tag(body)).rstrip(b"=").decode("ascii")

    def position(self, token: str, listing: str, scope: str = "", field: str = "page_token") -> Optional[Position]:
        """The position a request's page_token continues from; None for "" (the first page).
        Anything this server did not issue for this list is INVALID_ARGUMENT naming `field`."""
        if not token:
            return None
        if len(token) > MAX_TOKEN_CHARS or not _TOKEN_CHARS.fullmatch(token) or len(token) % 4 == 1:
            raise invalid(field, NOT_OURS)
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise invalid(field, NOT_OURS) from None
        if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != token:  # one spelling per token
            raise invalid(field, NOT_OURS)
        if len(raw) <= _HEAD.size + _TAG_BYTES:
            raise invalid(field, NOT_OURS)
        body, tag = raw[:-_TAG_BYTES], raw[-_TAG_BYTES:]
        if not hmac.compare_digest(tag, self._tag(body)):
            raise invalid(field, NOT_OURS)
        # signed by this server: what follows can only be wrong by being used in another list
        version, code, digest, created = _HEAD.unpack_from(body)
        if version != VERSION:
            raise invalid(field, NOT_OURS)
        if code != LISTS[listing]:
            other = next((RPC_NAMES[name] for name, c in LISTS.items() if c == code), "another list")
            raise invalid(field, f"a token of {other}, not of {RPC_NAMES[listing]}: a token continues only the "
                                 "listing it came from")
        if not hmac.compare_digest(digest, _digest(scope)):
            raise invalid(field, "the token continues a listing with another filter (kind, target or audit name); "
                                 "keep the request's other fields as they were, or start again with page_token \"\"")
        try:
            ident = body[_HEAD.size:].decode("utf-8")
        except UnicodeDecodeError:
            raise invalid(field, NOT_OURS) from None
        if not math.isfinite(created) or not ident:
            raise invalid(field, NOT_OURS)
        return Position(created, ident)


def tokens(store) -> PageTokens:
    """The page tokens of the server that keeps `store` (its key lives there: tokens stay valid
    across restarts, and only this data dir's server accepts them)."""
    return PageTokens(store.secret(KEY_NAME))


def list_page(store, table: str, cls, size: int, token: str, *, scope: str = "", match: Optional[dict] = None,
              newest_first: bool = False, first: Sequence[tuple[Position, object]] = ()) -> tuple[list, str]:
    """One page of a list: the records of store table `table` (messages of class `cls`), after
    those of `first` (positions and messages the store does not hold, in order, all before any
    stored record: the built-in datasets), from where `token` says; and the next page's token
    ("" after the last page). `size`: a checked page_size; `match`: the store's filter (see
    Store.list_page); `scope`: the filter as a string, which a token is bound to."""
    codec = tokens(store)
    after = codec.position(token, table, scope)
    page = Page(size)
    items: list = []
    last: Optional[Position] = None
    more = False
    for position, message in first:
        if after is not None and not position > after:
            continue
        if not page.take(message.ByteSize()):
            more = True
            break
        items.append(message)
        last = position
    if not more:
        rows, more = store.list_page(table, page.take, page.room, newest_first=newest_first, match=match,
                                     after=None if after is None else (after.created, after.id))
        for created, ident, blob in rows:
            items.append(cls.FromString(blob))
            last = Position(created, ident)
    return items, codec.issue(table, last, scope) if more and last is not None else ""
