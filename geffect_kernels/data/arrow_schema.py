"""The metadata of an Arrow or parquet file's schema, read without pyarrow, to refuse a file that declares a Python
extension type before pyarrow sees it.

A field whose metadata says ``ARROW:extension:name: arrow.py_extension_type`` holds a pickle in
``ARROW:extension:metadata``, which pyarrow < 14.0.1 unpickles while it reads the schema (CVE-2023-47248), so the
check cannot ask pyarrow. It reads the schema's flatbuffer itself: at the start of an IPC stream, at the start and
in the footer of an IPC file, and from a parquet footer's ``ARROW:schema`` (base64 of an IPC schema message, in
Thrift's compact encoding), and collects every key/value of the schema's metadata, of its fields and of their
children at any depth. A file whose schema cannot be read this way is refused too: pyarrow would not read it
either, and what this reader cannot see it cannot vouch for.
"""
from __future__ import annotations

import base64
import binascii
import struct

PYTHON_EXTENSION = b"arrow.py_extension_type"
_ARROW_MAGIC = b"ARROW1"
_PARQUET_MAGIC = b"PAR1"
_MAX_FIELDS = 100_000  # fields and metadata entries over the whole schema: a crafted loop cannot run on


class UnsafeSchema(ValueError):
    """The schema declares a Python extension type, or cannot be read to tell."""


class MalformedSchema(UnsafeSchema):
    """The schema cannot be read (a damaged, truncated or crafted file, or not this format at all)."""


def _malformed(what: str):
    return MalformedSchema(f"its {what} cannot be read")


class _Flatbuffer:
    """Bounds-checked reads of a flatbuffer's tables, vectors and strings."""

    def __init__(self, buf: bytes):
        self.buf = buf

    def _unpack(self, fmt: str, pos: int):
        size = struct.calcsize(fmt)
        if pos < 0 or pos + size > len(self.buf):
            raise _malformed("schema")
        return struct.unpack_from(fmt, self.buf, pos)[0]

    def root(self) -> int:
        return self._unpack("<I", 0)

    def field(self, table: int, index: int) -> int | None:
        """Where field ``index`` of the table at ``table`` lies, or None when absent."""
        vtable = table - self._unpack("<i", table)
        size = self._unpack("<H", vtable)
        if 4 + 2 * index >= size:
            return None
        offset = self._unpack("<H", vtable + 4 + 2 * index)
        return table + offset if offset else None

    def target(self, pos: int) -> int:
        return pos + self._unpack("<I", pos)

    def table(self, table: int, index: int) -> int | None:
        pos = self.field(table, index)
        return None if pos is None else self.target(pos)

    def vector(self, table: int, index: int) -> list[int]:
        """The tables of a vector-of-tables field (empty when absent)."""
        pos = self.field(table, index)
        if pos is None:
            return []
        start = self.target(pos)
        count = self._unpack("<I", start)
        if count > _MAX_FIELDS or start + 4 + 4 * count > len(self.buf):
            raise _malformed("schema")
        return [self.target(start + 4 + 4 * i) for i in range(count)]

    def string(self, table: int, index: int) -> bytes:
        pos = self.field(table, index)
        if pos is None:
            return b""
        start = self.target(pos)
        length = self._unpack("<I", start)
        if start + 4 + length > len(self.buf):
            raise _malformed("schema")
        return self.buf[start + 4:start + 4 + length]

    def u8(self, table: int, index: int) -> int:
        pos = self.field(table, index)
        return 0 if pos is None else self._unpack("<B", pos)


def _schema_metadata(flat: _Flatbuffer, schema: int) -> list[tuple[bytes, bytes]]:
    """Every key/value of the schema's metadata and of its fields' at any depth (Schema.fbs: Schema.fields is
    field 1 and custom_metadata field 2; Field.children field 5 and custom_metadata field 6)."""
    pairs = []

    def add(table, index):
        for kv in flat.vector(table, index):
            pairs.append((flat.string(kv, 0), flat.string(kv, 1)))

    add(schema, 2)
    fields = flat.vector(schema, 1)
    seen = 0
    while fields:
        field = fields.pop()
        seen += 1
        if seen > _MAX_FIELDS:
            raise _malformed("schema")
        add(field, 6)
        fields.extend(flat.vector(field, 5))
    return pairs


def _message_schema_metadata(message: bytes) -> list[tuple[bytes, bytes]]:
    """The metadata pairs of the schema message ``message`` (its prefix, then the flatbuffer; Message.fbs:
    header_type field 1, header field 2, a Schema is header type 1)."""
    prefix = 8 if message[:4] == b"\xff\xff\xff\xff" else 4  # the continuation marker, absent before 0.15
    flat = _Flatbuffer(message[prefix:])
    root = flat.root()
    schema = flat.table(root, 2) if flat.u8(root, 1) == 1 else None
    if schema is None:
        raise _malformed("IPC schema")
    return _schema_metadata(flat, schema)


def _message_at(buf: bytes, pos: int) -> bytes:
    """The bytes of the IPC message at ``pos``: continuation marker (or none), length, flatbuffer."""
    head = buf[pos:pos + 8]
    if len(head) < 4:
        raise _malformed("IPC header")
    continued = head[:4] == b"\xff\xff\xff\xff"
    if continued and len(head) < 8:
        raise _malformed("IPC header")
    length = struct.unpack_from("<i", head, 4 if continued else 0)[0]
    prefix = 8 if continued else 4
    if length <= 0 or pos + prefix + length > len(buf):
        raise _malformed("IPC header")
    return buf[pos:pos + prefix + length]


