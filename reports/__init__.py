"""Statistics that SQL cannot express, tables and rendering (Markdown + PNG). Reads through `store`.
Import the modules themselves (`reports.render` loads matplotlib; `reports.tables` does not)."""
