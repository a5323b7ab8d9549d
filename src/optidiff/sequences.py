"""Categorical sequences as continuous vectors: Design-Bench's relaxation (Trabucco et al., ICML
2022, ``DiscreteDataset.to_logits``, used by DDOM), shared by the sequence tasks and the offline
optimizers. A token t of C classes becomes ``p = s·onehot(t) + (1 − s)/C`` and the C − 1 logits
``log p[1:] − log p[0]``; decoding prepends a zero logit and takes the argmax.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["NUM_CLASSES", "SOFT_INTERPOLATION", "to_integers", "to_logits"]

#: DNA (TFBind8) and Design-Bench's default soft interpolation
NUM_CLASSES = 4
SOFT_INTERPOLATION = 0.6


def to_logits(x: Tensor, soft_interpolation: float = SOFT_INTERPOLATION,
              num_classes: int = NUM_CLASSES) -> Tensor:
    """Design-Bench ``to_logits``: integers (N, L) → logits (N, L, C−1), float32 (C =
    ``num_classes``).

    ``p = s·onehot + (1 − s)/C``, logits ``log p[..., 1:] − log p[..., :1]``.
    """
    x = torch.as_tensor(x).long()
    if not 0 < soft_interpolation <= 1:
        raise ValueError(f"soft_interpolation must be in (0, 1], got {soft_interpolation}")
    onehot = torch.nn.functional.one_hot(x, num_classes).to(torch.float64)
    p = soft_interpolation * onehot + (1 - soft_interpolation) / num_classes
    logp = p.log()
    return (logp[..., 1:] - logp[..., :1]).to(torch.float32)


def to_integers(logits: Tensor, num_classes: int = NUM_CLASSES) -> Tensor:
    """Design-Bench ``to_integers``: logits (N, L, C−1) or flattened (N, L·(C−1)) → integers (N, L):
    argmax after prepending a zero logit for class 0 (C = ``num_classes``)."""
    logits = torch.as_tensor(logits)
    c1 = num_classes - 1
    if logits.ndim == 2:
        if logits.shape[1] % c1:
            raise ValueError(f"flattened logits need a multiple of {c1} columns, got "
                             f"{logits.shape[1]}")
        logits = logits.reshape(len(logits), -1, c1)
    if logits.ndim != 3 or logits.shape[-1] != c1:
        raise ValueError(f"logits must have shape (N, L, {c1}) or (N, L*{c1}), got "
                         f"{tuple(logits.shape)}")
    padded = torch.nn.functional.pad(logits, (1, 0))
    return padded.argmax(-1)
