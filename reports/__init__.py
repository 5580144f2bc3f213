"""Statistics that SQL cannot express, and rendering (Markdown + PNG). Reads through `store`."""

from reports.render import write_report

__all__ = ["write_report"]
