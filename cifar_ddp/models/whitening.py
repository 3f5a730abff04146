"""airbench's frozen patch-whitening stem: a 2x2 conv (no padding, so 32x32 becomes 31x31)
whose filters whiten the training images' 2x2x3 patches, followed by GELU.

Its 12 filters are the eigenvectors of the patches' covariance, each divided by
sqrt(eigenvalue + eps), so the 12 outputs are uncorrelated with unit variance (PCA
whitening: the network starts from decorrelated pixels instead of learning to undo the
strong correlation of neighbouring pixels and channels). Each filter comes twice, as +v
and -v: after the GELU the pair keeps both signs of every component (with one copy, the
negative half of each would be squashed). The bias centres the patches (-W @ mean), so
the outputs have zero mean too. Weights and bias are parameters that are never trained
(requires_grad off: no gradient, not in the optimizer, left out of the EMA's and the
lookahead's blends; saved in every checkpoint like any weight, and counted in the model's
parameters).

`fit` sets them from the patch statistics of the training split (assembly.fit_whitening_stem
streams them in chunks through `PatchMoments`); until then the stem whitens as if the
patches were white already (filters = ± unit vectors), so an unfitted network still runs.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

# airbench's: below the data's smallest eigenvalue it only keeps noise directions finite.
WHITENING_EPS = 5e-4


class PatchWhitening(nn.Module):
    def __init__(self, in_channels: int = 3, patch: int = 2, eps: float = WHITENING_EPS) -> None:
        super().__init__()
        self.patch, self.eps = patch, eps
        self.dim = in_channels * patch * patch
        self.conv = nn.Conv2d(in_channels, 2 * self.dim, patch, padding=0, bias=True)
        self.conv.requires_grad_(False)
        self.act = nn.GELU()
        with torch.no_grad():
            self._set(torch.eye(self.dim, dtype=torch.float64), torch.zeros(self.dim, dtype=torch.float64))

    @property
    def out_channels(self) -> int:
        return 2 * self.dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))

    @torch.no_grad()
    def fit(self, mean: torch.Tensor, covariance: torch.Tensor) -> None:
        """Whiten patches of this mean and covariance (float64, over the flattened (channel,
        row, column) patch, as `PatchMoments` returns them)."""
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
        order = eigenvalues.argsort(descending=True)   # strongest direction first, as airbench
        filters = eigenvectors[:, order].T / torch.sqrt(eigenvalues[order] + self.eps)[:, None]
        self._set(filters, mean.double())

    def _set(self, filters: torch.Tensor, mean: torch.Tensor) -> None:
        """filters: (dim, dim), one whitening filter a row; the conv gets +filters then -filters."""
        both = torch.cat([filters, -filters])
        self.conv.weight.copy_(both.reshape(self.conv.weight.shape))
        self.conv.bias.copy_(-(both @ mean))


class PatchMoments:
    """The mean and covariance of every patch x patch window (stride 1, no padding) of the
    images added, summed in float64 chunk by chunk, so the whole training split never has to
    be unfolded at once."""

    def __init__(self, patch: int = 2) -> None:
        self.patch = patch
        self.count = 0
        self.sum: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None

    def add(self, images: torch.Tensor) -> None:
        """images: normalised (N, C, H, W), as the network sees them."""
        # (N, C*p*p, L) in (channel, row, column) order; unfolding copies, so float32 is exact.
        patches = F.unfold(images.float(), self.patch).double()
        # Summed in float64: the smallest eigenvalues of normalised images' patch covariance
        # are ~1e-4 of the largest, below float32's rounding of sums this long.
        total, outer = patches.sum((0, 2)), (patches @ patches.transpose(1, 2)).sum(0)
        self.sum = total if self.sum is None else self.sum + total
        self.outer = outer if self.outer is None else self.outer + outer
        self.count += patches.shape[0] * patches.shape[2]

    def result(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if not self.count:
            raise ValueError("PatchMoments: no images were added")
        mean = self.sum / self.count
        return mean, self.outer / self.count - torch.outer(mean, mean)


def whitening_stems(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, PatchWhitening)]


__all__ = ["PatchMoments", "PatchWhitening", "WHITENING_EPS", "whitening_stems"]
