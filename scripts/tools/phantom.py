# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Procedural hepatobiliary-phase (HBP, Gd-EOB-DTPA) liver MRI phantoms with label maps.

The anatomy is described by implicit functions (signed distances, in mm) in RAS+ world
coordinates (NIfTI convention: +x points to the patient's Right, +y Anterior, +z Superior, so
the liver lies at positive x).  A voxel grid with a random spacing, a small oblique rotation and
a random axis orientation code is laid over that world, and every structure is evaluated at the
world positions of the voxel centres.  The anatomy therefore does not depend on how the array is
stored, only the sampling does.  Vessel trees are lists of tapered line segments grown inside
the liver and rasterised by point-to-segment distance, each within its own bounding box.

Partial volume is modelled by turning signed distances into voxel occupancies
(``0.5 - sdf / voxel_size`` clipped to [0, 1]) and alpha-blending tissues in painting order.
Labels are the occupancy >= 0.5 sets, written liver -> vessels -> HCC, so HCC wins over vessels
and vessels win over liver.

Label ids: 0 background, 1 liver parenchyma, 2 portal vein, 3 hepatic vein, 4 HCC.
"""

from __future__ import annotations

import difflib
import inspect
import itertools
import json
import math
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from monai.data.utils import affine_to_spacing

from scripts.core.errors import BundleInputError
from scripts.core.outputs import staged_output
from scripts.data.labels import LABELS

DEFAULT_SPACING_RANGE = ((2.0, 3.0), (2.0, 3.0), (2.5, 4.0))
DEFAULT_FOV_MM = (320.0, 320.0, 240.0)
DEFAULT_ORIENTATIONS = ("RAS", "LPS", "LAS", "RPI", "PSR")

# (world axis, sign) of the direction each axis code letter points to, in RAS+ world.
_AXIS_CODE = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}
# Fixed spawn key for the train/val/test split stream, distinct from the per-case keys (i,).
_SPLIT_SPAWN_KEY = (0x53504C54,)
# Craniocaudal placement of the abdominal organs (mm) so the default FOV shows the lung bases
# above the liver dome and the kidneys below it.
_Z0 = -15.0

Array = np.ndarray
Coords = tuple[Array, Array, Array]


@dataclass
class PhantomCase:
    """One generated case.

    Attributes:
        image: float32 3D HBP-like magnitude image (liver parenchyma ~1.0 before bias/noise).
        label: uint8 3D label map, same shape (ids in :data:`LABELS`).
        affine: 4x4 float64 NIfTI voxel-to-world (RAS+ mm) affine.
        info: JSON-serialisable metadata (seed, spacing, axcodes, lesions, ...).
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# small geometric helpers (all vectorised over arbitrary broadcastable arrays)
# --------------------------------------------------------------------------------------------


def _rotation_matrix(axis: Sequence[float], angle_rad: float) -> Array:
    """Rodrigues rotation matrix about ``axis`` (any length) by ``angle_rad``."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / max(float(np.linalg.norm(a)), 1e-12)
    k = np.array([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]])
    return np.eye(3) + math.sin(angle_rad) * k + (1.0 - math.cos(angle_rad)) * (k @ k)


def _unit(v: Sequence[float]) -> Array:
    v = np.asarray(v, dtype=np.float64)
    return v / max(float(np.linalg.norm(v)), 1e-12)


def _where(cond: Array, a: float, b: float, like: Array) -> Array:
    """``np.where`` for two scalars that keeps the dtype of ``like`` (float32 voxel arrays)."""
    t = np.asarray(like).dtype.type
    return np.where(cond, t(a), t(b))


def _smin(a: Array, b: Array, k: float) -> Array:
    """Polynomial smooth minimum (blends two signed distances into one rounded union)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _smax(a: Array, b: Array, k: float) -> Array:
    """Smooth maximum (rounded intersection)."""
    return -_smin(-a, -b, k)


def _ellipse2d_sdf(u: Array, v: Array, a: Array | float, b: Array | float) -> Array:
    """Approximate signed distance to an axis-aligned ellipse (exact on the boundary).

    Uses ``k0 (k0 - 1) / k1`` which is far cheaper than the exact quartic and accurate near the
    surface, which is the only place where partial volume needs it.
    """
    ua, vb = u / a, v / b
    k0 = np.sqrt(ua * ua + vb * vb)
    k1 = np.sqrt((ua / a) ** 2 + (vb / b) ** 2)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


@dataclass
class _Ellipsoid:
    """Rotated ellipsoid with optional taper of the y/z radii along its local x axis."""

    centre: Array
    radii: Array
    rot: Array = field(default_factory=lambda: np.eye(3))
    taper: float = 0.0

    def sdf(self, x: Array, y: Array, z: Array) -> Array:
        c, r, m = self.centre, self.radii, self.rot
        dx, dy, dz = x - float(c[0]), y - float(c[1]), z - float(c[2])
        # local coordinates q = R^T (p - c)
        qx = float(m[0, 0]) * dx + float(m[1, 0]) * dy + float(m[2, 0]) * dz
        qy = float(m[0, 1]) * dx + float(m[1, 1]) * dy + float(m[2, 1]) * dz
        qz = float(m[0, 2]) * dx + float(m[1, 2]) * dy + float(m[2, 2]) * dz
        rx, ry, rz = float(r[0]), float(r[1]), float(r[2])
        if self.taper:
            s = np.clip(1.0 + self.taper * qx / rx, 0.25, 2.0)
            ry, rz = ry * s, rz * s
        ux, uy, uz = qx / rx, qy / ry, qz / rz
        k0 = np.sqrt(ux * ux + uy * uy + uz * uz)
        k1 = np.sqrt((ux / rx) ** 2 + (uy / ry) ** 2 + (uz / rz) ** 2)
        return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)

    def bounds(self, margin: float = 0.0) -> tuple[Array, Array]:
        # exact half-extents of the rotated ellipsoid, widened by the worst-case taper
        ext = np.sqrt(((self.rot * self.radii[None, :]) ** 2).sum(axis=1)) * (1.0 + abs(self.taper)) + margin
        return self.centre - ext, self.centre + ext


def _segment_distance(x: Array, y: Array, z: Array, p0: Array, p1: Array) -> tuple[Array, Array]:
    """Distance from points to segment p0-p1 and the clamped segment parameter t in [0, 1]."""
    vx, vy, vz = (float(v) for v in (p1 - p0))
    ax, ay, az = x - float(p0[0]), y - float(p0[1]), z - float(p0[2])
    l2 = max(vx * vx + vy * vy + vz * vz, 1e-12)
    t = np.clip((ax * vx + ay * vy + az * vz) * (1.0 / l2), 0.0, 1.0)
    ex, ey, ez = ax - t * vx, ay - t * vy, az - t * vz
    return np.sqrt(ex * ex + ey * ey + ez * ez), t


@dataclass
class _Fourier:
    """Random smooth scalar field: a sum of plane waves with unit overall standard deviation."""

    k: Array  # (K, 3) wave vectors, rad/mm (or rad/unit for direction-space fields)
    phase: Array  # (K,)
    amp: Array  # (K,)

    def __call__(self, x: Array, y: Array, z: Array) -> Array:
        out = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z)), dtype=np.result_type(x, np.float32))
        for (kx, ky, kz), ph, a in zip(self.k.tolist(), self.phase.tolist(), self.amp.tolist(), strict=True):
            out += a * np.sin(kx * x + ky * y + kz * z + ph)
        return out


