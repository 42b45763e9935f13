"""Dataset sources in their native formats. Each returns a :class:`DatasetDescription`."""
from mixnn_fast.data.description import DatasetDescription

__all__ = ["DatasetDescription"]
