"""SQL by name: the statements the package sends live in `.sql` files beside the modules that
send them, each under a header line `-- name_of_query --` (the way procrastinate keeps its
`sql/queries.sql`). The `--` lines right under a header say what the query is for and are not
sent; the query is everything after them, up to the next header. A file may begin with `--`
lines about itself.

Each file is read once, when its module is imported (`load`). A name given twice, an empty
query or text before the first header fails the import; a name no file has fails where it is
asked for, with the file's name in the error. A query that needs a piece decided per call (the
filters of a page of jobs) has a slot `{piece}` in its text, filled by `fill`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from importlib import resources

HEADER = re.compile(r"^-- ([a-z0-9_]+) --\n(?:--.*\n)*", re.MULTILINE)
SLOT = re.compile(r"\{([a-z_]+)\}")


class Queries(Mapping[str, str]):
    """The queries of one or more files, by name."""

    def __init__(self, queries: dict[str, str], source: str):
        self._queries = queries
        self.source = source

    def __getitem__(self, name: str) -> str:
        try:
            return self._queries[name]
        except KeyError:
            raise KeyError(f"no query named {name!r} in {self.source}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._queries)

    def __len__(self) -> int:
        return len(self._queries)


def parse(text: str, source: str) -> dict[str, str]:
    """The named queries of a file's text; ValueError for a file not made of them."""
    preamble, *parts = HEADER.split(text)
    if any(line.strip() and not line.startswith("--") for line in preamble.splitlines()):
        raise ValueError(f"{source}: text before its first '-- name --' header")
    queries: dict[str, str] = {}
    for name, query in zip(parts[::2], parts[1::2], strict=True):
        if name in queries:
            raise ValueError(f"{source}: two queries named {name!r}")
        if not query.strip():
            raise ValueError(f"{source}: the query {name!r} is empty")
        queries[name] = query.strip()
    return queries


def load(package: str, *filenames: str) -> Queries:
    """The queries of these files of `package`, by name (a name in two of them fails too)."""
    queries: dict[str, str] = {}
    sources = []
    for filename in filenames:
        source = f"{package.replace('.', '/')}/{filename}"
        sources.append(source)
        text = resources.files(package).joinpath(filename).read_text(encoding="utf-8")
        for name, query in parse(text, source).items():
            if name in queries:
                raise ValueError(f"{source}: a query named {name!r} is in an earlier file too")
            queries[name] = query
    return Queries(queries, " and ".join(sources))


def fill(query: str, **pieces: str) -> str:
    """The query with each `{slot}` replaced by its piece; every slot needs one, and every
    piece a slot."""
    slots = set(SLOT.findall(query))
    if slots != pieces.keys():
        raise ValueError(f"the query's slots are {sorted(slots)}, the pieces {sorted(pieces)}")
    return SLOT.sub(lambda match: pieces[match[1]], query)
