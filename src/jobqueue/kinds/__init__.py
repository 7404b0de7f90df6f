"""Which job kinds a process serves: `JOBQUEUE_KINDS` (or `--kinds`), loaded by name.

Each name in the comma-separated list is one of:
- a built-in kind: `message`, `pdf2image`, `video` (the modules of this package);
- an entry point in the group `jobqueue.kinds` of an installed package (its value names a
  `JobKind`, or a module whose `KIND` is one);
- an import path, `package.module:ATTRIBUTE`, or `package.module` for its `KIND`.

Nothing here is imported before the list is read: a kind's module (and what it imports) loads
only in a process that serves it.
"""

from __future__ import annotations

import importlib
import re
from importlib.metadata import entry_points
from types import ModuleType

from jobqueue.errors import CannotStart
from jobqueue.jobs import JobKind
from jobqueue.settings import PREFIX, Settings, kind_variables

BUILT_IN = {
    "message": "jobqueue.kinds.message",
    "pdf2image": "jobqueue.kinds.pdf2image",
    "video": "jobqueue.kinds.video",
}
DEFAULT_KINDS = ",".join(BUILT_IN)
ENTRY_POINT_GROUP = "jobqueue.kinds"
# A kind's name is its jobType, a label in the metrics and part of its settings' names
# (JOBQUEUE_<NAME>_WORKERS): lower-case letters, digits and underscores.
NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")


def load_kinds(names: str) -> dict[str, JobKind]:
    """The kinds of a comma-separated list, by name (their jobType), in its order."""
    kinds: dict[str, JobKind] = {}
    for entry in (part.strip() for part in names.split(",")):
        if not entry:
            continue
        kind = load_kind(entry)
        if kind.name in kinds and kinds[kind.name] is not kind:
            raise CannotStart(f"JOBQUEUE_KINDS: two kinds are named {kind.name!r} "
                              f"(the second from {entry!r}); a jobType names one kind")
        kinds[kind.name] = kind
    if not kinds:
        raise CannotStart("JOBQUEUE_KINDS names no kind: list at least one, e.g. "
                          f"{DEFAULT_KINDS}")
    return kinds


def kind_names(names: str) -> list[str]:
    """The names of a JOBQUEUE_KINDS list's kinds, as far as this process can load them (a
    worker may lack the packages of kinds it does not run): for the typo guard only."""
    found = []
    for entry in (part.strip() for part in names.split(",")):
        if entry:
            try:
                found.append(load_kind(entry).name)
            except CannotStart:
                found.append(re.split(r"[.:]", entry)[-1].lower())
    return found


def load_kind(entry: str) -> JobKind:
    """One `JOBQUEUE_KINDS` entry's kind: a built-in, an entry point, or an import path."""
    if entry in BUILT_IN:
        found: object = _import(BUILT_IN[entry], entry)
    elif ":" not in entry and (point := _entry_point(entry)) is not None:
        try:
            found = point.load()
        except Exception as error:
            raise CannotStart(f"JOBQUEUE_KINDS: the kind {entry!r} (entry point "
                              f"{point.value!r} of group {ENTRY_POINT_GROUP}) failed to "
                              f"import: {type(error).__name__}: {error}") from error
    elif ":" in entry or "." in entry:
        module_name, _, attribute = entry.partition(":")
        module = _import(module_name, entry)
        found = module
        if attribute:
            for part in attribute.split("."):
                if not hasattr(found, part):
                    raise CannotStart(f"JOBQUEUE_KINDS: {module_name} has no {attribute!r} "
                                      f"(from {entry!r})")
                found = getattr(found, part)
    else:
        installed = sorted(point.name for point in entry_points(group=ENTRY_POINT_GROUP))
        raise CannotStart(
            f"JOBQUEUE_KINDS: unknown kind {entry!r}. A kind is a built-in "
            f"({', '.join(BUILT_IN)}), an entry point of group {ENTRY_POINT_GROUP} (installed: "
            f"{', '.join(installed) or 'none'}) or an import path such as mypackage.kinds:KIND")
    if isinstance(found, ModuleType):
        if not isinstance(getattr(found, "KIND", None), JobKind):
            raise CannotStart(f"JOBQUEUE_KINDS: the module {found.__name__} (from {entry!r}) "
                              "has no KIND; name the attribute: module:ATTRIBUTE")
        found = found.KIND
    if not isinstance(found, JobKind):
        raise CannotStart(f"JOBQUEUE_KINDS: {entry!r} is a {type(found).__name__}, not a "
                          "jobqueue.JobKind")
    if not NAME.fullmatch(found.name):
        raise CannotStart(f"JOBQUEUE_KINDS: the kind from {entry!r} is named {found.name!r}; a "
                          "kind's name is 1 to 40 lower-case letters, digits and underscores, "
                          "starting with a letter")
    # A kind named `header` would share JOBQUEUE_HEADER_TIMEOUT with the server's setting.
    taken = [variable for variable in kind_variables(found.name).values()
             if variable.removeprefix(PREFIX).lower() in Settings.model_fields]
    if taken:
        raise CannotStart(f"JOBQUEUE_KINDS: the kind from {entry!r} is named {found.name!r}, "
                          f"whose limit {taken[0]} is a setting of the server's own; rename it")
    return found


def _import(module_name: str, entry: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except Exception as error:  # its own ImportError, or whatever the module raised
        raise CannotStart(f"JOBQUEUE_KINDS: the kind {entry!r} failed to import "
                          f"{module_name}: {type(error).__name__}: {error}") from error


def _entry_point(name: str):  # noqa: ANN202 - importlib.metadata.EntryPoint
    for point in entry_points(group=ENTRY_POINT_GROUP, name=name):
        return point
    return None
