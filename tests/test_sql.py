"""SQL by name (sql.py): the loader fails loudly, every query asked for is in its file, every
query in a file is asked for somewhere, and the statements that list every column of a record
list them in the order their parameters come."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from jobqueue import lifecycle, records, sql
from jobqueue.engines.postgres import schema

SRC = Path(__file__).parent.parent / "src" / "jobqueue"
# Each file's queries, and the modules that ask for them.
USERS = {
    "records.sql": (records.QUERIES, [SRC / "records.py"]),
    "engines/postgres": (schema.QUERIES, sorted((SRC / "engines" / "postgres").glob("*.py"))),
}


def test_a_file_is_read_into_its_named_queries_without_their_notes():
    queries = sql.parse("-- about the file\n\n-- first --\n-- what it is for\nSELECT 1\n\n"
                        "-- second_2 --\nSELECT 2\n-- a note kept in the query\nFROM t\n", "x")
    assert queries == {"first": "SELECT 1",
                       "second_2": "SELECT 2\n-- a note kept in the query\nFROM t"}


@pytest.mark.parametrize("text, problem", [
    ("-- one --\nSELECT 1\n-- one --\nSELECT 2\n", "two queries named 'one'"),
    ("-- one --\n-- only a note\n\n-- two --\nSELECT 2\n", "'one' is empty"),
    ("SELECT 0\n-- one --\nSELECT 1\n", "text before its first"),
])
def test_a_file_not_made_of_named_queries_fails_to_load(text, problem):
    with pytest.raises(ValueError, match=problem):
        sql.parse(text, "x.sql")


def test_a_name_no_file_has_fails_with_the_files_name():
    with pytest.raises(KeyError, match="no query named 'nope' in jobqueue/records.sql"):
        records.QUERIES["nope"]


def test_a_slot_needs_its_piece_and_a_piece_its_slot():
    assert sql.fill("SELECT '{}' WHERE a {filters} LIMIT 1", filters="AND b") == \
        "SELECT '{}' WHERE a AND b LIMIT 1"
    with pytest.raises(ValueError):
        sql.fill("SELECT 1 {filters}")
    with pytest.raises(ValueError):
        sql.fill("SELECT 1", filters="AND b")


@pytest.mark.parametrize("name", USERS)
def test_every_query_asked_for_is_in_its_file_and_every_one_there_is_used(name):
    queries, modules = USERS[name]
    code = "\n".join(module.read_text() for module in modules)
    asked = set(re.findall(r'QUERIES\["([a-z0-9_]+)"\]', code))
    assert asked - set(queries) == set()
    code += (SRC / "records.py").read_text()  # list_query fills either file's list_jobs
    unused = {query for query in queries if f'"{query}"' not in code}
    assert unused == set()


def test_a_records_insert_names_its_columns_in_the_order_of_its_parameters():
    columns = re.match(r"INSERT INTO \w+ \(([^)]*)\)", records.QUERIES["save_job"])[1]
    assert [column.strip() for column in columns.split(",")] == records.COLUMNS
    assert records.QUERIES["save_job"].count("?") == len(records.COLUMNS)


def test_the_distributed_insert_names_its_columns_in_the_order_of_its_parameters():
    """insert_queued: the procrastinate job's four parameters, the record's columns, then its
    procrastinate id (from the job it defers), then the notify payload."""
    query = schema.QUERIES["insert_queued"]
    columns = re.search(r"INSERT INTO \w+ \(([^)]*)\)", query)[1]
    assert [column.strip() for column in columns.split(",")] == \
        records.COLUMNS + ["procrastinate_id"]
    assert query.count("%s") == 4 + len(records.COLUMNS) + 1


@pytest.mark.parametrize("queries, name", [(records.QUERIES, "list_jobs"),
                                           (schema.QUERIES, "list_jobs"),
                                           (schema.QUERIES, "select_summaries")])
def test_a_summary_has_every_column_of_a_record(queries, name):
    selected = re.split(r"\bFROM\b", queries[name], maxsplit=1)[0]
    missing = [column for column in records.COLUMNS
               if not re.search(rf"(\b{column},|AS {column}\b|\b{column}\s*$)", selected)]
    assert missing == []


@pytest.mark.parametrize("name, allowed", [
    ("claim", lifecycle.CAN_CLAIM),
    ("claim_cancelled", lifecycle.ENDS_AT_CANCEL),
    ("finish", lifecycle.RUN_ENDS_FROM),
    ("set_progress", lifecycle.RUN_ENDS_FROM),
    ("release", lifecycle.RUN_ENDS_FROM),
    ("requeue_run", lifecycle.RUN_ENDS_FROM),
    ("end_run_cancelled", lifecycle.RUN_ENDS_FROM),
    ("retry_attempt", lifecycle.RUN_ENDS_FROM),
    ("retry_failed", lifecycle.CAN_RETRY),
    ("hand_over", lifecycle.CAN_HAND_OVER),
])
def test_the_distributed_transitions_leave_from_the_statuses_the_lifecycle_allows(name, allowed):
    """The lifecycle module owns which status each transition leaves from; the statements that
    write a transition in PostgreSQL guard their UPDATE with exactly those."""
    where = schema.QUERIES[name].split("WHERE", 1)[1]
    guard = re.search(r"\bstatus (?:= '(\w+)'|IN \(([^)]*)\))", where)
    assert guard, f"{name} has no status guard"
    found = {guard[1]} if guard[1] else {v.strip(" '") for v in guard[2].split(",")}
    assert found == {status.value for status in allowed}
