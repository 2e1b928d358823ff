"""posebatch: batch multi-person 21-keypoint pose estimation, locally or on a Celery cluster."""

__version__ = "0.1.0"