def is_ipc_file(data: bytes) -> bool:
    """Whether ``data`` is the IPC file format (else it is read as a stream)."""
    return data[:6] == _ARROW_MAGIC


def arrow_metadata(data: bytes) -> list[tuple[bytes, bytes]]:
    """The schema's metadata pairs of the Arrow IPC data ``data``: of an IPC file (`is_ipc_file`), both of its
    schemas (the stream's and the footer's)."""
    if not is_ipc_file(data):
        return _message_schema_metadata(_message_at(data, 0))
    if len(data) < 18 or data[-6:] != _ARROW_MAGIC:
        raise _malformed("IPC file footer")
    length = struct.unpack_from("<i", data, len(data) - 10)[0]
    if length <= 0 or length > len(data) - 18:
        raise _malformed("IPC file footer")
    footer = _Flatbuffer(data[len(data) - 10 - length:len(data) - 10])
    schema = footer.table(footer.root(), 1)  # File.fbs: Footer.schema is field 1
    if schema is None:
        raise _malformed("IPC file footer")
    return _schema_metadata(footer, schema) + _message_schema_metadata(_message_at(data, 8))


class _CompactThrift:
    """Enough of Thrift's compact protocol to find FileMetaData.key_value_metadata (field 5) in a parquet footer
    and skip everything else."""

    def __init__(self, buf: bytes):
        self.buf, self.pos = buf, 0

    def byte(self) -> int:
        if self.pos >= len(self.buf):
            raise _malformed("parquet footer")
        self.pos += 1
        return self.buf[self.pos - 1]

    def varint(self) -> int:
        value = 0
        for shift in range(0, 70, 7):
            b = self.byte()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
        raise _malformed("parquet footer")

    def binary(self) -> bytes:
        length = self.varint()
        if self.pos + length > len(self.buf):
            raise _malformed("parquet footer")
        self.pos += length
        return self.buf[self.pos - length:self.pos]

    def list_header(self) -> tuple[int, int]:
        head = self.byte()
        size = head >> 4
        return (self.varint() if size == 15 else size), head & 0x0F

    def fields(self):
        """(field id, type) of each field of a struct, up to its stop byte."""
        last = 0
        while True:
            head = self.byte()
            if head == 0:
                return
            delta, kind = head >> 4, head & 0x0F
            last = last + delta if delta else self._zigzag(self.varint())
            yield last, kind

    @staticmethod
    def _zigzag(n: int) -> int:
        return (n >> 1) ^ -(n & 1)

    def skip(self, kind: int, depth: int = 0, in_list: bool = False):
        if depth > 64:
            raise _malformed("parquet footer")
        if kind in (1, 2):  # a bool: in a struct its value is the type; in a list, a byte
            if in_list:
                self.byte()
        elif kind == 3:
            self.byte()
        elif kind in (4, 5, 6):
            self.varint()
        elif kind == 7:
            self.pos += 8
        elif kind == 8:
            self.binary()
        elif kind in (9, 10):
            size, element = self.list_header()
            for _ in range(size):
                self.skip(element, depth + 1, in_list=True)
        elif kind == 11:
            size = self.varint()
            types = self.byte() if size else 0
            for _ in range(size):
                self.skip(types >> 4, depth + 1, in_list=True)
                self.skip(types & 0x0F, depth + 1, in_list=True)
        elif kind == 12:
            for _, field_kind in self.fields():
                self.skip(field_kind, depth + 1)
        else:
            raise _malformed("parquet footer")
        if self.pos > len(self.buf):
            raise _malformed("parquet footer")

    def key_values(self) -> list[tuple[bytes, bytes]]:
        pairs = []
        for field_id, kind in self.fields():
            if field_id == 5 and kind == 9:
                size, element = self.list_header()
                if element != 12:
                    raise _malformed("parquet footer")
                for _ in range(size):
                    key = value = b""
                    for kv_id, kv_kind in self.fields():
                        if kv_id in (1, 2) and kv_kind == 8:
                            key, value = (self.binary(), value) if kv_id == 1 else (key, self.binary())
                        else:
                            self.skip(kv_kind, 1)
                    pairs.append((key, value))
            else:
                self.skip(kind)
        return pairs


def parquet_metadata(data: bytes) -> list[tuple[bytes, bytes]]:
    """The parquet footer's key/value metadata, and the metadata pairs of the Arrow schema it stores."""
    if len(data) < 12 or data[-4:] != _PARQUET_MAGIC:
        raise MalformedSchema("no PAR1 at its end (an encrypted footer is not read)")
    length = struct.unpack_from("<i", data, len(data) - 8)[0]
    if length <= 0 or length > len(data) - 12:
        raise _malformed("parquet footer")
    pairs = _CompactThrift(data[len(data) - 8 - length:len(data) - 8]).key_values()
    for key, encoded in list(pairs):
        if key == b"ARROW:schema":
            try:
                message = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise _malformed("parquet ARROW:schema") from None
            pairs += _message_schema_metadata(_message_at(message, 0))
    return pairs


def check_no_python_extension(pairs) -> None:
    """UnsafeSchema when any metadata value names the Python extension type (whose metadata is a pickle)."""
    if any(value == PYTHON_EXTENSION or (key.startswith(b"ARROW:extension") and PYTHON_EXTENSION in value)
           for key, value in pairs):
        raise UnsafeSchema("its schema declares a Python extension type (arrow.py_extension_type: a pickle "
                           "that pyarrow before 14.0.1 runs on reading): refused without reading it")


__all__ = ["MalformedSchema", "UnsafeSchema", "arrow_metadata", "check_no_python_extension", "is_ipc_file",
           "parquet_metadata"]
