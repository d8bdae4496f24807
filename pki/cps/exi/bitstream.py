"""Bit-packed EXI streams (EXI 1.0 §6.2, §7.1.6, §7.1.9): alignment ``bit-packed``, no compression.

Items are packed most significant bit first with no padding between them; the final byte is padded with
zero bits. The reader never reads past the end of its buffer: running out raises :class:`ExiDecodeError`.
"""

from __future__ import annotations

from ..errors import ExiDecodeError, ExiLimitExceeded


class BitWriter:
    """Accumulates n-bit unsigned integers, Unsigned Integers and raw octets, MSB first."""

    __slots__ = ("_buf", "_acc", "_nacc")

    FLUSH_BITS = 64  # pending bits are moved to _buf once there are this many (fewer int → bytes conversions)

    def __init__(self) -> None:
        self._buf = bytearray()
        self._acc = 0  # pending bits not yet moved to _buf (fewer than FLUSH_BITS after each call)
        self._nacc = 0

    def write_bits(self, value: int, nbits: int) -> None:
        """n-bit Unsigned Integer (EXI 1.0 §7.1.9), bit-packed."""
        if value < 0 or value >> nbits:
            raise ValueError(f"{value} does not fit in {nbits} bits")
        total = self._nacc + nbits
        acc = (self._acc << nbits) | value
        if total >= 64:
            rest = total & 7
            self._buf += (acc >> rest).to_bytes(total >> 3, "big")
            acc &= (1 << rest) - 1
            total = rest
        self._acc = acc
        self._nacc = total

    def write_uint(self, value: int) -> None:
        """Unsigned Integer (EXI 1.0 §7.1.6): 7-bit groups, least significant group first, MSB = 'more'."""
        if value < 0:
            raise ValueError("Unsigned Integer must not be negative")
        if value < 0x80:
            self.write_bits(value, 8)
            return
        while True:
            group = value & 0x7F
            value >>= 7
            if value:
                self.write_bits(group | 0x80, 8)
            else:
                self.write_bits(group, 8)
                return

    def write_octets(self, data: bytes) -> None:
        """Raw octets at the current (possibly unaligned) bit position."""
        if not data:
            return
        n = self._nacc
        if n & 7:
            self.write_bits(int.from_bytes(data, "big"), 8 * len(data))
            return
        if n:  # byte-aligned with whole pending octets: move them first
            self._buf += self._acc.to_bytes(n >> 3, "big")
            self._acc = 0
            self._nacc = 0
        self._buf += data

    @property
    def bit_length(self) -> int:
        return 8 * len(self._buf) + self._nacc

    def bits(self) -> tuple[int, int]:
        """(value, bit count) of everything written so far: what ``write_bits`` takes to write it again."""
        return (int.from_bytes(self._buf, "big") << self._nacc) | self._acc, 8 * len(self._buf) + self._nacc

    def getvalue(self) -> bytes:
        """The stream so far, the last byte padded with zero bits."""
        n = self._nacc
        if not n:
            return bytes(self._buf)
        pad = -n & 7
        return bytes(self._buf) + (self._acc << pad).to_bytes((n + pad) >> 3, "big")


class BitReader:
    """Reads what :class:`BitWriter` writes, bounds-checked against the end of the buffer."""

    __slots__ = ("_data", "_pos", "_end")

    def __init__(self, data: bytes) -> None:
        self._data = bytes(data)
        self._pos = 0
        self._end = 8 * len(self._data)

    @property
    def position(self) -> int:
        return self._pos

    @property
    def remaining_bits(self) -> int:
        return self._end - self._pos

    def seek(self, position: int) -> None:
        """Back to a bit position read before (a decoder's look-ahead)."""
        if not 0 <= position <= self._end:
            raise ValueError("position outside the stream")
        self._pos = position

    def read_bits(self, nbits: int) -> int:
        if nbits == 0:
            return 0
        pos = self._pos
        stop = pos + nbits
        if stop > self._end:
            raise ExiDecodeError("truncated EXI stream", bit_offset=pos)
        first = pos >> 3
        last = (stop + 7) >> 3
        chunk = int.from_bytes(self._data[first:last], "big")
        self._pos = stop
        return (chunk >> (8 * last - stop)) & ((1 << nbits) - 1)

    def bits_between(self, start: int, stop: int) -> int:
        """The bits from position ``start`` to ``stop`` (both already read) as an integer, MSB first."""
        if not 0 <= start <= stop <= self._end:
            raise ValueError("positions outside the stream")
        if start == stop:
            return 0
        first = start >> 3
        last = (stop + 7) >> 3
        chunk = int.from_bytes(self._data[first:last], "big")
        return (chunk >> (8 * last - stop)) & ((1 << (stop - start)) - 1)

    def read_uint(self, max_octets: int) -> int:
        """Unsigned Integer (EXI 1.0 §7.1.6) of at most ``max_octets`` 7-bit groups."""
        value = 0
        shift = 0
        for i in range(max_octets):
            octet = self.read_bits(8)
            value |= (octet & 0x7F) << shift
            if not octet & 0x80:
                if octet == 0 and i:
                    # a trailing zero group: valid EXI, but never what an encoder writes; refusing it keeps
                    # decode → encode exact, which signature checks rely on (canonical EXI)
                    raise ExiDecodeError("non-minimal Unsigned Integer", bit_offset=self._pos)
                return value
            shift += 7
        raise ExiLimitExceeded("Unsigned Integer longer than allowed", max_octets=max_octets, bit_offset=self._pos)

    def read_octets(self, count: int) -> bytes:
        if count == 0:
            return b""
        if 8 * count > self.remaining_bits:
            raise ExiDecodeError("truncated EXI stream: octets announced beyond its end", bit_offset=self._pos)
        if self._pos & 7 == 0:
            start = self._pos >> 3
            self._pos += 8 * count
            return self._data[start : start + count]
        return self.read_bits(8 * count).to_bytes(count, "big")
