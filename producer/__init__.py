"""bgq's producer: hash images, short-circuit on cached results, enqueue the rest."""

from producer.client import Job, Producer

__all__ = ["Job", "Producer"]
