"""Decomposition math on plain tensors: truncated, whitened and Tucker-2 factorizations.

Every function here computes one decomposition per weight, in float64 where the device
supports it, and returns factors from which *any* rank is a slice. That is what lets a
search build a model for a new rank map without recomputing an SVD.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "MatrixFactors",
    "TuckerFactors",
    "compute_dtype",
    "matrix_factors",
    "symmetric_sqrt",
    "tucker2_factors",
    "whitening_route",
]


def compute_dtype(device: torch.device) -> torch.dtype:
    """float64 wherever the backend has it (MPS does not), else float32."""
    return torch.float32 if device.type == "mps" else torch.float64


@dataclass(frozen=True)
class MatrixFactors:
    """``W ≈ left[:, :k] @ right[:k]`` for every k, with singular values in decreasing order.

    ``left`` is ``(out, R)`` and ``right`` is ``(R, in)``; ``singular_values`` are those of
    ``W S`` for the whitened method (their squares are each component's share of the
    layer's output error) and of ``W`` for the plain method.
    """

    left: torch.Tensor
    right: torch.Tensor
    singular_values: torch.Tensor

    @property
    def full_rank(self) -> int:
        return int(self.singular_values.numel())

    def truncate(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rank-``rank`` factors: a slice, never a recomputation."""
        return self.left[:, :rank], self.right[:rank]


@dataclass(frozen=True)
class TuckerFactors:
    """Tucker-2 of a conv kernel ``(out, in, kh, kw)`` along its two channel modes.

    ``out_basis`` is ``(out, out)``, ``in_basis`` is ``(in, in)`` and ``core`` is
    ``(out, in, kh, kw)`` expressed in those bases, each ordered by decreasing mode
    singular value, so ranks ``(r_in, r_out)`` are the leading slices (truncated HOSVD).
    """

    out_basis: torch.Tensor
    in_basis: torch.Tensor
    core: torch.Tensor
    out_singular_values: torch.Tensor
    in_singular_values: torch.Tensor

    def truncate(self, rank_in: int, rank_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(in_basis[:, :r_in], core[:r_out, :r_in], out_basis[:, :r_out])``."""
        return (self.in_basis[:, :rank_in], self.core[:rank_out, :rank_in],
                self.out_basis[:, :rank_out])


def symmetric_sqrt(gram: torch.Tensor, *, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(S, S⁻¹)`` with ``S Sᵀ = gram`` after clamping eigenvalues at ``ridge·mean``.

    The eigendecomposition route never fails on rank-deficient statistics (dead ReLU units,
    fewer samples than features), where Cholesky would.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    mean = float(eigenvalues.clamp_min(0).mean())
    # All-zero statistics (every input unit dead) carry no information: fall back to an
    # orthonormal root, i.e. plain SVD, instead of dividing by a denormal floor.
    floor = ridge * mean if mean > 0 else 1.0
    eigenvalues = eigenvalues.clamp_min(floor)
    root = eigenvalues.sqrt()
    return eigenvectors * root, (eigenvectors / root).T


Route = Literal["auto", "input", "output"]


def whitening_route(out_features: int, in_features: int) -> str:
    """The cheaper exact route: ``"output"`` (an out × out eigenproblem) for wide layers, else ``"input"``."""
    return "output" if out_features < in_features else "input"


def matrix_factors(weight: torch.Tensor, *, gram: torch.Tensor | None = None,
                   ridge: float = 1e-6, dtype: torch.dtype | None = None,
                   route: Route = "auto") -> MatrixFactors:
    """Factor ``weight`` (out × in) by plain SVD, or by whitened SVD when ``gram`` is given.

    With ``gram = Σ x xᵀ`` over calibration inputs, ``[W S]_k S⁻¹`` is the exact rank-k
    minimizer of ``‖W X − W' X‖_F`` (Eckart–Young on the whitened weight). Two routes give
    that optimum (algorithms.md §1): ``"input"`` takes a square root ``S`` of the in × in
    gram, ``"output"`` the eigenvectors of the out × out ``W gram Wᵀ`` (AFM), which is far
    cheaper when a layer has fewer outputs than inputs (a 3×3 conv with 512 channels has
    4608 inputs). ``"auto"`` picks the cheaper one. The singular values are split evenly
    between both factors so neither is badly scaled.
    """
    work = compute_dtype(weight.device)
    w = weight.detach().to(work)
    out_dtype = dtype or weight.dtype
    if gram is not None:
        gram = gram.to(device=w.device, dtype=work)
        if route == "auto":
            route = whitening_route(*w.shape)  # type: ignore[assignment]
        if route == "output" and float(gram.diagonal().sum()) > 0:
            return _output_side(w, gram, ridge=ridge, dtype=out_dtype)
    if gram is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        right = vh
    else:
        root, inverse_root = symmetric_sqrt(gram, ridge=ridge)
        u, s, vh = torch.linalg.svd(w @ root, full_matrices=False)
        right = vh @ inverse_root
    half = s.sqrt()
    return MatrixFactors(left=(u * half).to(out_dtype), right=(half[:, None] * right).to(out_dtype),
                         singular_values=s)


def _output_side(w: torch.Tensor, gram: torch.Tensor, *, ridge: float, dtype: torch.dtype) -> MatrixFactors:
    """Whitened factors from the eigenvectors ``U`` of ``W C Wᵀ``: ``[W S]_k S⁻¹ = U_k U_kᵀ W``.

    ``C`` gets ``ridge·mean eigenvalue`` on its diagonal, the same floor the input route puts
    under its eigenvalues, so both routes solve the same problem to O(ridge); no inverse is
    ever taken. Components with (near-)zero energy keep unit scale instead of dividing by ~0.
    """
    n = gram.shape[0]
    regularized = gram + (ridge * float(gram.diagonal().sum()) / n) * torch.eye(n, dtype=w.dtype, device=w.device)
    output_gram = w @ regularized @ w.T
    eigenvalues, u = torch.linalg.eigh((output_gram + output_gram.T) / 2)
    eigenvalues, u = eigenvalues.flip(0), u.flip(1)
    s = eigenvalues.clamp_min(0).sqrt()
    scale = s.clamp_min(float(s[0]) * torch.finfo(w.dtype).eps if s[0] > 0 else 1.0).sqrt()
    return MatrixFactors(left=(u * scale).to(dtype), right=((u.T @ w) / scale[:, None]).to(dtype),
                         singular_values=s)


def tucker2_factors(weight: torch.Tensor, *, dtype: torch.dtype | None = None) -> TuckerFactors:
    """Truncated HOSVD of a conv kernel along its output and input channel modes."""
    work = compute_dtype(weight.device)
    w = weight.detach().to(work)
    out_channels, in_channels = w.shape[:2]
    out_basis, out_s, _ = torch.linalg.svd(w.reshape(out_channels, -1), full_matrices=False)
    in_unfold = w.transpose(0, 1).reshape(in_channels, -1)
    in_basis, in_s, _ = torch.linalg.svd(in_unfold, full_matrices=False)
    out_basis = _complete_basis(out_basis)
    in_basis = _complete_basis(in_basis)
    core = torch.einsum("oikl,op,iq->pqkl", w, out_basis, in_basis)
    out_dtype = dtype or weight.dtype
    return TuckerFactors(out_basis=out_basis.to(out_dtype), in_basis=in_basis.to(out_dtype),
                         core=core.to(out_dtype), out_singular_values=out_s,
                         in_singular_values=in_s)


def _complete_basis(basis: torch.Tensor) -> torch.Tensor:
    """Extend ``(n, k)`` orthonormal columns to a square orthonormal ``(n, n)`` basis.

    A mode unfolding can have fewer columns than rows (a 1×1 conv with more outputs than
    inputs); full-rank equivalence needs the complete basis.
    """
    n, k = basis.shape
    if k == n:
        return basis
    projector = torch.eye(n, dtype=basis.dtype, device=basis.device) - basis @ basis.T
    extra, _, _ = torch.linalg.svd(projector, full_matrices=False)
    return torch.cat([basis, extra[:, : n - k]], dim=1)
