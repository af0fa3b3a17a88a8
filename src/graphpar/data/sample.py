"""One structure as a PyG `Data` object whose batching keeps graph and triplet indices valid.

PyG concatenates samples into a batch and adds an increment to index fields so that they stay
batch-global. It only knows that fields whose name contains "index" count nodes; the triplet
fields count *edges*, and GemNet's ones count edges of a different graph (the symmetric one), so
`Sample` says so explicitly.
"""

from __future__ import annotations

from typing import Any

from torch_geometric.data import Data

# Fields holding node ids, stored as [2, E] and concatenated along their last dimension.
NODE_INDEX_KEYS = ("edge_index", "edge_index_sym")
# Fields holding ids of edges of `edge_index` (DimeNet++ triplets: k->j and j->i).
EDGE_ID_KEYS = ("idx_kj", "idx_ji")
# Fields holding ids of edges of `edge_index_sym` (GemNet triplets and reverse-edge map).
SYM_EDGE_ID_KEYS = ("id3_ba", "id3_ca", "id_swap")


class Sample(Data):
    """One structure (docs/architecture.md sections 3-4). Units: A, eV, eV/A.

    | field | dtype, shape | notes |
    |---|---|---|
    | `pos` | float32 [N,3] | Cartesian positions, A |
    | `atomic_numbers` | int64 [N] | |
    | `cell` | float32 [1,3,3] | lattice vectors as rows, A |
    | `pbc` | bool [1,3] | periodic directions |
    | `natoms` | int64 scalar | N |
    | `tags` | int64 [N] | 0 subsurface, 1 surface, 2 adsorbate |
    | `fixed` | bool [N] | atoms held by FixAtoms; losses and metrics use `~fixed` |
    | `edge_index` | int64 [2,E] | row 0 source j (neighbour), row 1 target i (centre) |
    | `cell_offsets` | int64 [E,3] | source image: `vec_ji = pos[i] - (pos[j] + off @ cell)` |
    | `idx_kj`, `idx_ji` | int64 [T] | DimeNet++ triplets: ids in `edge_index` of k->j and j->i |
    | `edge_index_sym` | int64 [2,Es] | GemNet's symmetric graph (every edge has its reverse) |
    | `cell_offsets_sym` | int64 [Es,3] | its source images |
    | `id_swap` | int64 [Es] | id in `edge_index_sym` of each edge's reverse |
    | `id3_ba`, `id3_ca` | int64 [Tg] | GemNet triplets: ids in `edge_index_sym` of b->a, c->a |
    | `energy` | float64 scalar | eV (adsorption-referenced when the dataset says so) |
    | `forces` | float32 [N,3] | eV/A |
    | `pos_relaxed`, `energy_relaxed`, `energy_init` | | IS2RS/IS2RE samples |
    | `sid`, `fid` | int64 | system and frame ids |

    In a batch (`torch_geometric.data.Batch.from_data_list`) node ids are offset by the atoms
    before, `idx_kj`/`idx_ji` by the edges of `edge_index` before, and `id3_ba`/`id3_ca`/
    `id_swap` by the edges of `edge_index_sym` before; scalars become [B] and `cell` [B,3,3].
    """

    def __inc__(self, key: str, value: Any, *args: Any, **kwargs: Any) -> Any:
        if key in NODE_INDEX_KEYS:
            return self.num_nodes
        if key in EDGE_ID_KEYS:
            return self["edge_index"].size(1)
        if key in SYM_EDGE_ID_KEYS:
            return self["edge_index_sym"].size(1)
        return super().__inc__(key, value, *args, **kwargs)

    def __cat_dim__(self, key: str, value: Any, *args: Any, **kwargs: Any) -> Any:
        if key in NODE_INDEX_KEYS:
            return -1
        return super().__cat_dim__(key, value, *args, **kwargs)
