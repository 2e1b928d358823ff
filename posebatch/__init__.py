"""posebatch: batch multi-person 21-keypoint pose estimation, locally or on a Celery cluster.

The Python API (README "Python"): ``from posebatch import Pose``. It loads the engine on first
use only, so ``import posebatch.<core module>`` stays free of the model runtime.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Failure", "Pose", "PoseResult", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Pose":
        from posebatch.api import Pose

        return Pose
    if name in ("PoseResult", "Failure"):
        from posebatch import schema

        return getattr(schema, name)
    raise AttributeError(f"module 'posebatch' has no attribute {name!r}")
