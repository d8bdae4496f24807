"""The element tree the EXI codec encodes and decodes (:class:`Node`), below both halves of the codec.

codec.py (the Python encoder/decoder) and native.py (the tables handed to _native.c) both build and read
these; keeping them here means neither imports the other.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from .datatypes import BinaryType, StringType
from .grammar import Grammar, State
from .schema import QName

Value = str | bytes | int | bool


@dataclass
class Node:
    """An element: qname, attributes, and its content (child Nodes and character values, in order)."""

    qname: QName
    attributes: dict[QName, Value] = field(default_factory=dict)
    content: list[Node | Value] = field(default_factory=list)
    # Set to {} on a node that is encoded more than once and not changed in between (the signed elements
    # and SignedInfo of a response: once as fragments for the digests, again inside the document): its
    # encoding under a grammar is kept as (grammar, value, bit count) and written again as one item.
    memo: dict[int, tuple[Grammar, int, int]] | None = field(default=None, compare=False, repr=False)

    @property
    def local(self) -> str:
        return self.qname[0]

    def children(self, local: str | None = None) -> Iterator[Node]:
        for item in self.content:
            if isinstance(item, Node) and (local is None or item.qname[0] == local):
                yield item

    def child(self, local: str) -> Node | None:
        return next(self.children(local), None)


def empty_value_allowed(state: State) -> bool:
    """An element may end early through the second-level EE only where a string or binary value is due."""
    if state.ch is None:
        return False
    datatype = state.productions[state.ch].datatype
    return isinstance(datatype, StringType | BinaryType)