def _make_fourier(rng: np.random.Generator, n_terms: int, wl_min: float, wl_max: float) -> _Fourier:
    """Plane-wave sum with log-uniform wavelengths; longer waves get more amplitude (smoothness)."""
    dirs = rng.standard_normal((n_terms, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    wl = np.exp(rng.uniform(math.log(wl_min), math.log(wl_max), n_terms))
    amp = wl / wl_max
    amp = amp / math.sqrt(float(np.sum(amp**2)) / 2.0)
    return _Fourier(k=dirs * (2.0 * math.pi / wl)[:, None], phase=rng.uniform(0, 2 * math.pi, n_terms), amp=amp)


def _occupancy(sdf: Array, h: float) -> Array:
    """Partial-volume fraction of a voxel of size ``h`` mm centred at signed distance ``sdf``."""
    return np.clip(0.5 - sdf * (1.0 / h), 0.0, 1.0).astype(np.float32, copy=False)


def _blend(img: Array, value: Array | float, frac: Array) -> None:
    """In place ``img = img * (1 - frac) + value * frac``."""
    img += frac * (value - img)


# --------------------------------------------------------------------------------------------
# voxel grid
# --------------------------------------------------------------------------------------------


@dataclass
class _Grid:
    """Voxel grid with a NIfTI affine; gives world coordinates of (sub-blocks of) voxel centres."""

    affine: Array
    shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        self._inv = np.linalg.inv(self.affine)
        self.voxel_mm = float(np.mean(affine_to_spacing(self.affine, r=3, suppress_zeros=False)))

    @property
    def full(self) -> tuple[slice, slice, slice]:
        return tuple(slice(0, n) for n in self.shape)  # type: ignore[return-value]

    def coords(self, sl: tuple[slice, slice, slice] | None = None) -> Coords:
        """World (x, y, z) float32 arrays of the voxel centres in block ``sl``."""
        sl = sl or self.full
        idx = [np.arange(s.start, s.stop, dtype=np.float64) for s in sl]
        out = []
        for r in range(3):
            a = self.affine[r]
            t0 = (a[3] + a[0] * idx[0]).astype(np.float32)[:, None, None]
            t1 = (a[1] * idx[1]).astype(np.float32)[None, :, None]
            t2 = (a[2] * idx[2]).astype(np.float32)[None, None, :]
            out.append(t0 + t1 + t2)
        return out[0], out[1], out[2]

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[slice, slice, slice] | None:
        """Voxel block covering the world axis-aligned box [lo, hi] (None if it misses the grid)."""
        corners = np.array(list(itertools.product(*zip(lo, hi, strict=True))), dtype=np.float64)
        vox = corners @ self._inv[:3, :3].T + self._inv[:3, 3]
        vmin = np.clip(np.floor(vox.min(axis=0)).astype(int), 0, self.shape)
        vmax = np.clip(np.ceil(vox.max(axis=0)).astype(int) + 1, 0, self.shape)
        if np.any(vmax <= vmin):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(vmin, vmax, strict=True))  # type: ignore[return-value]

    def coarse_field(self, fn: Callable[[Array, Array, Array], Array], cell_mm: float) -> Array:
        """Evaluate a smooth world function on a coarse lattice and upsample it (trilinear).

        Smooth textures and the bias field do not need per-voxel evaluation; this keeps them
        cheap while staying tied to world coordinates.
        """
        spacing = affine_to_spacing(self.affine, r=3, suppress_zeros=False)
        factors = [max(1, int(round(cell_mm / s))) for s in spacing]
        sizes = [int(math.ceil((n - 1) / f)) + 2 for n, f in zip(self.shape, factors, strict=True)]
        idx = [np.arange(m, dtype=np.float64) * f for m, f in zip(sizes, factors, strict=True)]
        pts = [
            (
                self.affine[r, 3]
                + self.affine[r, 0] * idx[0][:, None, None]
                + self.affine[r, 1] * idx[1][None, :, None]
                + self.affine[r, 2] * idx[2][None, None, :]
            ).astype(np.float32)
            for r in range(3)
        ]
        out = np.asarray(fn(*pts), dtype=np.float32)
        # separable linear upsampling; the last axis first keeps the big gathers contiguous
        for ax in (2, 1, 0):
            n, f = self.shape[ax], factors[ax]
            t = np.arange(n, dtype=np.float64) / f
            j = np.floor(t).astype(np.intp)
            w = (t - j).astype(np.float32)
            shp = [1, 1, 1]
            shp[ax] = n
            lo_v = np.take(out, j, axis=ax)
            out = lo_v + (np.take(out, j + 1, axis=ax) - lo_v) * w.reshape(shp)
        return out


def _make_grid(
    rng: np.random.Generator,
    spacing_range: Sequence[Sequence[float]],
    fov_mm: Sequence[float],
    orientations: Sequence[str],
    max_rotation_deg: float,
    shape: Sequence[int] | None,
) -> tuple[_Grid, dict]:
    """Draw spacing, axis code and oblique rotation and build the stored voxel grid.

    ``spacing_range``, ``fov_mm`` and ``shape`` are given in RAS axis order (LR, AP, SI); the
    stored array axes are their permutation given by the drawn axis code.
    """
    fov = np.asarray(fov_mm, dtype=np.float64)
    if shape is not None:
        shape_ras = np.asarray([int(s) for s in shape])
        spacing_ras = fov / shape_ras
        rng.uniform(size=3)  # keep the stream aligned with the spacing-drawing branch
    else:
        lo = np.array([float(r[0]) for r in spacing_range])
        hi = np.array([float(r[1]) for r in spacing_range])
        spacing_ras = np.round(rng.uniform(lo, hi), 3)
        shape_ras = np.maximum(np.round(fov / spacing_ras).astype(int), 4)
    code = str(orientations[int(rng.integers(len(orientations)))]).upper()
    axes = [_AXIS_CODE[c] for c in code]
    perm = np.zeros((3, 3))
    for i, (w, sgn) in enumerate(axes):
        perm[w, i] = sgn
    spacing = np.array([spacing_ras[w] for w, _ in axes])
    arr_shape = tuple(int(shape_ras[w]) for w, _ in axes)
    angle = math.radians(float(rng.uniform(0.0, max_rotation_deg)))
    axis = _unit(rng.standard_normal(3))
    centre = rng.uniform(-10.0, 10.0, 3)  # table position: field-of-view centre in world mm
    lin = _rotation_matrix(axis, angle) @ perm @ np.diag(spacing)
    affine = np.eye(4)
    affine[:3, :3] = lin
    affine[:3, 3] = centre - lin @ ((np.asarray(arr_shape) - 1) / 2.0)
    meta = {
        "axcodes": code,
        "spacing": [float(s) for s in spacing],
        "spacing_ras": [float(s) for s in spacing_ras],
        "shape": list(arr_shape),
        "shape_ras": [int(s) for s in shape_ras],
        "rotation_deg": math.degrees(angle),
        "rotation_axis": [float(a) for a in axis],
        "fov_centre_mm": [float(c) for c in centre],
    }
    return _Grid(affine=affine, shape=arr_shape), meta


# --------------------------------------------------------------------------------------------
# anatomy
# --------------------------------------------------------------------------------------------


@dataclass
class _Segments:
    """Tapered tubes (capsules) of a vessel tree, world mm."""

    p0: Array
    p1: Array
    r0: Array
    r1: Array

    @staticmethod
    def from_list(items: list[tuple[Array, Array, float, float]]) -> "_Segments":
        if not items:
            z = np.zeros((0, 3))
            return _Segments(z, z.copy(), np.zeros(0), np.zeros(0))
        p0, p1, r0, r1 = zip(*items, strict=True)
        return _Segments(np.array(p0), np.array(p1), np.array(r0), np.array(r1))

    def __len__(self) -> int:
        return len(self.r0)


@dataclass
class _Lesion:
    centre: Array
    radius: float
    lobulation: _Fourier
    lob_amp: float
    texture: _Fourier
    value: float
    rim: float  # relative intensity of a 2 mm capsule-like rim (1 = no rim)


def _rand_rot(rng: np.random.Generator, max_deg: float) -> Array:
    return _rotation_matrix(rng.standard_normal(3), math.radians(float(rng.uniform(0, max_deg))))


def _rot_z(deg: float) -> Array:
    return _rotation_matrix((0, 0, 1), math.radians(deg))


class _Anatomy:
    """Randomly drawn patient anatomy: implicit surfaces, vessel trees, lesions and intensities."""

    def __init__(self, rng: np.random.Generator, max_hcc: int, hcc_diameter_mm: tuple[float, float]) -> None:
        u = rng.uniform
        # --- intensities relative to enhanced liver parenchyma (= 1.0) in the HBP
        self.val = {
            "liver": 1.0,
            "fat": u(0.22, 0.32),  # fat-suppressed 3D T1 GRE, the usual HBP acquisition
            "muscle": u(0.3, 0.4),
            "bowel": u(0.3, 0.45),
            "lung": u(0.02, 0.05),
            "myocardium": u(0.33, 0.42),
            "blood": u(0.18, 0.28),
            "spleen": u(0.5, 0.6),
            "kidney": u(0.47, 0.56),
            "stomach_wall": u(0.4, 0.5),
            "stomach_lumen": u(0.08, 0.2),
            "pancreas": u(0.55, 0.68),
            "marrow": u(0.42, 0.5),
            "rib_marrow": u(0.55, 0.7),
            "cortex": u(0.1, 0.16),
            "disc": u(0.26, 0.34),
            "csf": u(0.06, 0.12),
            "aorta": u(0.15, 0.25),
            "ivc": u(0.18, 0.28),
            "portal_vein": u(0.25, 0.35),
            "hepatic_vein": u(0.25, 0.35),
            "gallbladder": u(0.08, 0.22),
        }
        self._sample_body(rng)
        self._sample_liver(rng)
        self._sample_organs(rng)
        self._sample_vessels(rng)
        self._sample_lesions(rng, max_hcc, hcc_diameter_mm)
        # numpy float64 scalars would promote the float32 voxel arrays to float64 (NEP 50)
        for key, value in vars(self).items():
            if isinstance(value, np.floating):
                setattr(self, key, float(value))
        self.fat_coef = tuple(float(c) for c in self.fat_coef)

    # ---------------------------------------------------------------- body wall and cavities
    def _sample_body(self, rng: np.random.Generator) -> None:
        u = rng.uniform
        self.body_a = u(132.0, 152.0)  # LR half width
        self.body_b_ant = u(95.0, 118.0)
        self.body_b_post = u(108.0, 120.0)
        self.body_taper = u(-0.06, 0.06)  # width change per 120 mm in z
        self.body_waist = u(0.0, 0.08)  # narrower towards both ends of the FOV
        self.fat_t = u(8.0, 24.0)
        self.fat_coef = np.array([u(0.0, 0.8), u(-0.3, 0.4), u(0.0, 0.8), u(-0.3, 0.3)])
        self.muscle_t = u(7.0, 12.0)
        self.rectus_gain = u(0.8, 1.6)
        self.skin_noise = _make_fourier(rng, 6, 90.0, 250.0)
        self.skin_noise_amp = u(2.0, 6.0)
        self.fat_noise = _make_fourier(rng, 6, 60.0, 200.0)
        self.rib_period = u(26.0, 34.0)
        self.rib_phase = u(0.0, self.rib_period)
        self.rib_drop = u(90.0, 140.0)  # a rib descends this much from its back to its front
        self.spine_y = -self.body_b_post + u(80.0, 92.0)  # vertebral body centre (AP)
        self.spine_r = np.array([u(19.0, 24.0), u(15.0, 19.0)])
        self.spine_curve = u(-6.0, 6.0)
        self.disc_period = u(30.0, 36.0)
        self.disc_phase = u(0.0, self.disc_period)

    def body_sdf(
        self, x: Array, y: Array, z: Array, skin_n: Array | None = None, fat_n: Array | None = None
    ) -> tuple[Array, Array, Array]:
        """Signed distances to the skin, to the fat/muscle interface and to the inner cavity.

        ``skin_n``/``fat_n`` may carry the two wall noise fields already evaluated at the points
        (the full grid uses cheap coarse-lattice versions).
        """
        skin_n = self.skin_noise(x, y, z) if skin_n is None else skin_n
        fat_n = self.fat_noise(x, y, z) if fat_n is None else fat_n
        zs = z * (1.0 / 120.0)
        shape = 1.0 + self.body_taper * zs - self.body_waist * zs * zs
        a = self.body_a * shape
        b = _where(y >= 0, self.body_b_ant, self.body_b_post, y) * (1.0 + 0.5 * (shape - 1.0))
        skin = _ellipse2d_sdf(x, y, a, b) + self.skin_noise_amp * skin_n
        un, vn = x / a, y / b
        c = self.fat_coef
        post = np.clip(-vn, 0.0, 1.0)
        t_fat = self.fat_t * np.clip(
            1.0 + c[0] * un * un + c[1] * vn + c[2] * post * post + c[3] * un * vn + 0.2 * fat_n, 0.3, None
        )
        # paired rectus muscles anteriorly with the thin linea alba between them
        rectus = np.clip(vn, 0.0, 1.0) ** 2 * np.exp(-(((np.abs(x) - 38.0) * (1.0 / 26.0)) ** 2))
        t_mus = self.muscle_t * (1.0 + self.rectus_gain * rectus + 0.4 * un * un)
        return skin, skin + t_fat, skin + t_fat + t_mus

    def rib_sdf(self, x: Array, y: Array, z: Array, cavity: Array) -> Array:
        """Ribs: slanted hoops at the inner edge of the wall, absent near the anterior midline."""
        b = _where(y >= 0, self.body_b_ant, self.body_b_post, y)
        un, vn = x / self.body_a, y / b
        radial = np.abs(cavity + 1.5) - 4.0
        ph = np.abs(np.mod(z + 0.5 * self.rib_drop * vn - self.rib_phase, self.rib_period) - 0.5 * self.rib_period)
        axial = (0.5 * self.rib_period - ph) - 5.0
        low = (self.dome_r_z - 150.0 + 60.0 * vn) - z  # costal margin rises anteriorly
        gap = np.where(vn > 0.4, 25.0 * (0.35 - np.abs(un)), y.dtype.type(-1e3))
        return np.maximum(np.maximum(radial, axial), np.maximum(low, gap))

    def diaphragm_z(self, x: Array, y: Array) -> Array:
        """Height of the diaphragm: two domes (right higher) dropping into the posterior recesses."""
        rd = self.dome_r_z - ((x - self.dome_r_x) ** 2 + 0.6 * (y - self.dome_y) ** 2) * (0.5 / self.dome_rho)
        ld = self.dome_l_z - ((x - self.dome_l_x) ** 2 + 0.6 * (y - self.dome_y) ** 2) * (0.5 / self.dome_rho)
        return _smax(rd, ld, 20.0) - 0.45 * np.clip(self.spine_y + 25.0 - y, 0.0, None)

    # ---------------------------------------------------------------- liver
    def _sample_liver(self, rng: np.random.Generator) -> None:
        u = rng.uniform
        s = u(0.88, 1.12)
        off = np.array([u(-8, 8), u(-8, 8), u(-10, 10)])
        self.liver_scale = s
        y0 = self.spine_y + 30.0  # the liver wraps around the front of the spine and IVC
        c_r = np.array([58.0, y0 - 6.0, 18.0 + _Z0]) + off
        r_r = np.array([62.0 * u(0.9, 1.1), 78.0 * u(0.92, 1.08), 74.0 * u(0.9, 1.1)]) * s
        # long axis turned so the posterior segments lie lateral to the spine, the anterior ones medial
        right = _Ellipsoid(c_r, r_r, _rand_rot(rng, 10.0) @ _rot_z(u(12, 30)))
        c_l = np.array([-12.0 + u(-10, 10), y0 + 40.0 + u(-8, 8), 40.0 + _Z0 + u(-8, 8)]) + off * 0.5
        r_l = np.array([72.0 * u(0.8, 1.15), 40.0 * u(0.85, 1.15), 34.0 * u(0.85, 1.15)]) * s
        left = _Ellipsoid(
            c_l, r_l, _rotation_matrix((0, 1, 0), math.radians(u(-15, 5))) @ _rot_z(u(-25, -5)), taper=u(0.35, 0.6)
        )
        c_c = np.array([6.0, y0 + 16.0, 30.0 + _Z0]) + off * 0.5
        caudate = _Ellipsoid(c_c, np.array([20.0, 16.0, 30.0]) * s * u(0.85, 1.15), _rand_rot(rng, 15.0))
        self.lobes = [right, left, caudate]
        self.lobe_blend = u(14.0, 24.0)
        self.liver_noise = _make_fourier(rng, 8, 45.0, 140.0)
        self.liver_noise_amp = u(4.0, 9.0)
        self.liver_texture = _make_fourier(rng, 6, 10.0, 40.0)
        # diaphragm domes follow the top of the right lobe
        top = c_r[2] + r_r[2] * 0.97
        self.dome_r_x, self.dome_y = c_r[0] - u(0, 15), c_r[1] + u(-10, 10)
        self.dome_r_z = top
        self.dome_l_x, self.dome_l_z = -60.0 + u(-10, 10), top - u(5.0, 22.0)
        self.dome_rho = u(120.0, 170.0)
        lo = np.min([lb.bounds()[0] for lb in self.lobes], axis=0) - 12.0
        hi = np.max([lb.bounds()[1] for lb in self.lobes], axis=0) + 12.0
        self.liver_box = (lo, hi)

    def liver_implicit(
        self, x: Array, y: Array, z: Array, cavity: Array | None = None, zd: Array | None = None
    ) -> Array:
        """Liver envelope before carving of IVC/gallbladder (used to grow vessels and place HCC).

        ``cavity`` and ``zd`` may carry the body-cavity distance and diaphragm height at the
        points when they are already known.
        """
        zd = self.diaphragm_z(x, y) if zd is None else zd
        cavity = self.body_sdf(x, y, z)[2] if cavity is None else cavity
        d = self.lobes[0].sdf(x, y, z)
        for lobe in self.lobes[1:]:
            d = _smin(d, lobe.sdf(x, y, z), self.lobe_blend)
        d = d + self.liver_noise_amp * self.liver_noise(x, y, z)
        d = _smax(d, z - zd + 4.0, 8.0)
        return np.maximum(d, cavity + 3.0)

    def liver_sdf(self, x: Array, y: Array, z: Array, cavity: Array | None = None, zd: Array | None = None) -> Array:
        """Liver parenchyma region: envelope minus IVC and gallbladder fossa."""
        d = np.maximum(self.liver_implicit(x, y, z, cavity, zd), -self.ivc_sdf(x, y, z) + 1.0)
        # rounded gaps to the spine (crus, fat), aorta and the renal impression of the right kidney
        d = _smax(d, -self.spine_sdf(x, y, z) + 10.0, 8.0)
        d = np.maximum(d, -self.aorta_sdf(x, y, z) + 4.0)
        d = _smax(d, -self.kidneys[0].sdf(x, y, z) + 3.0, 4.0)
        if self.gallbladder is not None:
            d = np.maximum(d, -self.gallbladder.sdf(x, y, z) + 1.5)
        return d

    # ---------------------------------------------------------------- other organs
    def _sample_organs(self, rng: np.random.Generator) -> None:
        u = rng.uniform
        sy = self.spine_y
        self.aorta_xy = np.array([u(-22, -12), sy + self.spine_r[1] + u(10, 14)])
        self.aorta_r = u(9.0, 12.5)
        self.ivc_xy = np.array([u(16, 26), sy + self.spine_r[1] + u(14, 22)])
        self.ivc_r = np.array([u(11, 15), u(8, 11)])
        self.spleen = _Ellipsoid(
            np.array([u(-100, -88), sy + u(-5, 20), _Z0 + u(20, 45)]),
            np.array([u(24, 32), u(48, 62), u(45, 60)]),
            _rot_z(u(-45, -25)) @ _rand_rot(rng, 10.0),
        )
        self.spleen_noise = _make_fourier(rng, 5, 30.0, 90.0)
        kz = _Z0 + u(-55, -40)
        self.kidneys = []
        for side, dz in ((1.0, -u(8, 18)), (-1.0, 0.0)):
            c = np.array([side * u(62, 75), sy + u(-12, 4), kz + dz])
            rot = _rotation_matrix((0, 1, 0), math.radians(side * u(8, 18))) @ _rot_z(side * u(20, 35))
            self.kidneys.append(_Ellipsoid(c, np.array([u(24, 29), u(27, 33), u(50, 60)]), rot))
        self.stomach = _Ellipsoid(
            np.array([u(-70, -50), u(10, 35), _Z0 + u(25, 45)]),
            np.array([u(35, 48), u(30, 40), u(45, 60)]),
            _rand_rot(rng, 25.0),
        )
        self.pancreas_pts = np.array(
            [
                [u(20, 32), u(0, 15), u(-35, -20)],
                [u(-10, 5), u(5, 15), u(-22, -10)],
                [u(-75, -60), sy + u(25, 40), u(-8, 8)],
            ]
        ) + np.array([0.0, 0.0, _Z0])
        self.pancreas_r = np.array([u(12, 16), u(9, 12), u(8, 11)])
        # gallbladder hangs from the inferior liver surface in the interlobar fissure (absent sometimes)
        self.gallbladder = None
        if rng.uniform() < 0.75:
            c = self.lobes[0].centre + np.array([u(-33, -13), u(27, 47), u(-43, -23)])
            self.gallbladder = _Ellipsoid(
                c, np.array([u(12, 17), u(12, 17), u(30, 42)]), _rotation_matrix((1, 0, 0), math.radians(u(25, 50)))
            )
        top = self.dome_r_z
        self.heart = _Ellipsoid(
            np.array([u(-25, -5), u(15, 35), top + u(40, 60)]),
            np.array([u(60, 75), u(48, 58), u(50, 60)]),
            _rand_rot(rng, 15.0),
        )

    def spine_centre_y(self, z: Array) -> Array:
        return self.spine_y + self.spine_curve * np.sin(z * (math.pi / 240.0))

    def spine_sdf(self, x: Array, y: Array, z: Array) -> Array:
        return _ellipse2d_sdf(x, y - self.spine_centre_y(z), float(self.spine_r[0]), float(self.spine_r[1]))

    def ivc_sdf(self, x: Array, y: Array, z: Array) -> Array:
        return _ellipse2d_sdf(
            x - float(self.ivc_xy[0]), y - float(self.ivc_xy[1]) - 0.06 * z, float(self.ivc_r[0]), float(self.ivc_r[1])
        )

    def aorta_sdf(self, x: Array, y: Array, z: Array) -> Array:
        dx, dy = x - float(self.aorta_xy[0]), y - float(self.aorta_xy[1]) + 0.05 * z
        return np.sqrt(dx * dx + dy * dy) - self.aorta_r

    # ---------------------------------------------------------------- vessel trees
    def _vessel_inside(self, pts: Array) -> Array:
        """Depth (mm, positive inside) of points in liver tissue that vessels may traverse."""
        x, y, z = pts[..., 0], pts[..., 1], pts[..., 2]
        d = np.maximum(self.liver_implicit(x, y, z), -self.ivc_sdf(x, y, z) - 2.0)
        if self.gallbladder is not None:
            d = np.maximum(d, -self.gallbladder.sdf(x, y, z) - 2.0)
        return -d

    def _sample_vessels(self, rng: np.random.Generator) -> None:
        u = rng.uniform
        right = self.lobes[0]
        # porta hepatis: medial-inferior part of the right lobe
        hilum = right.centre + np.array([-u(28, 38), u(2, 14), -u(8, 22)]) * self.liver_scale
        confluence = np.array([u(0, 12), self.pancreas_pts[1, 1] - u(12, 20), self.pancreas_pts[1, 2] - u(5, 15)])
        r_trunk = u(6.0, 7.0)
        nodes: list[Array] = [hilum]
        pv = [(confluence, hilum, r_trunk, r_trunk * 0.95)]
        seeds = [
            (hilum, _unit([1.0, u(-0.35, 0.1), u(0.0, 0.35)]), u(5.0, 5.8), u(14, 22)),
            (hilum, _unit([-1.0, u(0.3, 0.8), u(0.0, 0.3)]), u(4.6, 5.4), u(22, 32)),
        ]
        pv += _grow_tree(
            rng,
            self._vessel_inside,
            seeds,
            r_min=1.6,
            asym=(0.45, 1.0),
            angles=((10, 35), (30, 70)),
            nodes=nodes,
            max_segments=260,
        )
        self.portal = _Segments.from_list(pv)

        ivc_x, ivc_y = float(self.ivc_xy[0]), float(self.ivc_xy[1])
        zc = self.dome_r_z - u(16, 26)
        yc = ivc_y + 0.06 * zc
        conf = np.array([ivc_x, yc, zc])
        hv_seeds = [
            (conf + [self.ivc_r[0] * 0.5, 0.0, 0.0], _unit([1.0, u(0.0, 0.5), -u(0.25, 0.6)]), u(5.0, 6.0), u(20, 30)),
            (conf + [0.0, self.ivc_r[1] * 0.5, 0.0], _unit([u(-0.1, 0.4), 1.0, -u(0.3, 0.7)]), u(4.5, 5.5), u(18, 26)),
        ]
        if u() < 0.85:  # a separate left hepatic vein (else it joins the middle one)
            hv_seeds.append(
                (
                    conf + [-self.ivc_r[0] * 0.4, self.ivc_r[1] * 0.5, 2.0],
                    _unit([-1.0, u(0.5, 1.1), -u(0.0, 0.3)]),
                    u(4.0, 5.0),
                    u(18, 26),
                )
            )
        hv = _grow_tree(
            rng,
            self._vessel_inside,
            hv_seeds,
            r_min=1.6,
            asym=(0.3, 0.65),
            angles=((5, 20), (40, 80)),
            nodes=nodes,
            max_segments=160,
        )
        self.hepatic = _Segments.from_list(hv)

    # ---------------------------------------------------------------- HCC
    def _sample_lesions(self, rng: np.random.Generator, max_hcc: int, diam_mm: tuple[float, float]) -> None:
        n = int(rng.integers(0, max_hcc + 1)) if max_hcc > 0 else 0
        self.lesions: list[_Lesion] = []
        lo, hi = self.liver_box
        cand = rng.uniform(lo, hi, size=(1024, 3))
        depth = -np.maximum(self.liver_sdf(cand[:, 0], cand[:, 1], cand[:, 2]), -self._vessel_clearance(cand))
        for _ in range(n):
            radius = 0.5 * math.exp(rng.uniform(math.log(diam_mm[0]), math.log(diam_mm[1])))
            ok = depth > 1.3 * radius + 4.0  # whole nodule inside, lobulation included
            for les in self.lesions:
                ok &= np.linalg.norm(cand - les.centre, axis=1) > radius + les.radius + 4.0
            if not ok.any():
                continue
            c = cand[int(rng.choice(np.flatnonzero(ok)))]
            self.lesions.append(
                _Lesion(
                    centre=c,
                    radius=radius,
                    lobulation=_make_fourier(rng, 6, 1.2, 3.0),
                    lob_amp=rng.uniform(0.04, 0.12),
                    texture=_make_fourier(rng, 6, 4.0, max(6.0, radius)),
                    value=rng.uniform(0.35, 0.55),
                    rim=rng.uniform(0.75, 0.95) if rng.uniform() < 0.5 else 1.0,
                )
            )

    def _vessel_clearance(self, pts: Array) -> Array:
        """Distance of points to the large (r > 4 mm) vessel trunks; lesions avoid sitting on them."""
        out = np.full(len(pts), np.inf)
        for seg in (self.portal, self.hepatic):
            for i in np.flatnonzero(seg.r0 > 4.0):
                d, _ = _segment_distance(pts[:, 0], pts[:, 1], pts[:, 2], seg.p0[i], seg.p1[i])
                out = np.minimum(out, d - seg.r0[i])
        return out

    def lesion_sdf(self, les: _Lesion, x: Array, y: Array, z: Array) -> Array:
        dx, dy, dz = x - float(les.centre[0]), y - float(les.centre[1]), z - float(les.centre[2])
        d = np.sqrt(dx * dx + dy * dy + dz * dz)
        inv = 1.0 / np.maximum(d, 1e-3)
        return d - les.radius * (1.0 + les.lob_amp * les.lobulation(dx * inv, dy * inv, dz * inv))


def _perpendicular(rng: np.random.Generator, d: Array) -> Array:
    v = rng.standard_normal(3)
    v -= v.dot(d) * d
    return _unit(v)


def _grow_tree(
    rng: np.random.Generator,
    inside: Callable[[Array], Array],
    seeds: list[tuple[Array, Array, float, float]],
    r_min: float,
    asym: tuple[float, float],
    angles: tuple[tuple[float, float], tuple[float, float]],
    nodes: list[Array],
    max_segments: int,
) -> list[tuple[Array, Array, float, float]]:
    """Grow a vessel tree by random bifurcations that stay inside the liver and avoid crowding.

    Each branch picks, among jittered candidate directions, the one whose end lies deep in the
    liver and far from existing nodes (a cheap stand-in for space colonisation); if no
    direction fits it retries with a shorter step before giving up.  Children follow Murray's
    law ``r^3 = r1^3 + r2^3`` with a random asymmetry ``r2 / r1``: a small ratio gives a trunk
    with side branches (hepatic veins), a ratio near 1 a dichotomous tree (portal vein).
    Seeds (``length > 0``) are always accepted so that trunks can start outside the liver.

    Returns a list of (p0, p1, r0, r1) segments.
    """
    segs: list[tuple[Array, Array, float, float]] = []
    queue = deque((np.asarray(p, float), _unit(d), float(r), float(length)) for p, d, r, length in seeds)
    n_cand = 16
    cone = math.tan(math.radians(20.0))
    while queue and len(segs) < max_segments:
        p, d, r, length = queue.popleft()
        forced = length > 0
        if not forced:
            length = float(np.clip(r * rng.uniform(4.5, 8.0), 8.0, 36.0))
        jit = rng.standard_normal((n_cand, 3)) * cone
        cands = d[None, :] + jit - (jit @ d)[:, None] * d[None, :]
        cands /= np.linalg.norm(cands, axis=1, keepdims=True)
        cands[0] = d
        noise = rng.normal(0.0, 1.5, n_cand)
        k = -1
        for step in (length, 0.6 * length, 0.35 * length):
            ends = p[None, :] + cands * step
            depth_end, depth_mid = inside(ends), inside(p[None, :] + cands * (0.5 * step))
            nd = np.asarray(nodes) if nodes else np.zeros((0, 3))
            crowd = np.exp(-((ends[:, None, :] - nd[None, :, :]) ** 2).sum(-1) / (2.0 * 9.0**2)).sum(1)
            valid = np.ones(n_cand, bool) if forced else (depth_end > 0.5 * r + 0.5) & (depth_mid > 0.4 * r)
            if valid.any():
                score = np.minimum(depth_end, 15.0) - 5.0 * crowd + noise
                k = int(np.argmax(np.where(valid, score, -np.inf)))
                break
            if forced or step < 6.0:
                break
        if k < 0:
            continue
        e, dn = ends[k], cands[k]
        r_end = 0.96 * r
        segs.append((p, e, r, r_end))
        nodes.extend([e, 0.5 * (p + e)])
        a = rng.uniform(*asym)
        r1 = r_end / (1.0 + a**3) ** (1.0 / 3.0)
        r2 = a * r1
        perp = _perpendicular(rng, dn)
        axis = np.cross(dn, perp)
        d1 = _rotation_matrix(axis, math.radians(rng.uniform(*angles[0]))) @ dn
        d2 = _rotation_matrix(axis, -math.radians(rng.uniform(*angles[1]))) @ dn
        for dc, rc in ((d1, r1), (d2, r2)):
            if rc >= r_min:
                queue.append((e, dc, rc, 0.0))
    return segs


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------


_Clip = Callable[[tuple[slice, ...], Array, Array, Array], Array]


def _paint_ellipsoid(
    img: Array, grid: _Grid, ell: _Ellipsoid, value: float, clip: _Clip | None = None, offset: float = 0.0
) -> None:
    """Blend an ellipsoid (optionally intersected with ``clip(block, x, y, z) < 0``) into ``img``."""
    sl = grid.box(*ell.bounds(2 * grid.voxel_mm))
    if sl is None:
        return
    x, y, z = grid.coords(sl)
    sdf = ell.sdf(x, y, z) + offset
    if clip is not None:
        sdf = np.maximum(sdf, clip(sl, x, y, z))
    _blend(img[sl], value, _occupancy(sdf, grid.voxel_mm))


def _rasterise_segments(grid: _Grid, segs: _Segments, occ: Array) -> None:
    """Max-accumulate the partial-volume occupancy of tapered tubes; each in its own bounding box."""
    h = grid.voxel_mm
    for p0, p1, r0, r1 in zip(segs.p0, segs.p1, segs.r0, segs.r1, strict=True):
        m = max(r0, r1) + h
        sl = grid.box(np.minimum(p0, p1) - m, np.maximum(p0, p1) + m)
        if sl is None:
            continue
        x, y, z = grid.coords(sl)
        d, t = _segment_distance(x, y, z, p0, p1)
        f = _occupancy(d - (float(r0) + t * float(r1 - r0)), h)
        np.maximum(occ[sl], f, out=occ[sl])


def _render_body(img: Array, grid: _Grid, an: _Anatomy, rng: np.random.Generator) -> dict[str, Array]:
    """Fat, muscle wall, ribs, abdominal content (bowel/fat), diaphragm, lungs and heart.

    Returns full-grid fields reused by later painters: ``fat_in`` (fat/muscle interface),
    ``cavity`` (inner body cavity) signed distances and ``zd`` (diaphragm height).
    """
    h, v = grid.voxel_mm, an.val
    x, y, z = grid.coords()
    skin, muscle, cavity = an.body_sdf(
        x, y, z, grid.coarse_field(an.skin_noise, 8.0), grid.coarse_field(an.fat_noise, 8.0)
    )
    fat_tex = grid.coarse_field(_make_fourier(rng, 6, 20.0, 80.0), 8.0)
    img[...] = _occupancy(skin, h) * (v["fat"] * (1.0 + 0.04 * fat_tex))
    _blend(img, v["muscle"], _occupancy(muscle, h))
    # bowel: thin ribbons along zero crossings of one smooth field (loops) plus blobs of another
    loops = grid.coarse_field(_make_fourier(rng, 14, 35.0, 110.0), 6.0)
    blobs = grid.coarse_field(_make_fourier(rng, 10, 30.0, 90.0), 6.0)
    bval = grid.coarse_field(_make_fourier(rng, 6, 15.0, 50.0), 6.0)
    width = rng.uniform(0.25, 0.4)
    mix = np.maximum(
        np.clip(0.5 + (width - np.abs(loops)) * 4.0, 0.0, 1.0), np.clip(0.5 + (blobs - 0.9) * 2.5, 0.0, 1.0)
    )
    content = v["fat"] * (1.0 - mix) + (v["bowel"] * (1.0 + 0.3 * bval)) * mix
    _blend(img, content, _occupancy(cavity, h))
    zd = an.diaphragm_z(x, y)
    _blend(img, v["muscle"], _occupancy(np.maximum(cavity, zd - 3.0 - z), h))
    _blend(img, v["lung"], _occupancy(np.maximum(cavity, zd + 4.0 - z), h))
    rib = an.rib_sdf(x, y, z, cavity)
    _blend(img, v["cortex"], _occupancy(rib, h))
    _blend(img, v["rib_marrow"], _occupancy(rib + 1.0, h))
    heart_clip = lambda sl, x_, y_, z_: zd[sl] + 4.0 - z_  # noqa: E731
    _paint_ellipsoid(img, grid, an.heart, v["myocardium"], heart_clip)
    _paint_ellipsoid(img, grid, an.heart, v["blood"], heart_clip, offset=9.0)
    return {"fat_in": muscle, "cavity": cavity, "zd": zd}


def _render_retroperitoneum(img: Array, grid: _Grid, an: _Anatomy, fields: dict[str, Array]) -> None:
    """Spine with posterior elements, paraspinal and psoas muscles, aorta."""
    h, v = grid.voxel_mm, an.val
    sy = an.spine_y
    lo = np.array([-an.body_a, -an.body_b_post - 5.0, -1e4])
    hi = np.array([an.body_a, sy + 80.0, 1e4])
    sl = grid.box(lo, hi)
    if sl is None:
        return
    x, y, z = grid.coords(sl)
    sub = img[sl]
    cy = an.spine_centre_y(z)
    canal_y = cy - float(an.spine_r[1]) - 10.0
    fat_in = fields["fat_in"][sl]
    for side in (-1.0, 1.0):
        # erector spinae either side of the spinous process
        para = _ellipse2d_sdf(x - side * 30.0, y - (canal_y - 20.0), 26.0, 24.0)
        _blend(sub, v["muscle"], _occupancy(np.maximum(para, fat_in), h))
        # psoas grows caudally below the diaphragm crura
        pr = np.clip(6.0 + 0.3 * (_Z0 - 10.0 - z), 0.0, 24.0)
        psoas = np.sqrt((x - side * (28.0 + 0.5 * pr)) ** 2 + (y - cy - 2.0) ** 2) - pr
        _blend(sub, v["muscle"], _occupancy(np.where(pr > 0.5, psoas, 1e3), h))
    # neural arch (posterior half-ring), spinous and transverse processes
    dy = y - canal_y
    ring = np.sqrt(x * x + dy * dy)
    bone = np.maximum(ring - 17.0, dy - 4.0)
    spin, _ = _segment_distance(x, dy, 0.0 * z, np.array([0.0, -12.0, 0.0]), np.array([0.0, -38.0, 0.0]))
    bone = np.minimum(bone, spin - 6.0)
    for side in (-1.0, 1.0):
        tp, _ = _segment_distance(x, dy, 0.0 * z, np.array([side * 10.0, 2.0, 0.0]), np.array([side * 30.0, -4.0, 0.0]))
        bone = np.minimum(bone, tp - 6.0)
    _blend(sub, v["cortex"], _occupancy(bone, h))
    _blend(sub, v["marrow"], _occupancy(bone + 1.5, h))
    _blend(sub, v["csf"], _occupancy(ring - 9.0, h))
    _blend(sub, v["muscle"] * 0.9, _occupancy(ring - 4.5, h))
    # vertebral body: cortical shell, marrow, and discs repeating along z
    vb = an.spine_sdf(x, y, z)
    _blend(sub, v["cortex"], _occupancy(vb, h))
    ph = np.abs(np.mod(z - an.disc_phase, an.disc_period) - 0.5 * an.disc_period)
    disc = np.clip(0.5 + (ph - (0.5 * an.disc_period - 4.5)) / max(h, 1.0), 0.0, 1.0)
    _blend(sub, v["marrow"] * (1.0 - disc) + v["disc"] * disc, _occupancy(vb + 2.0, h))
    _blend(sub, v["aorta"], _occupancy(an.aorta_sdf(x, y, z), h))


def _abdomen_clip(fields: dict[str, Array]) -> _Clip:
    """Clip to the body cavity below the diaphragm, read from the precomputed full-grid fields."""
    return lambda sl, x, y, z: np.maximum(fields["cavity"][sl] + 1.0, z - fields["zd"][sl] + 3.0)


def _render_abdominal_organs(img: Array, grid: _Grid, an: _Anatomy, fields: dict[str, Array]) -> None:
    """Kidneys with sinus fat, stomach, spleen and pancreas, all below the diaphragm."""
    v = an.val
    clip = _abdomen_clip(fields)
    for kid in an.kidneys:
        _paint_ellipsoid(img, grid, kid, v["kidney"], clip)
        side = 1.0 if kid.centre[0] > 0 else -1.0
        sinus = _Ellipsoid(kid.centre + np.array([-side * 12.0, 4.0, 0.0]), kid.radii * [0.35, 0.4, 0.55], kid.rot)
        _paint_ellipsoid(img, grid, sinus, v["fat"] * 0.9, clip)
    _paint_ellipsoid(img, grid, an.stomach, v["stomach_wall"], clip)
    _paint_ellipsoid(img, grid, an.stomach, v["stomach_lumen"], clip, offset=5.0)
    spl = an.spleen
    sl = grid.box(*spl.bounds(10.0))
    if sl is not None:
        x, y, z = grid.coords(sl)
        sdf = np.maximum(spl.sdf(x, y, z) + 5.0 * an.spleen_noise(x, y, z), clip(sl, x, y, z))
        _blend(img[sl], v["spleen"], _occupancy(sdf, grid.voxel_mm))
    pts, rad = an.pancreas_pts, an.pancreas_r
    sl = grid.box(pts.min(0) - rad.max() - 5, pts.max(0) + rad.max() + 5)
    if sl is not None:
        x, y, z = grid.coords(sl)
        sdf = None
        for i in range(len(pts) - 1):
            d, t = _segment_distance(x, y, z, pts[i], pts[i + 1])
            s = d - (rad[i] + t * (rad[i + 1] - rad[i]))
            sdf = s if sdf is None else np.minimum(sdf, s)
        _blend(img[sl], v["pancreas"], _occupancy(np.maximum(sdf, clip(sl, x, y, z)), grid.voxel_mm))


def _render_liver(
    img: Array, label: Array, grid: _Grid, an: _Anatomy, fields: dict[str, Array]
) -> tuple[Array, tuple[slice, ...] | None]:
    """Paint the liver, IVC and gallbladder; write label 1. Returns (liver occupancy, block)."""
    h, v = grid.voxel_mm, an.val
    occ_full = np.zeros(grid.shape, dtype=np.float32)
    sl = grid.box(*an.liver_box)
    if sl is not None:
        x, y, z = grid.coords(sl)
        sdf = an.liver_sdf(x, y, z, fields["cavity"][sl], fields["zd"][sl])
        occ = _occupancy(sdf, h)
        tex = v["liver"] * (1.0 + 0.025 * an.liver_texture(x, y, z))
        _blend(img[sl], tex, occ)
        label[sl][sdf < 0] = LABELS["liver"]
        occ_full[sl] = occ
    if an.gallbladder is not None:
        _paint_ellipsoid(img, grid, an.gallbladder, v["gallbladder"], _abdomen_clip(fields))
    # IVC is a tube along the whole z range, posterior to/embedded in the liver (never labelled)
    lo = np.array([an.ivc_xy[0] - an.ivc_r[0] - 20, an.ivc_xy[1] - an.ivc_r[1] - 20, -1e4])
    sl2 = grid.box(lo, lo + [2 * an.ivc_r[0] + 40, 2 * an.ivc_r[1] + 40, 2e4])
    if sl2 is not None:
        x, y, z = grid.coords(sl2)
        _blend(img[sl2], v["ivc"], _occupancy(an.ivc_sdf(x, y, z), h))
    return occ_full, sl


def _render_vessels(img: Array, label: Array, grid: _Grid, an: _Anatomy, liver_block: tuple[slice, ...] | None) -> None:
    """Dark portal/hepatic veins; labelled only inside the (1-voxel dilated) liver."""
    from scipy import ndimage

    liver_env = np.zeros(grid.shape, dtype=bool)
    if liver_block is not None:
        liver_env[liver_block] = ndimage.binary_dilation(label[liver_block] == LABELS["liver"], iterations=1)
    for segs, name in ((an.portal, "portal_vein"), (an.hepatic, "hepatic_vein")):
        occ = np.zeros(grid.shape, dtype=np.float32)
        _rasterise_segments(grid, segs, occ)
        _blend(img, an.val[name], occ)
        label[(occ >= 0.5) & liver_env] = LABELS[name]


def _render_lesions(
    img: Array, label: Array, grid: _Grid, an: _Anatomy, liver_occ: Array, liver_mask: Array
) -> list[float]:
    """Hypointense HCC nodules clipped to the liver; returns their labelled volumes in ml."""
    h = grid.voxel_mm
    vox_ml = abs(float(np.linalg.det(grid.affine[:3, :3]))) / 1000.0
    volumes = []
    for les in an.lesions:
        m = les.radius * (1.0 + 3.0 * les.lob_amp) + 2.0 * h
        sl = grid.box(les.centre - m, les.centre + m)
        if sl is None:
            volumes.append(0.0)
            continue
        x, y, z = grid.coords(sl)
        sdf = an.lesion_sdf(les, x, y, z)
        val = les.value * (1.0 + 0.08 * les.texture(x, y, z))
        if les.rim != 1.0:
            val = val * np.where(sdf > -2.0, les.rim, 1.0)
        f = np.minimum(_occupancy(sdf, h), liver_occ[sl])
        _blend(img[sl], val, f)
        mask = (sdf < 0) & liver_mask[sl]
        label[sl][mask] = LABELS["hcc"]
        volumes.append(float(mask.sum()) * vox_ml)
    return volumes


def _bias_field(grid: _Grid, rng: np.random.Generator, strength: float) -> Array:
    """Smooth multiplicative coil bias: exp of a random quadratic, scaled to +-``strength``."""
    c = rng.normal(0.0, 1.0, 9)

    def poly(x: Array, y: Array, z: Array) -> Array:
        u, v, w = x / 160.0, y / 160.0, z / 120.0
        return (
            c[0] * u
            + c[1] * v
            + c[2] * w
            + c[3] * u * u
            + c[4] * v * v
            + c[5] * w * w
            + c[6] * u * v
            + c[7] * v * w
            + c[8] * u * w
        )

    p = grid.coarse_field(poly, 10.0)
    p -= float(np.median(p))
    span = float(np.max(np.abs(p)))
    return np.exp(p * (math.log1p(strength) / max(span, 1e-6))).astype(np.float32)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def generate_phantom(
    seed: int,
    spacing_range: Sequence[Sequence[float]] = DEFAULT_SPACING_RANGE,
    field_of_view_mm: Sequence[float] = DEFAULT_FOV_MM,
    orientations: Sequence[str] = DEFAULT_ORIENTATIONS,
    max_rotation_deg: float = 8.0,
    max_hcc: int = 3,
    shape: Sequence[int] | None = None,
    hcc_diameter_mm: tuple[float, float] = (8.0, 40.0),
    noise_sigma_range: tuple[float, float] = (0.02, 0.05),
    bias_strength_range: tuple[float, float] = (0.2, 0.3),
) -> PhantomCase:
    """Generate one HBP liver MRI phantom with its label map.

    Args:
        seed: any non-negative int; the same seed and arguments give bit-identical outputs.
            Anatomy, acquisition geometry and noise use independent sub-streams, so the same seed
            with another ``shape``/spacing/orientation shows the same patient.
        spacing_range: per RAS axis (LR, AP, SI) ``(min, max)`` voxel spacing in mm, drawn
            uniformly per case.  The default gives 107-160 x 107-160 x 60-96 voxels.
        field_of_view_mm: extent of the grid along (LR, AP, SI) in mm.
        orientations: axis codes to draw the storage orientation from (e.g. "RAS", "LPS",
            "PSR"); the array is permuted/flipped accordingly and the affine keeps the world
            geometry.
        max_rotation_deg: maximum oblique rotation of the voxel grid (random axis).
        max_hcc: maximum number of HCC nodules; the count is uniform in ``0..max_hcc``.
        shape: optional grid size in RAS order (LR, AP, SI); overrides the spacing with
            ``field_of_view_mm / shape`` (e.g. ``(32, 32, 24)`` for tests).
        hcc_diameter_mm: range of nodule diameters (log-uniform).
        noise_sigma_range: Rician noise sigma range relative to liver intensity.
        bias_strength_range: range of the maximum relative bias-field deviation.

    Returns:
        PhantomCase with float32 image, uint8 label, float64 affine and metadata.
    """
    if int(seed) < 0:
        raise BundleInputError(f"config seed must be >= 0, got {seed}")
    if max_hcc < 0:
        raise BundleInputError(f"config max_hcc must be >= 0, got {max_hcc}")
    if not orientations:
        raise BundleInputError("config orientations must name at least one axis code such as 'RAS'")
    for code in orientations:
        letters = str(code).upper()
        if len(letters) != 3 or sorted(_AXIS_CODE[c][0] for c in letters if c in _AXIS_CODE) != [0, 1, 2]:
            raise BundleInputError(f"config invalid axis code {code!r}; expected e.g. 'RAS', 'LPS' or 'PSR'")
    if shape is not None and (len(shape) != 3 or min(int(s) for s in shape) < 8):
        raise BundleInputError(f"config shape must be three sizes >= 8 (LR, AP, SI), got {shape}")
    if len(field_of_view_mm) != 3 or min(field_of_view_mm) <= 0:
        raise BundleInputError(f"config field_of_view_mm must be three positive lengths, got {field_of_view_mm}")
    if len(spacing_range) != 3 or any(not 0 < float(a) <= float(b) for a, b in spacing_range):
        raise BundleInputError(
            f"config spacing_range must be three (min, max) pairs with 0 < min <= max, got {spacing_range}"
        )

    ss_anat, ss_geom, ss_tex = np.random.SeedSequence(int(seed)).spawn(3)
    rng_anat, rng_geom, rng_tex = (np.random.default_rng(s) for s in (ss_anat, ss_geom, ss_tex))

    anatomy = _Anatomy(rng_anat, int(max_hcc), (float(hcc_diameter_mm[0]), float(hcc_diameter_mm[1])))
    grid, meta = _make_grid(rng_geom, spacing_range, field_of_view_mm, orientations, float(max_rotation_deg), shape)

    image = np.zeros(grid.shape, dtype=np.float32)
    label = np.zeros(grid.shape, dtype=np.uint8)
    fields = _render_body(image, grid, anatomy, rng_tex)
    _render_retroperitoneum(image, grid, anatomy, fields)
    _render_abdominal_organs(image, grid, anatomy, fields)
    liver_occ, liver_block = _render_liver(image, label, grid, anatomy, fields)
    del fields
    liver_mask = label == LABELS["liver"]
    _render_vessels(image, label, grid, anatomy, liver_block)
    hcc_ml = _render_lesions(image, label, grid, anatomy, liver_occ, liver_mask)

    bias_strength = float(rng_tex.uniform(*bias_strength_range))
    image *= _bias_field(grid, rng_tex, bias_strength)
    sigma = float(rng_tex.uniform(*noise_sigma_range))
    re = rng_tex.standard_normal(grid.shape, dtype=np.float32)
    re *= sigma
    re += image
    im = rng_tex.standard_normal(grid.shape, dtype=np.float32)
    im *= sigma
    image = np.sqrt(re * re + im * im)  # Rician magnitude

    vox_ml = abs(float(np.linalg.det(grid.affine[:3, :3]))) / 1000.0
    counts = np.bincount(label.ravel(), minlength=len(LABELS))
    info = {
        "seed": int(seed),
        **meta,
        "n_hcc": len(anatomy.lesions),
        "hcc_diameters_mm": [round(2.0 * les.radius, 2) for les in anatomy.lesions],
        "hcc_centres_mm": [[round(float(c), 2) for c in les.centre] for les in anatomy.lesions],
        "hcc_volumes_ml": [round(v, 3) for v in hcc_ml],
        "label_volumes_ml": {k: round(float(counts[i]) * vox_ml, 3) for k, i in LABELS.items() if k != "background"},
        "noise_sigma": sigma,
        "bias_strength": bias_strength,
    }
    return PhantomCase(image=image.astype(np.float32, copy=False), label=label, affine=grid.affine.copy(), info=info)


def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` of a dataset: independent of how many cases are generated."""
    ss = np.random.SeedSequence(int(seed), spawn_key=(int(index),))
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def _split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    n_val = int(round(n * val_fraction))
    n_test = int(round(n * test_fraction))
    if n >= 3:
        n_val = max(n_val, 1 if val_fraction > 0 else 0)
        n_test = max(n_test, 1 if test_fraction > 0 else 0)
    while n - n_val - n_test < 1:
        if n_val >= n_test and n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    return n - n_val - n_test, n_val, n_test


def _save_nifti(array: Array, affine: Array, path: str, dtype: type) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm")
    nib.save(img, path)


def write_phantom_dataset(
    dataset_dir: str,
    num_cases: int,
    seed: int,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    overwrite: bool = False,
    **phantom_kwargs,
) -> str:
    """Write an MSD-style phantom dataset and return the path of its ``datalist.json``.

    Layout: ``imagesTr/phantom_XXX.nii.gz``, ``labelsTr/phantom_XXX.nii.gz`` and ``datalist.json``
    with ``training``/``validation``/``test`` lists of ``{"image", "label"}`` paths relative to
    ``dataset_dir``.  Case ``i`` uses :func:`case_seed` ``(seed, i)``.  The dataset is built in a
    temporary sibling folder and renamed into place, so an interruption leaves no partial dataset.

    Raises:
        BundleInputError: ``dataset_dir`` exists and is not empty while ``overwrite`` is False,
            or invalid counts or fractions.
    """
    from tqdm import tqdm

    if int(num_cases) != num_cases or num_cases < 1:
        raise BundleInputError(f"config num_cases must be an integer >= 1, got {num_cases}")
    if int(seed) < 0:
        raise BundleInputError(f"config seed must be >= 0, got {seed}")
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= float(frac) < 1.0:
            raise BundleInputError(f"config {name} must be in [0, 1), got {frac}")
    if val_fraction + test_fraction >= 1.0:
        raise BundleInputError(f"config val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}")
    num_cases = int(num_cases)
    accepted = [name for name in inspect.signature(generate_phantom).parameters if name != "seed"]
    for name in phantom_kwargs:
        if name not in accepted:
            close = difflib.get_close_matches(name, accepted, n=2, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else f"; known: {', '.join(accepted)}"
            raise BundleInputError(f"config 'phantom': unknown setting {name!r}{hint}")
    dataset_dir = os.path.abspath(os.path.expanduser(str(dataset_dir)))
    with staged_output(dataset_dir, overwrite, kind="phantom dataset") as tmp:
        os.makedirs(os.path.join(tmp, "imagesTr"))
        os.makedirs(os.path.join(tmp, "labelsTr"))
        items = []
        for i in tqdm(range(num_cases), desc="phantoms", unit="case"):
            case = generate_phantom(case_seed(seed, i), **phantom_kwargs)
            if not np.any(case.label == LABELS["liver"]):  # e.g. a field of view or spacing that misses the liver
                raise BundleInputError(
                    f"config 'phantom': case {i} has no liver in its label map with {dict(phantom_kwargs)}; "
                    "widen field_of_view_mm or reduce spacing_range"
                )
            name = f"phantom_{i:03d}.nii.gz"
            _save_nifti(case.image, case.affine, os.path.join(tmp, "imagesTr", name), np.float32)
            _save_nifti(case.label, case.affine, os.path.join(tmp, "labelsTr", name), np.uint8)
            items.append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}"})
        n_train, n_val, _ = _split_counts(num_cases, float(val_fraction), float(test_fraction))
        order = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=_SPLIT_SPAWN_KEY)).permutation(
            num_cases
        )
        pick = lambda idx: [items[int(j)] for j in sorted(idx)]  # noqa: E731
        datalist = {
            "training": pick(order[:n_train]),
            "validation": pick(order[n_train : n_train + n_val]),
            "test": pick(order[n_train + n_val :]),
        }
        with open(os.path.join(tmp, "datalist.json"), "w") as f:
            json.dump(datalist, f, indent=2)
    return os.path.join(dataset_dir, "datalist.json")
