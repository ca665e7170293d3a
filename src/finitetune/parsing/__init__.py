"""Reading text nobody vouched for: nesting bounded, control characters kept off the terminal.

Logs, data files, run directories and settings come from users, crashed writers and issue
threads. Two things in them can hurt the reader rather than the report: a document nested so
deep that a recursive parser (Python's ``json``, PyYAML's composer) dies with
``RecursionError`` (:mod:`.nesting` refuses it first, with the file and line), and escape
sequences that would drive the terminal the report is printed on (:mod:`.terminal` strips
them). Pure Python; imports nothing else of finitetune but its errors.
"""

from finitetune.parsing.nesting import MAX_NESTING, check_json, check_yaml, json_loads
from finitetune.parsing.terminal import printable

__all__ = ["MAX_NESTING", "check_json", "check_yaml", "json_loads", "printable"]
