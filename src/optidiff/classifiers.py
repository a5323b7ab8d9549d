"""Deprecated alias of :mod:`optidiff.models.classifiers` (kept for one release)."""

import warnings

from .models.classifiers import NoiseConditionalClassifier, train_classifier

warnings.warn("optidiff.classifiers moved to optidiff.models.classifiers (also exported from "
              "optidiff.models); this alias will be removed in the next release",
              DeprecationWarning, stacklevel=2)

__all__ = ["NoiseConditionalClassifier", "train_classifier"]
