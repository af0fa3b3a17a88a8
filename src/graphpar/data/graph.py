"""Periodic radius graphs and the triplets of DimeNet++ and GemNet, in torch.

One implementation serves preprocessing (chunks of structures) and on-the-fly rebuilding
(relaxations call `radius_graph_batch` every step; loaders of datasets stored without graphs
call it per sample). Everything is vectorised over atoms, edges and structures; lengths are in
A. On CPU tensors the radius graph of convention "graphpar" runs the same arithmetic in numpy
(`_radius_graph_cpu`: bit-identical, 2-4x faster on OC20-sized structures).

Conventions (docs/architecture.md section 4):

* `edge_index[0]` = source j (neighbour), `edge_index[1]` = target i (centre); messages flow
  j -> i. `cell_offsets[e]` (int) is the image of the source, so
  `vec_ji = pos[i] - (pos[j] + cell_offsets[e] @ cell)`.
* Edges are sorted by target, then distance; exact ties keep the order (image, source) in which
  candidates are enumerated, with images in lexicographic order of their offsets.
* With `max_neighbors = k` each target keeps its k nearest sources plus every further source
  within `tolerance` of the k-th distance, so a symmetric shell is never cut arbitrarily
  (convention "graphpar", the default). Convention "fairchem" builds the graphs of OCP/fairchem's
  LMDBs (`AtomsToGraphs(radius, max_neigh)`, the data of the published checkpoints) instead:
  see `GRAPH_CONVENTIONS`.
* DimeNet++ triplets k->j->i (`idx_kj`, `idx_ji`) index `edge_index`; GemNet triplets b->a, c->a
  (`id3_ba`, `id3_ca`) and `id_swap` index the symmetric graph `edge_index_sym`.

A sample or batch gets the triplets of a model family ("dimenetpp", "gemnet") in one place:
`triplet_fields(data, family)` returns those it carries or builds them, and
`attach_triplets(sample)` sets them on a sample. Triplet counts (load balancing, metadata) come
from `triplet_counts`, which never builds them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from graphpar.data.sample import Sample

__all__ = [
    "GRAPH_CONVENTIONS",
    "TRIPLET_FAMILIES",
    "TRIPLET_FIELDS",
    "StructureError",
    "atoms_to_sample",
    "attach_graphs",
    "float64_structure",
    "attach_triplets",
    "check_graph_convention",
    "check_structure",
    "dimenet_triplets",
    "edge_vectors",
    "gemnet_triplets",
    "radius_graph",
    "radius_graph_batch",
    "symmetric_graph",
    "triplet_counts",
    "triplet_fields",
]

# Candidate pairs held at once (structures x targets x images x sources): bounds the memory of
# `radius_graph_batch` (a few float/bool tensors of this size) whatever the batch.
_MAX_CANDIDATES = 1 << 23
# Convention "graphpar" on the CPU runs in numpy (`_radius_graph_cpu`, bit-identical, 2-4x
# faster); False sends it through the torch code, as on other devices (to compare the two).
_NUMPY_ON_CPU = True

# How a target's neighbours are capped at `max_neighbors` = k:
# * "graphpar": the k nearest plus every source within `tolerance` (0.01 A) of the k-th distance.
# * "fairchem": fairchem's `AtomsToGraphs(radius, max_neigh)` (pymatgen's neighbour list, then
#   the first k of a sort by distance), which built the LMDBs of OCP's published checkpoints:
#   float64 distances between the positions fairchem hands to pymatgen (`_fairchem_positions`:
#   wrapped into the cell, through pymatgen's fractional round trip), exactly k per target with
#   exact ties in enumeration order, and k - 1 for a target that pymatgen lists as its own
#   neighbour. From float64 positions (`atoms_to_sample` reads them from the Atoms) the edge
#   sets are fairchem's on both structures of tests/data/fairchem-checkpoints (990 and 1,792
#   edges; "graphpar" keeps 990 and 1,924). Ties closer than float64 rounding follow the
#   arithmetic, so another build of the same structure may differ in an edge at the k-th shell.
GRAPH_CONVENTIONS = ("graphpar", "fairchem")


# ----------------------------------------------------------------------------------------------
# Radius graph
# ----------------------------------------------------------------------------------------------


def radius_graph(
    pos: Tensor,
    cell: Tensor,
    pbc,
    cutoff: float,
    max_neighbors: int | None = None,
    tolerance: float = 0.01,
    convention: str = "graphpar",
) -> tuple[Tensor, Tensor]:
    """Periodic radius graph of one structure.

    Args:
        pos: [N,3] float, Cartesian positions (A). Distances are computed in this dtype
            (convention "fairchem": in float64, between fairchem's wrapped positions).
        cell: [3,3], lattice vectors as rows (A).
        pbc: 3 bools, periodic directions.
        cutoff: keep 0 < |vec_ji| <= cutoff (A).
        max_neighbors: per target, keep the nearest ones plus the shell tied within `tolerance`
            (convention "fairchem": exactly that many, `GRAPH_CONVENTIONS`).
        tolerance: degeneracy tolerance on the k-th distance (A); convention "graphpar" only.
        convention: how `max_neighbors` caps a target (`GRAPH_CONVENTIONS`).

    Returns:
        edge_index [2,E] long (source j, target i) and cell_offsets [E,3] long (source image).
    """
    pos = torch.as_tensor(pos)
    edge_index, cell_offsets, _ = radius_graph_batch(
        pos,
        torch.as_tensor(cell).reshape(1, 3, 3),
        torch.as_tensor(pbc, dtype=torch.bool).reshape(1, 3),
        torch.tensor([pos.shape[0]]),
        cutoff,
        max_neighbors=max_neighbors,
        tolerance=tolerance,
        convention=convention,
    )
    return edge_index, cell_offsets


def radius_graph_batch(
    pos: Tensor,
    cell: Tensor,
    pbc: Tensor,
    natoms: Tensor,
    cutoff: float,
    max_neighbors: int | None = None,
    tolerance: float = 0.01,
    convention: str = "graphpar",
) -> tuple[Tensor, Tensor, Tensor]:
    """Radius graphs of a batch of structures, equal to concatenating `radius_graph` on each.

    Args:
        pos: [sum N,3] float, positions of all structures one after the other (A).
        cell: [B,3,3] lattice vectors as rows (A); pbc: [B,3] bool; natoms: [B] atoms each.
        cutoff, max_neighbors, tolerance, convention: as in `radius_graph` (A).

    Returns:
        edge_index [2,E] with batch-global atom ids, cell_offsets [E,3], num_edges [B].
    """
    check_graph_convention(convention)
    fairchem = convention == "fairchem"
    device = pos.device
    natoms = torch.as_tensor(natoms, device=device).long().reshape(-1)
    cell = torch.as_tensor(cell, device=device).reshape(-1, 3, 3)
    pbc = torch.as_tensor(pbc, device=device, dtype=torch.bool).reshape(-1, 3)
    num_structures = natoms.numel()
    num_atoms = pos.shape[0]
    if (
        _NUMPY_ON_CPU
        and not fairchem
        and device.type == "cpu"
        and pos.dtype in (torch.float32, torch.float64)
        and num_structures
        and bool((natoms > 0).all())
    ):
        return _radius_graph_cpu(pos, cell, pbc, natoms, cutoff, max_neighbors, tolerance)
    atom_ptr = torch.cumsum(natoms, 0) - natoms
    batch = torch.repeat_interleave(torch.arange(num_structures, device=device), natoms)
    if fairchem:  # float64 distances between fairchem's wrapped positions
        cell = cell.double()
        pos, wrap_image, self_slot = _fairchem_positions(pos, cell, pbc, batch)

    offsets, shifts = _image_offsets(pos, cell, pbc, batch, natoms, cutoff)

    # Candidate pairs, structure chunk by structure chunk; each comes out sorted by target.
    cost = natoms.max().clamp(min=1) ** 2 * offsets.shape[1]
    chunk = max(1, _MAX_CANDIDATES // int(cost))
    parts = []
    for start in range(0, num_structures, chunk):
        stop = min(start + chunk, num_structures)
        parts.append(_candidates(pos, shifts, natoms, atom_ptr, start, stop, cutoff))
    source, target, image, dist2 = (torch.cat(p) for p in zip(*parts, strict=True))
    cell_offsets = offsets[batch[target], image]

    if fairchem:
        limit = None if max_neighbors is None else max_neighbors - self_slot.long()
        keep = _nearest_strict(target, dist2, num_atoms, limit)
        # Offsets between the given positions: wrapped = pos + wrap_image @ cell.
        cell_offsets = cell_offsets + wrap_image[source] - wrap_image[target]
    else:
        keep = _nearest(target, dist2, num_atoms, cutoff, max_neighbors, tolerance)
    edge_index = torch.stack([source[keep], target[keep]])
    num_edges = torch.bincount(batch[edge_index[1]], minlength=num_structures)
    return edge_index, cell_offsets[keep], num_edges


def check_graph_convention(convention: str) -> None:
    """Raise ValueError unless `convention` is one of `GRAPH_CONVENTIONS`."""
    if convention not in GRAPH_CONVENTIONS:
        raise ValueError(
            f"unknown graph convention {convention!r}; use one of {', '.join(GRAPH_CONVENTIONS)}"
        )


def _image_offsets(
    pos: Tensor, cell: Tensor, pbc: Tensor, batch: Tensor, natoms: Tensor, cutoff: float
) -> tuple[Tensor, Tensor]:
    """Cell offsets that can hold a neighbour, per structure: [B,I,3] long and their shifts
    `offset @ cell` [B,I,3] in pos's dtype, NaN where a structure has fewer than I images.

    An image n is needed only if some |pos_i - pos_j - n @ cell| <= cutoff. Along periodic
    direction d that bounds |n_d| by (span of fractional coordinates + cutoff / plane spacing),
    which covers cells smaller than the cutoff, skewed cells and atoms outside the cell; images
    whose shift lies farther than the cutoff from the box of all pos_i - pos_j (vacuum) are
    dropped. Non-periodic directions get no images.
    """
    num_structures = cell.shape[0]
    lattice = _complete_lattice(cell.double(), pbc)
    inverse = torch.linalg.inv(lattice)  # frac = pos @ inverse; column d is reciprocal b_d
    pos64 = pos.double()
    frac = torch.einsum("nk,nkd->nd", pos64, inverse[batch])
    index = batch[:, None].expand(-1, 3)
    span = _segment_extent(frac, index, num_structures)
    plane_spacing_inv = inverse.norm(dim=1)  # |b_d| = 1 / plane spacing
    reps = torch.floor(span + cutoff * plane_spacing_inv + 1e-6).long()
    reps = torch.where(pbc, reps, torch.zeros_like(reps))

    ranges = [torch.arange(-r, r + 1, device=pos.device) for r in reps.amax(0).tolist()]
    grid = torch.cartesian_prod(*ranges).reshape(-1, 3)  # lexicographic order
    needed = (grid.abs()[None] <= reps[:, None]).all(-1)
    shift64 = _shift(grid[None].double(), cell.double())
    box = _segment_extent(pos64, index, num_structures)
    gap = (shift64.abs() - box[:, None]).clamp(min=0)
    needed &= (gap * gap).sum(-1) <= (cutoff + 1e-4) ** 2

    # Compact each structure's images to the front, in grid order; pad with NaN shifts so that
    # padded candidates fail every distance test for free.
    num_images = needed.sum(1)
    order = torch.argsort((~needed).to(torch.uint8), dim=1, stable=True)
    order = order[:, : int(num_images.max())]
    offsets = grid[order]
    shifts = _shift(offsets.to(pos.dtype), cell.to(pos.dtype))
    padded = torch.arange(order.shape[1], device=pos.device)[None] >= num_images[:, None]
    shifts[padded] = float("nan")
    return offsets, shifts


def _complete_lattice(cell: Tensor, pbc: Tensor) -> Tensor:
    """The cell with its non-periodic rows replaced by an orthonormal basis of the complement of
    the periodic rows: invertible even for slabs stored with a zero c vector, and the tightest
    image bounds. Periodic rows are unchanged."""
    periodic = cell * pbc[..., None]
    _, _, vh = torch.linalg.svd(periodic)  # rows of vh past the rank span the complement
    rank = pbc.sum(1, keepdim=True)
    slot = torch.where(pbc, 0, rank + torch.cumsum(~pbc, 1) - 1)
    complement = torch.gather(vh, 1, slot[..., None].expand(-1, -1, 3))
    return torch.where(pbc[..., None], cell, complement)


def _segment_extent(values: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """max - min of `values` [N,3] per segment: [S,3]."""
    shape = (num_segments, values.shape[1])
    high = values.new_zeros(shape).scatter_reduce_(0, index, values, "amax", include_self=False)
    low = values.new_zeros(shape).scatter_reduce_(0, index, values, "amin", include_self=False)
    return high - low


def _shift(offsets: Tensor, cell: Tensor) -> Tensor:
    """offsets [B,I,3] @ cell [B,3,3], written out so that every structure's shifts come out
    bit-identical whatever the batch (a batched matmul may sum in another order)."""
    return (
        offsets[..., 0:1] * cell[:, None, 0]
        + offsets[..., 1:2] * cell[:, None, 1]
        + offsets[..., 2:3] * cell[:, None, 2]
    )


def _candidates(
    pos: Tensor,
    shifts: Tensor,
    natoms: Tensor,
    atom_ptr: Tensor,
    start: int,
    stop: int,
    cutoff: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """All pairs within the cutoff for structures start..stop-1: (source, target, image, dist2),
    sorted by target, then image, then source; self-pairs and coincident atoms dropped."""
    device = pos.device
    natoms = natoms[start:stop]
    shifts = shifts[start:stop]
    num_structures, num_images = shifts.shape[:2]
    width = int(natoms.max())

    # Positions padded to [B, width, 3] with NaN, so padded pairs fail the distance test.
    first, count = int(atom_ptr[start]), int(natoms.sum())
    local_batch = torch.repeat_interleave(torch.arange(num_structures, device=device), natoms)
    local = torch.arange(first, first + count, device=device) - atom_ptr[start:stop][local_batch]
    padded = pos.new_full((num_structures, width, 3), float("nan"))
    padded[local_batch, local] = pos[first : first + count]

    # dist2[b, i, n * N + j] = |pos_i - (pos_j + shift_n)|^2, one Cartesian component at a time.
    dist2 = None
    for k in range(3):
        source_k = (padded[:, None, :, k] + shifts[:, :, None, k]).reshape(num_structures, -1)
        diff = padded[:, :, k, None] - source_k[:, None, :]  # [B, N, I * N]
        diff.mul_(diff)
        dist2 = diff if dist2 is None else dist2.add_(diff)

    flat = torch.nonzero((dist2 <= cutoff * cutoff).view(-1)).squeeze(1)
    dist2 = dist2.view(-1)[flat]
    nonzero = dist2 > 0
    flat, dist2 = flat[nonzero], dist2[nonzero]
    row = flat // (num_images * width)  # b * width + i
    rest = flat - row * (num_images * width)
    image = rest // width
    j = rest - image * width
    structure = row // width
    first_atom = atom_ptr[start:stop][structure]
    i = row - structure * width
    return first_atom + j, first_atom + i, image, dist2


def _nearest(
    target: Tensor,
    dist2: Tensor,
    num_atoms: int,
    cutoff: float,
    max_neighbors: int | None,
    tolerance: float,
) -> Tensor:
    """Ids of the kept candidates (grouped by target), ordered by target then distance.

    Each target's candidates go in one row of a padded matrix of integer keys: the float32 bit
    pattern of dist2 (monotonic for non-negative floats) above the candidate's column. Sorting
    the rows orders by distance, breaks exact ties by enumeration order, and carries the column
    along, so the k-th distance is a column."""
    device = target.device
    degree = torch.bincount(target, minlength=num_atoms)
    ptr = torch.cumsum(degree, 0) - degree
    rank = torch.arange(target.numel(), device=device) - ptr[target]
    width = int(degree.max()) if target.numel() else 0
    bits = max(1, (width - 1).bit_length())
    column_mask = (1 << bits) - 1
    padding = 1 << 62  # above every key
    rows = torch.full((num_atoms, width), padding, dtype=torch.long, device=device)
    rows[target, rank] = (_float32_bits(dist2) << bits) | rank
    rows = _sort_rows(rows)

    threshold = torch.full((num_atoms,), padding - 1, dtype=torch.long, device=device)
    if max_neighbors is not None and width > max_neighbors:
        over = degree > max_neighbors
        kth = dist2[ptr + (rows[:, max_neighbors - 1] & column_mask) * over].sqrt()
        shell = (_float32_bits((kth + tolerance) ** 2) << bits) | column_mask
        threshold = torch.where(over, shell, threshold)
    row, column = torch.nonzero(rows <= threshold[:, None], as_tuple=True)
    return ptr[row] + (rows[row, column] & column_mask)


def _nearest_strict(target: Tensor, dist2: Tensor, num_atoms: int, limit: Tensor | None) -> Tensor:
    """Ids of the kept candidates of convention "fairchem" (grouped by target, ordered by target
    then distance): the first `limit[i]` of target i's candidates by distance (all of them for
    `limit` None), exact ties in enumeration order. `target` comes sorted."""
    order = torch.argsort(dist2, stable=True)
    order = order[torch.argsort(target[order], stable=True)]
    if limit is None:
        return order
    degree = torch.bincount(target, minlength=num_atoms)
    ptr = torch.cumsum(degree, 0) - degree
    rank = torch.arange(target.numel(), device=target.device) - ptr[target]
    return order[rank < limit[target]]


def _fairchem_positions(
    pos: Tensor, cell: Tensor, pbc: Tensor, batch: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The positions convention "fairchem" measures distances between, as fairchem's
    `AtomsToGraphs` hands them to pymatgen: wrapped into the cell (`ase.geometry.wrap_positions`,
    eps=0), then through pymatgen's Cartesian -> fractional -> Cartesian round trip, float64
    [N,3]; the cell image of each atom's wrapped position [N,3] long (wrapped = pos + image @
    cell); and the targets that keep one neighbour less [N] bool: those the round trip moves,
    which pymatgen lists as their own neighbour at a distance ~1e-16 (one of the max_neigh places
    of fairchem's sort, whose edges under 1e-8 A are then dropped). Computed in numpy on the CPU,
    as ASE and pymatgen compute them (a few numbers per atom)."""
    from ase.geometry import complete_cell, wrap_positions

    positions, cells = pos.detach().cpu().double().numpy(), cell.detach().cpu().double().numpy()
    periodic, structure = pbc.cpu().numpy(), batch.cpu().numpy()
    moved, image = np.empty_like(positions), np.zeros(positions.shape, dtype=np.int64)
    lost = np.zeros(len(positions), dtype=bool)
    for index in range(len(cells)):
        atoms, lattice = structure == index, complete_cell(cells[index])
        inverse = np.linalg.inv(lattice)
        wrapped = wrap_positions(positions[atoms], lattice, pbc=periodic[index], eps=0)
        moved[atoms] = np.dot(np.dot(wrapped, inverse), lattice)
        image[atoms] = np.rint(np.dot(wrapped - positions[atoms], inverse))
        lost[atoms] = (moved[atoms] != wrapped).any(axis=1)
    device = pos.device
    return (
        torch.as_tensor(moved, device=device),
        torch.as_tensor(image, device=device),
        torch.as_tensor(lost, device=device),
    )


