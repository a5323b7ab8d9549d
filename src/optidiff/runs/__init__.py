"""One driver per ``optidiff`` command; :mod:`optidiff.cli` is only the command-line layer.

- :func:`~optidiff.runs.train.train_command` (``optidiff train``),
  :func:`~optidiff.runs.sample.sample_command` (``optidiff sample``),
  :func:`~optidiff.runs.optimize.optimize_command` and
  :func:`~optidiff.runs.offline.offline_command` (``optidiff optimize``),
  :func:`~optidiff.runs.demo.demo` and :func:`~optidiff.runs.demo.demo_samplers`;
- :class:`~optidiff.runs.rundir.RunDir`: run directories that are safe to repeat into, and
  :class:`~optidiff.runs.rundir.RunError`, a failure the user can fix.
"""

from .rundir import RunDir, RunError

__all__ = ["RunDir", "RunError"]
