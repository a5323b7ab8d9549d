"""A user's own model, data and objective, plugged into ``optidiff train`` and ``optidiff
optimize`` by import string (``examples/custom_train.toml``, ``examples/custom_optimize.toml``).

Nothing here is part of optidiff: it is what a user writes. Run from the repository root::

    optidiff train examples/custom_train.toml --run-dir runs/custom-train
    optidiff optimize examples/custom_optimize.toml

The configs name ``custom.model:RingNet``, ``custom.data:ring``, ``custom.task:RingTask`` and
``custom.objective:height``; optidiff imports them with the config's directory (``examples/``)
on the module path.
"""
