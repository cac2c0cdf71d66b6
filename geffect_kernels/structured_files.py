"""JSON, JSON Lines and YAML read from files the program does not trust (data sets, settings, run folders, model
folders): whatever a file holds, the reader returns plain values or raises `UnreadableFile`, one line naming the
file. Not a regular file (a FIFO would block, ``/dev/zero`` never ends), not UTF-8, not valid JSON or YAML, and
nesting deeper than `MAX_DEPTH` (which made the parsers raise RecursionError) are all that one line."""
from __future__ import annotations

import functools
import json
import os
import stat

MAX_DEPTH = 100  # the files read here nest a few levels; deeper input is refused before anything walks it
YAML_MAX_BYTES = 1 << 20  # a settings file is a few hundred bytes
YAML_MAX_NODES = 10_000  # values after aliases are expanded: an alias bomb is refused before it is built


class UnreadableFile(ValueError):
    """A file that is not what it should be; the message is one line, ``SOURCE: REASON``."""

    def __init__(self, source, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source, self.reason = source, reason


def _first_line(err) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def read_bytes(path, limit: int | None = None) -> bytes:
    """The bytes of the regular file ``path`` (at most ``limit + 1`` of them when ``limit`` is given, so a caller
    can tell a file larger than ``limit``). Opened without blocking, so a FIFO is refused rather than waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise UnreadableFile(path, "no such file") from None
    except OSError as err:
        raise UnreadableFile(path, f"cannot be opened ({err.strerror or _first_line(err)})") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UnreadableFile(path, f"{_kind(mode)}, not a regular file: refused")
        try:
            return f.read() if limit is None else f.read(limit + 1)
        except OSError as err:
            raise UnreadableFile(path, f"cannot be read ({err.strerror or _first_line(err)})") from None


def decode_utf8(data: bytes, source) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UnreadableFile(source, f"not UTF-8 text (byte {err.start}: {err.reason})") from None


def read_text(path) -> str:
    """The UTF-8 text of the regular file ``path`` (a leading byte-order mark dropped)."""
    return decode_utf8(read_bytes(path), path)


def check_depth(value, source, limit: int = MAX_DEPTH):
    """``value`` when its lists and dicts nest at most ``limit`` deep; UnreadableFile otherwise. Iterative, so
    it cannot itself run out of stack."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth >= limit:
                    raise UnreadableFile(source, f"nested more than {limit} levels deep: refused")
                stack.append((child, depth + 1))
    return value


def parse_json(text: str, source):
    """``text`` parsed as one JSON document; UnreadableFile naming ``source`` (the file, or ``FILE line N``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise UnreadableFile(source, f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") \
            from None
    except RecursionError:
        raise UnreadableFile(source, f"nested more than {MAX_DEPTH} levels deep: refused") from None
    return check_depth(value, source)


def read_json(path):
    """The JSON value in the regular file ``path``; UnreadableFile naming it otherwise."""
    return parse_json(read_text(path), path)


def parse_jsonl_line(line: str, path, number: int):
    """Line ``number`` (1-based) of the JSON Lines file ``path``, parsed."""
    return parse_json(line, f"{path} line {number}")


def read_yaml(path) -> dict:
    """A YAML mapping of settings; UnreadableFile naming the file when it is unreadable, not a mapping, larger
    than `YAML_MAX_BYTES`, nested deeper than `MAX_DEPTH`, or would expand (through aliases) into more than
    `YAML_MAX_NODES` values."""
    import yaml

    data = read_bytes(path, YAML_MAX_BYTES)
    if len(data) > YAML_MAX_BYTES:
        raise UnreadableFile(path, f"larger than {YAML_MAX_BYTES} bytes: not a settings file")
    try:
        loader = _bounded_loader()(data.decode("utf-8"))
        try:
            values = loader.get_single_data() or {}
        finally:
            loader.dispose()
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        raise UnreadableFile(path, f"cannot read the YAML config ({_first_line(err)})") from None
    except RecursionError:
        raise UnreadableFile(path, f"nested more than {MAX_DEPTH} levels deep: refused") from None
    except _TooLarge:
        raise UnreadableFile(path, f"expands to more than {YAML_MAX_NODES} values (aliases): refused") from None
    if not isinstance(values, dict):
        raise UnreadableFile(path, "the YAML config must be a mapping of settings")
    return check_depth(values, path)


class _TooLarge(Exception):
    pass


@functools.lru_cache(maxsize=1)
def _bounded_loader():
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        """`yaml.SafeLoader` that counts the nodes of the document with every alias expanded, from the composed
        graph (before any Python object is built), and stops past `YAML_MAX_NODES`."""

        def compose_document(self):
            node = super().compose_document()
            sizes = {}

            def size(n):  # memoized: a node reached through many aliases is counted each time, computed once
                if sizes.get(id(n), 0) < 0:
                    raise _TooLarge  # a recursive alias: infinitely many values
                if id(n) not in sizes:
                    sizes[id(n)] = -1
                    children = (n.value if isinstance(n, yaml.SequenceNode) else
                                [x for pair in n.value for x in pair] if isinstance(n, yaml.MappingNode) else [])
                    sizes[id(n)] = 1 + sum(min(size(c), YAML_MAX_NODES + 1) for c in children)
                if sizes[id(n)] > YAML_MAX_NODES:
                    raise _TooLarge
                return sizes[id(n)]

            if node is not None:
                size(node)
            return node

    return BoundedLoader


__all__ = ["MAX_DEPTH", "UnreadableFile", "check_depth", "decode_utf8", "parse_json", "parse_jsonl_line",
           "read_bytes", "read_json", "read_text", "read_yaml"]
