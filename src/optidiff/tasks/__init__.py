"""Problems: data, objectives and metrics (DESIGN.md §4). ``toy2d``: seeded 2-D data sets."""

from . import toy2d

__all__ = ["toy2d"]
