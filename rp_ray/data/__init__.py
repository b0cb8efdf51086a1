"""Role-play datasets: the registry, robust reading, sharegpt validation and the data report."""

from rp_ray.data.conversation import Conversation, Dropped, Message, to_conversation
from rp_ray.data.reader import DataFileError, read_rows
from rp_ray.data.registry import RegistryError, load_registry, resolve
from rp_ray.data.report import DataQualityError, check_drop_ratio, load_splits

__all__ = [
    "Conversation",
    "DataFileError",
    "DataQualityError",
    "Dropped",
    "Message",
    "RegistryError",
    "check_drop_ratio",
    "load_registry",
    "load_splits",
    "read_rows",
    "resolve",
    "to_conversation",
]
