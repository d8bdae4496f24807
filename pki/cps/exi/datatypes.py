"""Built-in EXI datatype representations (EXI 1.0 §7) for the value types the ISO 15118-2 subset uses.

Options in force are those of ISO 15118-2 (as EXIficient is configured by RISE-V2G and Josev): no
Preserve.lexicalValues, no datatype representation map, and ``valuePartitionCapacity`` 0 — so *value*
content items never enter the string table and every String value is a literal of length L + 2
(EXI 1.0 §7.3.3). Facets that EXI itself ignores (length, maxLength, min/max of wide integer types) are
still checked on both sides: the encoder never emits a schema-invalid value and the decoder rejects one.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

from ..errors import ExiDecodeError, ExiEncodeError, ExiLimitExceeded
from .bitstream import BitReader, BitWriter


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds that keep decoding linear in the input and small in memory.

    The defaults fit OCPP 2.1's largest ``exiRequest``/``exiResponse`` (17000 base64 characters) with room.
    """

    max_stream_octets: int = 32768
    max_depth: int = 24
    max_events: int = 20000
    max_string_chars: int = 4096
    max_binary_octets: int = 16384
    max_integer_octets: int = 32  # 7-bit groups: 224 bits, enough for a 20-octet X.509 serial number


DEFAULT_LIMITS = DecodeLimits()


def bits_for(count: int) -> int:
    """⌈log2 count⌉, the width of an n-bit code distinguishing ``count`` values (EXI 1.0 §6.2)."""
    return (count - 1).bit_length() if count > 1 else 0


