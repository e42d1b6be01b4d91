"""bgq's producer: hash images, short-circuit on cached results, enqueue the rest."""

from producer.client import Producer
from producer.job import Job

__all__ = ["Job", "Producer"]