def _float32_bits(x: Tensor) -> Tensor:
    """Bit pattern of float32(x) as int64: increasing with x for x >= 0."""
    return x.to(torch.float32).view(torch.int32).long()


def _sort_rows(keys: Tensor) -> Tensor:
    """Each row of an int64 matrix sorted ascending.

    On CPU this goes through numpy: torch's CPU sort (which always computes indices) is ~10x
    slower than numpy's vectorised sort at these sizes (hundreds of rows of ~100 keys), and
    the sort would otherwise dominate the graph build. The keys are unique, so any sort gives
    the same (deterministic) result."""
    if keys.device.type == "cpu":
        return torch.from_numpy(np.sort(keys.numpy(), axis=1))
    return torch.sort(keys, dim=1).values


# ----------------------------------------------------------------------------------------------
# Radius graph on the CPU (convention "graphpar"): numpy
# ----------------------------------------------------------------------------------------------

# Candidate pairs per block on the CPU: small enough that a block's few arrays stay in cache
# (the torch path's `_MAX_CANDIDATES` only bounds memory).
_CPU_BLOCK_CANDIDATES = 1 << 17


def _radius_graph_cpu(
    pos: Tensor,
    cell: Tensor,
    pbc: Tensor,
    natoms: Tensor,
    cutoff: float,
    max_neighbors: int | None,
    tolerance: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """`radius_graph_batch` under convention "graphpar" on CPU tensors, in numpy: the same
    edges, order and offsets bit for bit, 2-4x faster (bench/preprocess.py). Graphs of OC20's
    ~73-atom slabs are small, so torch's per-operator cost and its slow `nonzero` and advanced
    indexing dominated; numpy does the same float arithmetic (elementwise, in pos's dtype, in
    the same order) and the same integer bookkeeping with less of both. Two more savings: pair
    distances are computed in cache-sized blocks of structures, and a (target, image) whose
    shifted bounding box lies beyond the cutoff (plus a margin far above rounding) is skipped
    without computing its distances."""
    p = pos.detach().numpy()
    natoms_np = natoms.numpy().astype(np.int64)
    num_structures, num_atoms = natoms_np.size, p.shape[0]
    atom_ptr = np.cumsum(natoms_np) - natoms_np
    batch = np.repeat(np.arange(num_structures), natoms_np)
    offsets, shifts = _image_offsets_cpu(p, cell, pbc, batch, atom_ptr, cutoff)

    cost = int(natoms_np.max()) ** 2 * offsets.shape[1]
    block = max(1, _CPU_BLOCK_CANDIDATES // cost)
    parts = [
        _candidates_cpu(
            p, shifts, natoms_np, atom_ptr, start, min(start + block, num_structures), cutoff
        )
        for start in range(0, num_structures, block)
    ]
    source, target, image, dist2 = (np.concatenate(x) for x in zip(*parts, strict=True))
    keep = _nearest_cpu(target, dist2, num_atoms, cutoff, max_neighbors, tolerance)
    source, target, image = source[keep], target[keep], image[keep]
    cell_offsets = offsets[batch[target], image]
    num_edges = np.bincount(batch[target], minlength=num_structures)
    edge_index = np.stack([source, target])
    return torch.from_numpy(edge_index), torch.from_numpy(cell_offsets), torch.from_numpy(num_edges)


def _image_offsets_cpu(
    p: np.ndarray, cell: Tensor, pbc: Tensor, batch: np.ndarray, atom_ptr: np.ndarray, cutoff
) -> tuple[np.ndarray, np.ndarray]:
    """`_image_offsets` in numpy: [B,I,3] int64 offsets and [B,I,3] shifts in p's dtype (NaN
    past each structure's images). The bounds are conservative by 1e-6 (fractional) and 1e-4 A,
    so the float64 rounding of a different inverse never drops an image that holds a
    neighbour."""
    pbc_np = pbc.numpy()
    cell64 = cell.detach().double()
    lattice = cell64 if bool(pbc_np.all()) else _complete_lattice(cell64, pbc)
    inverse = np.linalg.inv(lattice.numpy())  # frac = pos @ inverse; column d is reciprocal b_d
    cell64 = cell64.numpy()
    pos64 = p.astype(np.float64)
    frac = np.einsum("nk,nkd->nd", pos64, inverse[batch])
    span = np.maximum.reduceat(frac, atom_ptr) - np.minimum.reduceat(frac, atom_ptr)
    reps = np.floor(span + cutoff * np.linalg.norm(inverse, axis=1) + 1e-6).astype(np.int64)
    reps[~pbc_np] = 0

    top = reps.max(0)
    grid = np.indices(2 * top + 1).reshape(3, -1).T - top  # lexicographic order
    needed = (np.abs(grid)[None] <= reps[:, None]).all(-1)
    shift64 = _shift(grid[None].astype(np.float64), cell64)
    box = np.maximum.reduceat(pos64, atom_ptr) - np.minimum.reduceat(pos64, atom_ptr)
    gap = np.maximum(np.abs(shift64) - box[:, None], 0)
    needed &= (gap * gap).sum(-1) <= (cutoff + 1e-4) ** 2

    num_images = needed.sum(1)
    order = np.argsort(~needed, axis=1, kind="stable")[:, : int(num_images.max())]
    offsets = grid[order]
    shifts = _shift(offsets.astype(p.dtype), cell.detach().numpy().astype(p.dtype))
    shifts[np.arange(order.shape[1])[None] >= num_images[:, None]] = np.nan
    return offsets, shifts


def _candidates_cpu(
    p: np.ndarray,
    shifts: np.ndarray,
    natoms: np.ndarray,
    atom_ptr: np.ndarray,
    start: int,
    stop: int,
    cutoff: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`_candidates` in numpy: (source, target, image, dist2) of the pairs within the cutoff
    for structures start..stop-1, sorted by target, then image, then source. dist2 is computed
    exactly as there; (target, image) rows whose shifted bounding box is out of reach are
    skipped first."""
    natoms, shifts, ptr = natoms[start:stop], shifts[start:stop], atom_ptr[start:stop]
    num_structures, num_images = shifts.shape[:2]
    width = int(natoms.max())
    first, count = int(ptr[0]), int(natoms.sum())
    atoms = p[first : first + count]
    if num_structures == 1:  # one structure per call (loaders): nothing to pad
        padded = atoms[None]
    else:
        local_batch = np.repeat(np.arange(num_structures), natoms)
        local = np.arange(count) - (ptr - first)[local_batch]
        padded = np.full((num_structures, width, 3), np.nan, dtype=p.dtype)
        padded[local_batch, local] = atoms

    # Rows (structure, target, image) that can hold a neighbour: the distance from the target
    # to the box of the structure's shifted atoms, in float64, within the cutoff plus a margin
    # above float rounding of the coordinates. NaN (padding) never passes.
    low = np.minimum.reduceat(atoms, ptr - first).astype(np.float64)
    high = np.maximum.reduceat(atoms, ptr - first).astype(np.float64)
    shift64 = shifts.astype(np.float64)
    target64 = padded.astype(np.float64)[:, :, None]  # [B, N, 1, 3]
    below = (low[:, None] + shift64)[:, None] - target64
    above = target64 - (high[:, None] + shift64)[:, None]
    gap = np.maximum(np.maximum(below, above), 0)
    scale = float(np.abs(atoms).max()) + float(np.fmax.reduce(np.abs(shifts), axis=None))
    reach = cutoff * (1 + 1e-4) + 1e-4 + 1e-5 * scale
    b, i, n = np.nonzero(np.einsum("bind,bind->bin", gap, gap) <= reach * reach)

    # dist2 = |pos_i - (pos_j + shift_n)|^2, one Cartesian component at a time (as `_candidates`).
    rows = b * num_images + n
    dist2 = None
    for k in range(3):
        source_k = padded[:, None, :, k] + shifts[:, :, None, k]  # [B, I, N]
        diff = padded[b, i, k][:, None] - source_k.reshape(-1, width)[rows]
        np.multiply(diff, diff, out=diff)
        dist2 = diff if dist2 is None else np.add(dist2, diff, out=dist2)

    flat = np.flatnonzero(dist2 <= cutoff * cutoff)
    dist2 = dist2.ravel()[flat]
    nonzero = dist2 > 0
    row, j = np.divmod(flat[nonzero], width)
    first_atom = ptr[b[row]]
    return first_atom + j, first_atom + i[row], n[row], dist2[nonzero]


def _nearest_cpu(
    target: np.ndarray,
    dist2: np.ndarray,
    num_atoms: int,
    cutoff: float,
    max_neighbors: int | None,
    tolerance: float,
) -> np.ndarray:
    """`_nearest` in numpy (same keys, same rounding)."""
    degree = np.bincount(target, minlength=num_atoms)
    ptr = np.cumsum(degree) - degree
    rank = np.arange(target.size) - ptr[target]
    width = int(degree.max()) if target.size else 0
    bits = max(1, (width - 1).bit_length())
    column_mask = (1 << bits) - 1
    padding = 1 << 62  # above every key
    rows = np.full((num_atoms, width), padding, dtype=np.int64)
    rows[target, rank] = (_float32_bits_cpu(dist2) << bits) | rank
    rows.sort(axis=1)

    threshold = np.full(num_atoms, padding - 1, dtype=np.int64)
    if max_neighbors is not None and width > max_neighbors:
        over = degree > max_neighbors
        kth = np.sqrt(dist2[ptr + (rows[:, max_neighbors - 1] & column_mask) * over])
        shell = (_float32_bits_cpu((kth + tolerance) ** 2) << bits) | column_mask
        threshold = np.where(over, shell, threshold)
    row, column = np.nonzero(rows <= threshold[:, None])
    return ptr[row] + (rows[row, column] & column_mask)


def _float32_bits_cpu(x: np.ndarray) -> np.ndarray:
    """`_float32_bits` in numpy."""
    return x.astype(np.float32).view(np.int32).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Triplets
# ----------------------------------------------------------------------------------------------


def dimenet_triplets(
    edge_index: Tensor, cell_offsets: Tensor, num_nodes: int
) -> tuple[Tensor, Tensor]:
    """DimeNet++ triplets k->j->i: for every output edge j->i (`idx_ji`), every input edge k->j
    (`idx_kj`) except the exact reverse of j->i (k = i with the opposite offset); another
    periodic image of i is kept. Sorted by idx_ji, then idx_kj.

    `edge_index` must be sorted by target (as `radius_graph` returns it): the input edges of
    j->i are then the contiguous block of edges into j.
    """
    source, target = edge_index
    ptr = _target_ptr(target, num_nodes)
    reverse = _reverse_edges(edge_index, cell_offsets, num_nodes)
    idx_kj, idx_ji = _ranges_without(ptr[source], ptr[source + 1], reverse)
    return idx_kj, idx_ji


def symmetric_graph(edge_index: Tensor, cell_offsets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """fairchem GemNet's symmetrisation (`reorder_symmetric_edges`): keep the edges with
    source < target, and the self-image edges (source == target) whose offset comes first (first
    non-zero component negative), then add the reverse of each (ends swapped, offset negated).

    The input graph may be asymmetric (max_neighbors): edges with source > target are dropped
    even when their reverse is absent, exactly as fairchem does. fairchem orders the result
    [kept | reversed] per structure; here it is sorted by target, the same edge set, which keeps
    each structure contiguous in a batch and makes `gemnet_triplets` cheap. Within a target come
    first the input edges that belong to the symmetric graph (input order), then the reverses
    that the input lacks (ordered by the input order of their originals).

    `edge_index` must be sorted by target (as `radius_graph` returns it).

    Returns:
        edge_index_sym [2,Es], cell_offsets_sym [Es,3], id_swap [Es] (id of each edge's reverse).
    """
    source, target = edge_index
    device = source.device
    num_nodes = int(edge_index.max()) + 1 if source.numel() else 0
    _target_ptr(target, num_nodes)  # checks the order
    reverse = _reverse_edges(edge_index, cell_offsets, num_nodes)
    o = cell_offsets
    earlier = (o[:, 0] < 0) | ((o[:, 0] == 0) & ((o[:, 1] < 0) | ((o[:, 1] == 0) & (o[:, 2] < 0))))
    keep = (source < target) | ((source == target) & earlier)
    # An input edge is in the symmetric graph if kept or if its reverse is kept (an edge with
    # source > target whose reverse exists); kept edges without a reverse get a new one.
    old_ids = torch.nonzero(keep | (reverse >= 0)).squeeze(1)
    new_ids = torch.nonzero(keep & (reverse < 0)).squeeze(1)
    # Few edges: only those max_neighbors made one-sided.
    new_ids = new_ids[torch.argsort(source[new_ids], stable=True)]
    old_target, new_target = target[old_ids], source[new_ids]

    count_old = torch.bincount(old_target, minlength=num_nodes)
    count_new = torch.bincount(new_target, minlength=num_nodes)
    count = count_old + count_new
    ptr = torch.cumsum(count, 0) - count
    old_pos = ptr[old_target] + _rank_in_group(old_target, count_old)
    new_pos = ptr[new_target] + count_old[new_target] + _rank_in_group(new_target, count_new)

    num_sym = old_ids.numel() + new_ids.numel()
    edge_index_sym = source.new_empty(2, num_sym)
    edge_index_sym[:, old_pos] = edge_index[:, old_ids]
    edge_index_sym[0, new_pos] = target[new_ids]
    edge_index_sym[1, new_pos] = new_target
    cell_offsets_sym = o.new_empty(num_sym, 3)
    cell_offsets_sym[old_pos] = o[old_ids]
    cell_offsets_sym[new_pos] = -o[new_ids]

    # Where each input edge went, as itself and as the origin of a new reverse.
    as_old = torch.full_like(source, -1)
    as_old[old_ids] = old_pos
    as_new = torch.full_like(source, -1)
    as_new[new_ids] = new_pos
    id_swap = torch.empty(num_sym, dtype=torch.long, device=device)
    old_reverse = reverse[old_ids]
    id_swap[old_pos] = torch.where(
        old_reverse >= 0, as_old[old_reverse.clamp(min=0)], as_new[old_ids]
    )
    id_swap[new_pos] = as_old[new_ids]
    return edge_index_sym, cell_offsets_sym, id_swap


def _rank_in_group(group: Tensor, count: Tensor) -> Tensor:
    """Position of each element among the elements of its group, for `group` sorted."""
    start = torch.cumsum(count, 0) - count
    return torch.arange(group.numel(), device=group.device) - start[group]


def gemnet_triplets(edge_index_sym: Tensor, num_nodes: int) -> tuple[Tensor, Tensor]:
    """GemNet triplets: every pair of distinct edges b->a (`id3_ba`) and c->a (`id3_ca`) into the
    same target a. Edges are compared by id, not atom, so b == c is kept for distinct periodic
    images. Sorted by id3_ca, then id3_ba.

    `edge_index_sym` must be sorted by target (as `symmetric_graph` returns it).
    """
    target = edge_index_sym[1]
    ptr = _target_ptr(target, num_nodes)
    own = torch.arange(target.numel(), device=target.device)
    id3_ba, id3_ca = _ranges_without(ptr[target], ptr[target + 1], own)
    return id3_ba, id3_ca


# The fields the triplets of each model family add to a sample or batch: DimeNet++'s index
# `edge_index`; GemNet's are its symmetric graph and indices into it (module docstring).
TRIPLET_FIELDS = {
    "dimenetpp": ("idx_kj", "idx_ji"),
    "gemnet": ("edge_index_sym", "cell_offsets_sym", "id_swap", "id3_ba", "id3_ca"),
}
TRIPLET_FAMILIES = tuple(TRIPLET_FIELDS)


def triplet_fields(data, family: str) -> tuple[Tensor, ...]:
    """The triplet fields of `family` (in `TRIPLET_FIELDS` order) of a `Sample` or a batch of
    them: the ones `data` carries if it carries them all, else built from its graph
    (`edge_index` sorted by target, `cell_offsets`; batch-global ids in a batch). `data` itself
    is left as it is."""
    if family not in TRIPLET_FIELDS:
        raise ValueError(f"unknown triplet family {family!r}; use one of {TRIPLET_FAMILIES}")
    carried = tuple(getattr(data, key, None) for key in TRIPLET_FIELDS[family])
    if all(value is not None for value in carried):
        return carried
    num_nodes = data.pos.size(0)
    if family == "dimenetpp":
        return dimenet_triplets(data.edge_index, data.cell_offsets, num_nodes)
    edge_index_sym, cell_offsets_sym, id_swap = symmetric_graph(data.edge_index, data.cell_offsets)
    id3_ba, id3_ca = gemnet_triplets(edge_index_sym, num_nodes)
    return edge_index_sym, cell_offsets_sym, id_swap, id3_ba, id3_ca


def attach_triplets(sample: Sample, families: Sequence[str] = TRIPLET_FAMILIES) -> Sample:
    """Set on `sample` the triplet fields of `families` (`triplet_fields`: built unless carried)
    and return it. For samples, before batching: batching offsets these fields, and a batch does
    not know fields set on it afterwards (models ask `triplet_fields` of a batch instead)."""
    for family in families:
        for key, value in zip(TRIPLET_FIELDS[family], triplet_fields(sample, family), strict=True):
            setattr(sample, key, value)
    return sample


def triplet_counts(
    edge_index: Tensor, cell_offsets: Tensor, num_nodes: int, num_edges: Tensor
) -> tuple[Tensor, Tensor]:
    """Numbers of DimeNet++ and GemNet triplets per structure, without building them: [B], [B].

    `edge_index` is a (batch of) graph(s) from `radius_graph(_batch)`, `num_edges` [B] its edges
    per structure. The DimeNet++ count of edge j->i is deg(j) minus one if its exact reverse
    exists; the GemNet count of a target of the symmetric graph with degree d is d (d - 1).
    """
    source, target = edge_index
    structure = torch.repeat_interleave(
        torch.arange(num_edges.numel(), device=source.device), num_edges
    )
    degree = torch.bincount(target, minlength=num_nodes)
    has_reverse = _reverse_edges(edge_index, cell_offsets, num_nodes) >= 0
    per_edge = degree[source] - has_reverse.long()
    dimenet = torch.zeros_like(num_edges).index_add_(0, structure, per_edge)

    edge_index_sym, _, _ = symmetric_graph(edge_index, cell_offsets)
    degree_sym = torch.bincount(edge_index_sym[1], minlength=num_nodes)
    atom_structure = torch.zeros(num_nodes, dtype=torch.long, device=source.device)
    atom_structure[source] = structure  # an atom may only send edges (their reverses count)
    atom_structure[target] = structure
    per_atom = degree_sym * (degree_sym - 1)
    gemnet = torch.zeros_like(num_edges).index_add_(0, atom_structure, per_atom)
    return dimenet, gemnet


def _target_ptr(target: Tensor, num_nodes: int) -> Tensor:
    """CSR pointer [num_nodes + 1] of edges sorted by target."""
    if target.numel() > 1 and not bool((target[1:] >= target[:-1]).all()):
        raise ValueError("edges must be sorted by target (as radius_graph returns them)")
    ptr = target.new_zeros(num_nodes + 1)
    torch.cumsum(torch.bincount(target, minlength=num_nodes), 0, out=ptr[1:])
    return ptr


def _reverse_edges(edge_index: Tensor, cell_offsets: Tensor, num_nodes: int) -> Tensor:
    """Id of the exact reverse of each edge (ends swapped, offset negated), -1 where absent.

    A lookup table indexed by (target, source - lowest source of that target, offset among
    the offsets that occur) replaces a sort of all edges (torch's CPU sort is slow); it holds
    about natoms x natoms x offsets entries per structure, filled in row chunks."""
    source, target = edge_index
    num_edges = source.numel()
    reverse = torch.full_like(source, -1)
    if num_edges == 0:
        return reverse
    device = source.device
    bound = int(cell_offsets.abs().max())
    size = 2 * bound + 1
    shifted = cell_offsets + bound
    code = (shifted[:, 0] * size + shifted[:, 1]) * size + shifted[:, 2]
    reverse_code = size**3 - 1 - code  # the code of the negated offset
    occurs = torch.zeros(size**3, dtype=torch.bool, device=device)
    occurs[code] = True
    compact = torch.cumsum(occurs, 0) - 1
    num_codes = int(compact[-1]) + 1
    code = compact[code]
    reverse_code = torch.where(occurs[reverse_code], compact[reverse_code], -1)

    low = torch.zeros(num_nodes, dtype=torch.long, device=device)
    low.scatter_reduce_(0, target, source, "amin", include_self=False)
    high = torch.zeros(num_nodes, dtype=torch.long, device=device)
    high.scatter_reduce_(0, target, source, "amax", include_self=False)
    span = high - low + 1
    columns = int(span.max())
    # The reverse of j -> i sits in row j (its target), column i - low[j].
    column = target - low[source]
    found = (reverse_code >= 0) & (column >= 0) & (column < span[source])

    slot = (target * columns + source - low[target]) * num_codes + code
    # Clamped so that edges without a reverse still index inside the table (result unused).
    wanted = (source * columns + column.clamp(0, columns - 1)) * num_codes
    wanted += reverse_code.clamp(min=0)
    rows_per_chunk = max(1, _MAX_CANDIDATES // (columns * num_codes))
    ids = torch.arange(num_edges, device=device)
    for first in range(0, num_nodes, rows_per_chunk):
        last = min(first + rows_per_chunk, num_nodes)
        table = torch.full(((last - first) * columns * num_codes,), -1, device=device)
        offset = first * columns * num_codes
        if last - first == num_nodes:  # one chunk (the usual case): no masks needed
            table[slot] = ids
            return torch.where(found, table[wanted], reverse)
        insert = (target >= first) & (target < last)
        table[slot[insert] - offset] = ids[insert]
        query = found & (source >= first) & (source < last)
        reverse[query] = table[wanted[query] - offset]
    return reverse


def _ranges_without(start: Tensor, end: Tensor, skip: Tensor) -> tuple[Tensor, Tensor]:
    """Concatenate the ranges start[e]..end[e]-1, leaving out skip[e] where it is inside:
    returns (values, owner), owner[t] = e for the values of range e.

    The values are the running sum of steps that are 1 inside a range, 2 over a skipped value,
    and a jump at the start of each range: one fill and one cumsum over the output, the least
    memory traffic for outputs of ~10^5 triplets per structure."""
    device = start.device
    inside = (skip >= start) & (skip < end)
    count = end - start - inside.long()
    total = int(count.sum())
    owner = torch.repeat_interleave(count, output_size=total)
    if total == 0:
        return owner.clone(), owner

    first = start + (inside & (skip == start)).long()
    last = end - 1 - (inside & (skip == end - 1)).long()
    block = torch.cumsum(count, 0) - count
    used = count > 0
    first, last, block_used = first[used], last[used], block[used]
    previous_last = torch.cat([last.new_zeros(1), last[:-1]])

    steps = torch.ones(total, dtype=torch.long, device=device)
    steps[block_used] = first - previous_last
    middle = inside & (skip > start) & (skip < end - 1)
    steps[block[middle] + (skip - start)[middle]] = 2
    return torch.cumsum(steps, 0, out=steps), owner


def edge_vectors(
    pos: Tensor, edge_index: Tensor, cell_offsets: Tensor, cell: Tensor, batch: Tensor
) -> Tensor:
    """vec_ji = pos[i] - (pos[j] + cell_offsets @ cell) of every edge j->i, A [E, 3].

    `cell` [B, 3, 3] (or [1, 3, 3]) and `batch` [N] (structure of each atom) locate each edge's
    cell; differentiable in `pos` (energy-centric forces go through it)."""
    source, target = edge_index
    cell = cell.reshape(-1, 3, 3).to(pos.dtype)
    shift = torch.einsum("ek,ekd->ed", cell_offsets.to(pos.dtype), cell[batch[target]])
    return pos[target] - (pos[source] + shift)


# ----------------------------------------------------------------------------------------------
# ase.Atoms -> Sample
# ----------------------------------------------------------------------------------------------

MAX_ATOMIC_NUMBER = 118  # oganesson, the heaviest known element


class StructureError(ValueError):
    """A structure no graph can be built for (`check_structure`); one line naming it."""


def check_structure(atoms) -> None:
    """Raise StructureError unless `atoms` has atoms, atomic numbers in 1..118, finite
    positions and a finite cell whose periodic vectors are linearly independent.

    Positions and cell are checked as the float32 values the graph is built from. One check per
    structure, on CPU, at the entry points (`atoms_to_sample`, preprocessing's readers): the
    graph code itself, which relaxations call on the device every step, does not check.
    """
    numbers = np.asarray(atoms.get_atomic_numbers())
    if len(numbers) == 0:
        raise StructureError("the structure has no atoms")
    bad = np.flatnonzero((numbers < 1) | (numbers > MAX_ATOMIC_NUMBER))
    if len(bad):
        raise StructureError(
            f"structure of {len(numbers)} atoms: atom {bad[0]} has atomic number "
            f"{numbers[bad[0]]}, not in 1..{MAX_ATOMIC_NUMBER}"
        )
    positions, cell = np.asarray(atoms.get_positions()), np.asarray(atoms.get_cell())
    with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf: refused
        positions32, cell32 = positions.astype(np.float32), cell.astype(np.float32)
    pbc = np.asarray(atoms.get_pbc(), dtype=bool)
    bad = np.flatnonzero(~np.isfinite(positions32).all(axis=1))
    if len(bad):
        problem = f"atom {bad[0]} has position {positions[bad[0]].tolist()}, not finite in float32"
    elif not np.isfinite(cell32).all():
        problem = f"cell {cell.tolist()} is not finite in float32"
    elif np.linalg.matrix_rank(cell32[pbc].astype(np.float64)) < pbc.sum():
        problem = (
            f"cell {cell.tolist()} is singular along its periodic directions (pbc {pbc.tolist()})"
        )
    else:
        return
    raise StructureError(f"structure {atoms.get_chemical_formula()}: {problem}")


def atoms_to_sample(
    atoms,
    cutoff: float = 6.0,
    max_neighbors: int | None = 50,
    triplets: bool = True,
    convention: str = "graphpar",
    graph: bool = True,
) -> Sample:
    """An `ase.Atoms` -> a `Sample` with its graph (`attach_graphs`: cutoff in A, `convention` as
    in `radius_graph`) and, if `triplets`, both triplet conventions. Energy (eV) and forces
    (eV/A, `apply_constraint=False`, as OC20's fixed atoms carry forces) are read when the
    attached calculator holds them. `graph=False`: the structure and labels only (`attach_graphs`
    adds graphs to many samples at once).

    Raises StructureError for a structure without a graph (`check_structure`).
    """
    from ase.constraints import FixAtoms

    check_structure(atoms)
    num_atoms = len(atoms)
    fixed = torch.zeros(num_atoms, dtype=torch.bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            fixed[torch.as_tensor(constraint.get_indices(), dtype=torch.long)] = True
    sample = Sample(
        pos=torch.as_tensor(np.asarray(atoms.get_positions()), dtype=torch.float32),
        atomic_numbers=torch.as_tensor(atoms.get_atomic_numbers(), dtype=torch.long),
        cell=torch.as_tensor(np.asarray(atoms.get_cell()), dtype=torch.float32).reshape(1, 3, 3),
        pbc=torch.as_tensor(np.asarray(atoms.get_pbc()), dtype=torch.bool).reshape(1, 3),
        natoms=torch.tensor(num_atoms, dtype=torch.long),
        tags=torch.as_tensor(atoms.get_tags(), dtype=torch.long),
        fixed=fixed,
    )
    if graph:
        exact = [float64_structure(atoms)] if convention == "fairchem" else None
        attach_graphs([sample], cutoff, max_neighbors, convention, exact)
        if triplets:
            attach_triplets(sample)

    # The calculator's stored results, read directly: its getters first compare the atoms with
    # the calculator's copy (ASE's check_state), 10% of preprocessing's time. Forces as stored:
    # without the constraints (OC20's fixed atoms carry forces).
    results = atoms.calc.results if atoms.calc is not None else {}
    if "energy" in results:
        sample.energy = torch.tensor(float(results["energy"]), dtype=torch.float64)
    if "forces" in results:
        sample.forces = torch.as_tensor(np.asarray(results["forces"]), dtype=torch.float32)
    return sample


def float64_structure(atoms) -> tuple[Tensor, Tensor]:
    """(positions [N,3], cell [3,3]) of `atoms` in float64: what convention "fairchem" builds
    graphs from (`attach_graphs`' `exact`)."""
    return (
        torch.as_tensor(np.asarray(atoms.get_positions()), dtype=torch.float64),
        torch.as_tensor(np.asarray(atoms.get_cell()), dtype=torch.float64),
    )


def attach_graphs(
    samples: Sequence[Sample],
    cutoff: float,
    max_neighbors: int | None,
    convention: str = "graphpar",
    exact: Sequence[tuple[Tensor, Tensor]] | None = None,
) -> list[Sample]:
    """Set `edge_index` and `cell_offsets` on each of `samples` and return them: one
    `radius_graph_batch` call for all (faster than one call each: bench/preprocess.py), the same
    graphs as `radius_graph` on each.

    The graphs are built from the samples' float32 positions and cells, the values a model
    sees, so preprocessing (storage "graphs") and the loader (storage "on_the_fly") build the
    same ones. Convention "fairchem" builds them from `exact` = one (float64 positions, float64
    cell) per sample, as fairchem does, and needs them."""
    if convention == "fairchem":
        if exact is None:
            raise ValueError("convention fairchem builds graphs from float64 positions (exact)")
        pos = torch.cat([p for p, _ in exact])
        cell = torch.stack([c.reshape(3, 3) for _, c in exact])
    else:
        pos = torch.cat([s.pos for s in samples])
        cell = torch.cat([s.cell.reshape(1, 3, 3) for s in samples])
    natoms = torch.tensor([s.pos.shape[0] for s in samples])
    pbc = torch.cat([s.pbc.reshape(1, 3) for s in samples])
    edge_index, cell_offsets, num_edges = radius_graph_batch(
        pos, cell, pbc, natoms, cutoff, max_neighbors, convention=convention
    )
    sizes = num_edges.tolist()  # edges come sorted by target, so structure by structure
    first_atoms = (torch.cumsum(natoms, 0) - natoms).tolist()
    parts = zip(edge_index.split(sizes, dim=1), cell_offsets.split(sizes), first_atoms, strict=True)
    for sample, (edges, offsets, first) in zip(samples, parts, strict=True):
        sample.edge_index, sample.cell_offsets = edges - first, offsets.clone()
    return list(samples)