_ASCII_NON_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")
_ASCII_NON_XML_BYTES = re.compile(b"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def _is_xml_char(cp: int) -> bool:
    # XML 1.0 Char production; EXI carries characters as Unicode code points (EXI 1.0 §7.1.10).
    return cp in (0x9, 0xA, 0xD) or 0x20 <= cp <= 0xD7FF or 0xE000 <= cp <= 0xFFFD or 0x10000 <= cp <= 0x10FFFF


class Datatype(ABC):
    """One EXI datatype representation plus the schema facets of the XSD simple type it stands for."""

    label: str = "value"

    @abstractmethod
    def check(self, value: object) -> object:
        """Validate a Python value for encoding; return it normalised. Raises :class:`ExiEncodeError`."""

    @abstractmethod
    def write(self, writer: BitWriter, value: object) -> None:
        """Encode an already checked value."""

    @abstractmethod
    def read(self, reader: BitReader, limits: DecodeLimits) -> object:
        """Decode a value, enforcing ``limits`` and the facets. Raises :class:`ExiDecodeError`."""


@dataclass(frozen=True)
class StringType(Datatype):
    """String (EXI 1.0 §7.1.10) as a *value* content item: UInt(L+2) then L code points as UInts."""

    label: str = "string"
    min_length: int = 0
    max_length: int | None = None

    def check(self, value: object) -> object:
        if not isinstance(value, str):
            raise ExiEncodeError(f"{self.label}: expected a string")
        if value.isascii():  # fast path: only the C0 controls other than TAB, LF, CR are not XML characters
            bad = _ASCII_NON_XML.search(value)
            if bad is not None:
                raise ExiEncodeError(f"{self.label}: character U+{ord(bad.group()):04X} is not allowed in XML")
        else:
            for ch in value:
                if not _is_xml_char(ord(ch)):
                    raise ExiEncodeError(f"{self.label}: character U+{ord(ch):04X} is not allowed in XML")
        self._facets(value, ExiEncodeError)
        return value

    def _facets(self, value: str, error: type[ExiEncodeError] | type[ExiDecodeError]) -> None:
        if len(value) < self.min_length or (self.max_length is not None and len(value) > self.max_length):
            raise error(
                f"{self.label}: length {len(value)} outside [{self.min_length}, {self.max_length or 'unbounded'}]"
            )

    def write(self, writer: BitWriter, value: object) -> None:
        assert isinstance(value, str)
        writer.write_uint(len(value) + 2)
        if value.isascii():
            # A code point below 128 is an Unsigned Integer of one 7-bit group with the 'more' bit clear:
            # exactly the ASCII octet. So an ASCII string is its ASCII octets (the usual case in ISO 15118).
            writer.write_octets(value.encode("ascii"))
            return
        for ch in value:
            writer.write_uint(ord(ch))

    def read(self, reader: BitReader, limits: DecodeLimits) -> object:
        value = read_string_literal(reader, limits, self.label)
        self._facets(value, ExiDecodeError)
        return value


def read_string_literal(reader: BitReader, limits: DecodeLimits, label: str) -> str:
    """A String value content item; compact identifiers are impossible with valuePartitionCapacity 0."""
    marker = reader.read_uint(5)
    if marker < 2:
        # 0 = local value hit, 1 = global value hit (EXI 1.0 §7.3.3): the value partitions stay empty here.
        raise ExiDecodeError(f"{label}: string table hit, but value partitions are empty (valuePartitionCapacity 0)")
    length = marker - 2
    if length > limits.max_string_chars:
        raise ExiLimitExceeded(f"{label}: string longer than {limits.max_string_chars} characters")
    if 8 * length > reader.remaining_bits:
        raise ExiDecodeError(f"{label}: string runs past the end of the stream")
    start = reader.position
    octets = reader.read_octets(length)
    if octets.isascii():
        # Every octet < 0x80 is a complete one-group Unsigned Integer (EXI 1.0 §7.1.6): the code point itself.
        bad = _ASCII_NON_XML_BYTES.search(octets)
        if bad is not None:
            raise ExiDecodeError(f"{label}: code point {bad.group()[0]:#x} is not an XML character")
        return octets.decode("ascii")
    reader.seek(start)  # some code point takes more than one group: decode one by one
    chars = []
    for _ in range(length):
        cp = reader.read_uint(3)
        if not _is_xml_char(cp):
            raise ExiDecodeError(f"{label}: code point {cp:#x} is not an XML character")
        chars.append(chr(cp))
    return "".join(chars)


@dataclass(frozen=True)
class BinaryType(Datatype):
    """Binary (EXI 1.0 §7.1.1) for xs:base64Binary and xs:hexBinary: UInt(length) then the octets."""

    label: str = "binary"
    min_length: int = 0
    max_length: int | None = None

    def check(self, value: object) -> object:
        if type(value) is bytes:  # the usual case, without a copy
            data = value
        elif isinstance(value, bytearray | memoryview):
            data = bytes(value)
        else:
            raise ExiEncodeError(f"{self.label}: expected bytes")
        self._facets(len(data), ExiEncodeError)
        return data

    def _facets(self, length: int, error: type[ExiEncodeError] | type[ExiDecodeError]) -> None:
        if length < self.min_length or (self.max_length is not None and length > self.max_length):
            raise error(f"{self.label}: {length} octets outside [{self.min_length}, {self.max_length or 'unbounded'}]")

    def write(self, writer: BitWriter, value: object) -> None:
        assert isinstance(value, bytes)
        writer.write_uint(len(value))
        writer.write_octets(value)

    def read(self, reader: BitReader, limits: DecodeLimits) -> object:
        length = reader.read_uint(5)
        if length > limits.max_binary_octets:
            raise ExiLimitExceeded(f"{self.label}: binary value longer than {limits.max_binary_octets} octets")
        self._facets(length, ExiDecodeError)
        return reader.read_octets(length)


@dataclass(frozen=True)
class IntegerType(Datatype):
    """Integer (EXI 1.0 §7.1.5): n-bit offset when the range has ≤ 4096 values, Unsigned Integer when the
    lower bound is ≥ 0, otherwise a sign bit and the magnitude (minus one when negative)."""

    label: str = "integer"
    minimum: int | None = None
    maximum: int | None = None

    @property
    def _nbit(self) -> int | None:
        if self.minimum is not None and self.maximum is not None and self.maximum - self.minimum + 1 <= 4096:
            return bits_for(self.maximum - self.minimum + 1)
        return None

    def check(self, value: object) -> object:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ExiEncodeError(f"{self.label}: expected an integer")
        if not self._in_range(value):
            raise ExiEncodeError(f"{self.label}: {value} outside [{self.minimum}, {self.maximum}]")
        return value

    def _in_range(self, value: int) -> bool:
        return (self.minimum is None or value >= self.minimum) and (self.maximum is None or value <= self.maximum)

    def write(self, writer: BitWriter, value: object) -> None:
        assert isinstance(value, int)
        nbit = self._nbit
        if nbit is not None:
            assert self.minimum is not None
            writer.write_bits(value - self.minimum, nbit)
        elif self.minimum is not None and self.minimum >= 0:
            writer.write_uint(value)
        elif value >= 0:
            writer.write_bits(0, 1)
            writer.write_uint(value)
        else:
            writer.write_bits(1, 1)
            writer.write_uint(-value - 1)

    def read(self, reader: BitReader, limits: DecodeLimits) -> object:
        nbit = self._nbit
        if nbit is not None:
            assert self.minimum is not None
            value = self.minimum + reader.read_bits(nbit)
        elif self.minimum is not None and self.minimum >= 0:
            value = reader.read_uint(limits.max_integer_octets)
        else:
            negative = reader.read_bits(1)
            magnitude = reader.read_uint(limits.max_integer_octets)
            value = -magnitude - 1 if negative else magnitude
        if not self._in_range(value):
            raise ExiDecodeError(f"{self.label}: {value} outside [{self.minimum}, {self.maximum}]")
        return value


@dataclass(frozen=True)
class BooleanType(Datatype):
    """Boolean without pattern facets (EXI 1.0 §7.1.2): one bit."""

    label: str = "boolean"

    def check(self, value: object) -> object:
        if not isinstance(value, bool):
            raise ExiEncodeError(f"{self.label}: expected a boolean")
        return value

    def write(self, writer: BitWriter, value: object) -> None:
        writer.write_bits(1 if value else 0, 1)

    def read(self, reader: BitReader, limits: DecodeLimits) -> object:
        return bool(reader.read_bits(1))


@dataclass(frozen=True)
class EnumType(Datatype):
    """Enumeration (EXI 1.0 §7.2): the ordinal in schema order as an n-bit unsigned integer."""

    label: str = "enumeration"
    values: tuple[str, ...] = ()

    def check(self, value: object) -> object:
        if value not in self.values:
            raise ExiEncodeError(f"{self.label}: {value!r} is not one of the enumerated values")
        return value

    def write(self, writer: BitWriter, value: object) -> None:
        assert isinstance(value, str)
        writer.write_bits(self.values.index(value), bits_for(len(self.values)))

    def read(self, reader: BitReader, limits: DecodeLimits) -> object:
        index = reader.read_bits(bits_for(len(self.values)))
        if index >= len(self.values):
            raise ExiDecodeError(f"{self.label}: enumeration index {index} out of range")
        return self.values[index]


# An untyped value (CH [untyped value], AT(qname) in the element fragment grammar of §8.5.3): a String.
UNTYPED = StringType(label="untyped value")
