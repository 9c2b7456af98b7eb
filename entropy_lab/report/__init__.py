"""Reports: run directories in, tables, figures, ``report.md`` and JSON out (no torch needed).

- ``compose``: the run report and the comparison report (``run_report``, ``compare_report``).
- ``entries``: the registered analyses, each a table, a figure and a section (``register_report_entry``).
- ``load``: reading run directories.
- ``markdown``, ``json_tables``: the two output formats.
"""

from entropy_lab.report.compose import compare_report, run_report
from entropy_lab.report.entries import REPORT_ENTRIES, ReportEntry, register_report_entry, trace_tables
from entropy_lab.report.json_tables import report_json

__all__ = [
    "REPORT_ENTRIES",
    "ReportEntry",
    "compare_report",
    "register_report_entry",
    "report_json",
    "run_report",
    "trace_tables",
]
