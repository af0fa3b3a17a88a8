"""Radial and angular bases of DimeNet++ (Gasteiger et al. 2020), without sympy or scipy.

The functions are those of PyG's `torch_geometric.nn.models.dimenet` (itself a port of the
original DimeNet code, which OCP's DimeNet++ reuses):

* `Envelope`: the smooth cutoff u(d) = 1/d + a d^(p-1) + b d^p + c d^(p+1) (d in units of the
  cutoff, p = exponent + 1), zero beyond the cutoff.
* `BesselBasisLayer`: e_RBF,n(d) = u(d) sin(f_n d), with learnable frequencies f_n initialised
  to n pi (the only parameter of the bases: `rbf.freq`).
* `SphericalBasisLayer`: a_SBF,ln(d_kj, alpha) = u(d_kj) N_ln j_l(z_ln d_kj) Y_l0(alpha), with
  j_l the spherical Bessel functions, z_ln their n-th positive root,
  N_ln = sqrt(2) / |j_(l+1)(z_ln)| and Y_l0 = sqrt((2l+1)/(4 pi)) P_l(cos alpha).

Departure from PyG/OCP: they compute the angle as atan2(|v x w|, <v, w>) and evaluate Y_l0 as
trigonometric functions of that angle; here `SphericalBasisLayer` takes cos(alpha) directly and
evaluates the Legendre polynomials P_l by their recurrence. The values are the same, but the
gradient of atan2 (and of |v x w|) is undefined for collinear triplets (alpha = 0 or pi), whereas
cos(alpha) = <v, w> / (|v||w|) is smooth wherever both edges have non-zero length, so forces stay
finite for linear molecules and straight chains.

The roots z_ln are rounded to float32, as PyG and the original code store them, so that weights
trained there give the same outputs here.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "BesselBasisLayer",
    "Envelope",
    "SphericalBasisLayer",
    "legendre",
    "spherical_bessel",
    "spherical_bessel_roots",
]


class Envelope(nn.Module):
    """Polynomial envelope u(x) of DimeNet: 1/x + a x^(p-1) + b x^p + c x^(p+1) for x < 1, else 0
    (x = d / cutoff; p = exponent + 1). Its value and first two derivatives vanish at x = 1."""

    def __init__(self, exponent: int):
        super().__init__()
        self.p = exponent + 1
        self.a = -(self.p + 1) * (self.p + 2) / 2
        self.b = self.p * (self.p + 2)
        self.c = -self.p * (self.p + 1) / 2

    def forward(self, x: Tensor) -> Tensor:
        p, a, b, c = self.p, self.a, self.b, self.c
        x_pow_p0 = x.pow(p - 1)
        x_pow_p1 = x_pow_p0 * x
        x_pow_p2 = x_pow_p1 * x
        return (1.0 / x + a * x_pow_p0 + b * x_pow_p1 + c * x_pow_p2) * (x < 1.0).to(x.dtype)


class BesselBasisLayer(nn.Module):
    """Radial basis e_RBF(d) [E, num_radial] = u(d / cutoff) sin(freq * d / cutoff)."""

    def __init__(self, num_radial: int, cutoff: float = 5.0, envelope_exponent: int = 5):
        super().__init__()
        self.cutoff = cutoff
        self.envelope = Envelope(envelope_exponent)
        self.freq = nn.Parameter(torch.empty(num_radial))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            torch.arange(1, self.freq.numel() + 1, out=self.freq).mul_(math.pi)
        self.freq.requires_grad_()

    def forward(self, dist: Tensor) -> Tensor:
        dist = dist.unsqueeze(-1) / self.cutoff
        return self.envelope(dist) * (self.freq * dist).sin()


def spherical_bessel(x: Tensor, num_orders: int) -> Tensor:
    """j_0(x) .. j_(num_orders-1)(x), stacked on a new last axis, by upward recurrence
    j_(l+1) = (2l+1)/x j_l - j_(l-1) from j_0 = sin x / x, j_1 = sin x / x^2 - cos x / x.

    This is the closed form PyG/DimeNet evaluate (sympy's expansion of the same recurrence), with
    the same cancellation for x << l; x > 0 required."""
    sin, cos = x.sin(), x.cos()
    out = [sin / x]
    if num_orders > 1:
        out.append(sin / (x * x) - cos / x)
    for order in range(1, num_orders - 1):
        out.append((2 * order + 1) / x * out[order] - out[order - 1])
    return torch.stack(out, dim=-1)


def _spherical_bessel_np(x: np.ndarray, order: int) -> np.ndarray:
    return spherical_bessel(torch.as_tensor(x, dtype=torch.float64, device="cpu"), order + 1)[
        ..., order
    ].numpy()


def spherical_bessel_roots(num_orders: int, num_roots: int) -> np.ndarray:
    """z[l, n]: the n-th positive root of j_l, float64 [num_orders, num_roots].

    Roots of j_l interlace those of j_(l-1) (j_0's are n pi), so each lies in a bracket between
    consecutive roots of the previous order; 200 bisection steps reach float64 resolution."""
    width = num_roots + num_orders
    roots = np.arange(1, width, dtype=np.float64) * np.pi
    table = np.zeros((num_orders, num_roots))
    table[0] = roots[:num_roots]
    for order in range(1, num_orders):
        low, high = roots[:-1].copy(), roots[1:].copy()
        f_low = _spherical_bessel_np(low, order)
        for _ in range(200):
            mid = 0.5 * (low + high)
            f_mid = _spherical_bessel_np(mid, order)
            left = np.sign(f_mid) == np.sign(f_low)
            low = np.where(left, mid, low)
            f_low = np.where(left, f_mid, f_low)
            high = np.where(left, high, mid)
        roots = 0.5 * (low + high)
        table[order] = roots[:num_roots]
    return table


def legendre(x: Tensor, num_orders: int) -> Tensor:
    """P_0(x) .. P_(num_orders-1)(x) stacked on a new last axis (Bonnet's recurrence); x = cos."""
    out = [torch.ones_like(x)]
    if num_orders > 1:
        out.append(x)
    for order in range(1, num_orders - 1):
        out.append(((2 * order + 1) * x * out[order] - order * out[order - 1]) / (order + 1))
    return torch.stack(out, dim=-1)


class SphericalBasisLayer(nn.Module):
    """Angular basis a_SBF [T, num_spherical * num_radial] of the triplets k->j->i.

    forward(dist, cos_angle, idx_kj): `dist` [E] edge lengths, `cos_angle` [T] cosine of the angle
    between v_kj and v_ji, `idx_kj` [T] input edge of each triplet. Column l * num_radial + n holds
    u(d_kj) N_ln j_l(z_ln d_kj) Y_l0(alpha) (d in units of the cutoff), PyG's layout.
    Parameter-free: the roots and normalisers are non-persistent buffers, so state dicts match
    PyG's.
    """

    def __init__(
        self,
        num_spherical: int,
        num_radial: int,
        cutoff: float = 5.0,
        envelope_exponent: int = 5,
    ):
        super().__init__()
        self.num_spherical = num_spherical
        self.num_radial = num_radial
        self.cutoff = cutoff
        self.envelope = Envelope(envelope_exponent)

        roots = spherical_bessel_roots(num_spherical, num_radial).astype(np.float32)
        roots = roots.astype(np.float64)  # float32 values, as PyG/DimeNet store them
        next_order = np.stack(
            [_spherical_bessel_np(roots[order], order + 1) for order in range(num_spherical)]
        )
        normalizer = 1.0 / np.sqrt(0.5 * next_order**2)
        prefactor = np.sqrt((2 * np.arange(num_spherical) + 1) / (4 * np.pi))
        self.register_buffer("roots", torch.as_tensor(roots), persistent=False)
        self.register_buffer("normalizer", torch.as_tensor(normalizer), persistent=False)
        self.register_buffer("prefactor", torch.as_tensor(prefactor), persistent=False)

    def forward(self, dist: Tensor, cos_angle: Tensor, idx_kj: Tensor) -> Tensor:
        return self.angular(self.radial(dist), cos_angle, idx_kj)

    def radial(self, dist: Tensor) -> Tensor:
        """The radial part of every edge, u(d) N_ln j_l(z_ln d): [E, num_spherical, num_radial]."""
        n = self.num_spherical
        dist = dist / self.cutoff
        roots = self.roots.to(dist.dtype)
        # j_l(z_ln d) for every (l, n), order by order (the recurrence for j_l costs l steps).
        bessel = torch.stack(
            [
                spherical_bessel(dist[:, None] * roots[order], order + 1)[..., order]
                for order in range(n)
            ],
            dim=1,
        )  # [E, n, k]
        return self.envelope(dist)[:, None, None] * self.normalizer.to(dist.dtype) * bessel

    def angular(self, radial: Tensor, cos_angle: Tensor, idx_kj: Tensor) -> Tensor:
        """a_SBF of the triplets [T, num_spherical * num_radial] from the edges' `radial` parts
        [E, num_spherical, num_radial] (`radial`), the triplets' `cos_angle` [T] and input edges
        `idx_kj` [T]."""
        n, k = self.num_spherical, self.num_radial
        cbf = self.prefactor.to(radial.dtype) * legendre(cos_angle, n)  # [T, n]
        return (radial[idx_kj] * cbf[:, :, None]).reshape(-1, n * k)
