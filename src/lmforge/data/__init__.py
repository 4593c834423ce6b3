"""Reading, checking, splitting and batching examples."""
from .readers import Table, read_table, resolve_data_path

__all__ = ["Table", "read_table", "resolve_data_path"]
