"""Radial and circular bases of GemNet-T (Gasteiger, Becker, Guennemann 2021), as in fairchem.

* `PolynomialEnvelope`: u(x) = 1 + a x^p + b x^(p+1) + c x^(p+2) for x = d / cutoff < 1, else 0,
  with a = -(p+1)(p+2)/2, b = p(p+2), c = -p(p+1)/2. (DimeNet's envelope in
  `graphpar.models.basis` is a different polynomial: it has a 1/x term.)
* `GaussianRBF`: exp(coeff (x - mu_k)^2) with K centres mu_k = linspace(0, 1, K) computed in
  float32 (PyG's GaussianSmearing, which fairchem reuses) and coeff = -0.5 / (mu_1 - mu_0)^2
  from those float32 centres, so that outputs match fairchem's to the last bit.
* `RadialBasis`: u(d / cutoff) * rbf(d / cutoff), [E, K].
* `CircularBasis`: the radial part of the edge c->a, [E, K], and the real spherical harmonics
  Y_l0(cos phi_cab) = sqrt((2l + 1) / (4 pi)) P_l(cos phi_cab), [T, L], kept separate
  ("efficient" mode of fairchem's CircularBasisLayer).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from graphpar.models.basis import legendre

__all__ = ["CircularBasis", "GaussianRBF", "PolynomialEnvelope", "RadialBasis", "real_sph_harm_l0"]


class PolynomialEnvelope(nn.Module):
    """u(x) = 1 + a x^p + b x^(p+1) + c x^(p+2) on x < 1, zero beyond; u(0) = 1 and u, u', u''
    vanish at x = 1."""

    def __init__(self, exponent: int = 5):
        super().__init__()
        if exponent <= 0:
            raise ValueError("exponent must be positive")
        p = exponent
        self.p = p
        self.a = -(p + 1) * (p + 2) / 2
        self.b = p * (p + 2)
        self.c = -p * (p + 1) / 2

    def forward(self, x: Tensor) -> Tensor:
        value = 1 + self.a * x**self.p + self.b * x ** (self.p + 1) + self.c * x ** (self.p + 2)
        return torch.where(x < 1, value, torch.zeros_like(x))


class GaussianRBF(nn.Module):
    """exp(coeff (x - offset_k)^2), offsets linspace(0, 1, K) in float32 (a buffer, `offset`)."""

    def __init__(self, num_radial: int):
        super().__init__()
        offset = torch.linspace(0.0, 1.0, num_radial, dtype=torch.float32, device="cpu")
        self.coeff = -0.5 / float(offset[1] - offset[0]) ** 2
        self.register_buffer("offset", offset.to(torch.get_default_dtype()))

    def forward(self, x: Tensor) -> Tensor:
        return torch.exp(self.coeff * (x.unsqueeze(-1) - self.offset) ** 2)


class RadialBasis(nn.Module):
    """e_RBF(d) = u(d / cutoff) rbf(d / cutoff), [E, num_radial]."""

    def __init__(self, num_radial: int, cutoff: float, envelope_exponent: int = 5):
        super().__init__()
        self.inv_cutoff = 1.0 / cutoff
        self.envelope = PolynomialEnvelope(envelope_exponent)
        self.rbf = GaussianRBF(num_radial)

    def forward(self, dist: Tensor) -> Tensor:
        x = dist * self.inv_cutoff
        return self.envelope(x).unsqueeze(-1) * self.rbf(x)


def real_sph_harm_l0(cos_angle: Tensor, num_spherical: int) -> Tensor:
    """Y_l0(cos) = sqrt((2l + 1) / (4 pi)) P_l(cos) for l < num_spherical, [T, num_spherical]."""
    norm = torch.tensor(
        [math.sqrt((2 * l + 1) / (4 * math.pi)) for l in range(num_spherical)],  # noqa: E741
        dtype=cos_angle.dtype,
        device=cos_angle.device,
    )
    return legendre(cos_angle, num_spherical) * norm


class CircularBasis(nn.Module):
    """Triplet basis, kept factorised: (radial part of each edge c->a [E, num_radial],
    Y_l0(cos phi_cab) of each triplet [T, num_spherical])."""

    def __init__(self, num_spherical: int, num_radial: int, cutoff: float, envelope_exponent=5):
        super().__init__()
        self.num_spherical = num_spherical
        self.radial_basis = RadialBasis(num_radial, cutoff, envelope_exponent)

    def forward(self, dist: Tensor, cos_angle: Tensor) -> tuple[Tensor, Tensor]:
        return self.radial_basis(dist), real_sph_harm_l0(cos_angle, self.num_spherical)
