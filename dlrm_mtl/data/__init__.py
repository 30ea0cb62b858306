from dlrm_mtl.data.batch import Batch
from dlrm_mtl.data.errors import DataError
from dlrm_mtl.data.source import SourceError, open_source, resolve_files
from dlrm_mtl.data.stream import ParquetStream, RowGroup, Segment, assign_row_groups, list_row_groups

__all__ = ["DataError", "SourceError", "open_source", "resolve_files", "Batch", "ParquetStream", "RowGroup", "Segment", "assign_row_groups", "list_row_groups"]
