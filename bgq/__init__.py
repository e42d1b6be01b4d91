"""bgq: distributed background removal (rembg on Celery/Redis) with a content-addressed cache."""

__version__ = "0.1.0"
