from dlrm_mtl.data.batch import Batch
from dlrm_mtl.data.stream import ParquetStream, RowGroup, assign_row_groups, list_row_groups

__all__ = ["Batch", "ParquetStream", "RowGroup", "assign_row_groups", "list_row_groups"]
