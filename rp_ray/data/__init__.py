"""Role-play datasets: the registry, robust reading, sharegpt validation and the data report."""

from rp_ray.data.conversation import DROP_REASONS, Conversation, Dropped, Message, to_conversation
from rp_ray.data.reader import DataFileError, RawRow, read_rows
from rp_ray.data.registry import DatasetAttr, RegistryError, load_registry, resolve
from rp_ray.data.report import DataQualityError, DataReport, DatasetReport, check_drop_ratio, load_splits

__all__ = [
    "DROP_REASONS",
    "Conversation",
    "DataFileError",
    "DataQualityError",
    "DataReport",
    "DatasetAttr",
    "DatasetReport",
    "Dropped",
    "Message",
    "RawRow",
    "RegistryError",
    "check_drop_ratio",
    "load_registry",
    "load_splits",
    "read_rows",
    "resolve",
    "to_conversation",
]
