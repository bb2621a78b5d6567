"""Human-readable results: markdown tables (terminal and files)."""
from vitquant.report.table import format_table

__all__ = ["format_table"]
