"""The registered model configurations as plain data, importable without torch: name ->
(family, hyperparameters). `graphpar.models` builds them (`MODELS`, `build_model`; its docstring
has the table of sizes); the workflow reads them when it parses (a rehearsal's tiny widths,
config/rehearsal.yaml) without loading torch, which would add seconds to every Snakemake job.
"""

from __future__ import annotations

from typing import Any

CONFIGURATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "dimenetpp": (
        "dimenetpp",
        dict(hidden_channels=192, out_emb_channels=192, int_emb_size=64, num_blocks=3),
    ),
    "dimenetpp-large": (
        "dimenetpp",
        dict(hidden_channels=512, out_emb_channels=384, int_emb_size=64, num_blocks=3),
    ),
    "dimenetpp-xl": (
        "dimenetpp",
        dict(hidden_channels=2048, out_emb_channels=1536, int_emb_size=256, num_blocks=4),
    ),
    "dimenetpp-small": (
        "dimenetpp",
        dict(
            hidden_channels=64,
            out_emb_channels=64,
            int_emb_size=32,
            basis_emb_size=8,
            num_blocks=3,
        ),
    ),
    "dimenetpp-tiny": (
        "dimenetpp",
        dict(
            hidden_channels=16,
            out_emb_channels=16,
            int_emb_size=8,
            basis_emb_size=4,
            num_blocks=2,
        ),
    ),
}

_GEMNET_OC20 = dict(
    emb_size_rbf=16,
    emb_size_cbf=16,
    num_radial=128,
    num_spherical=7,
    num_before_skip=1,
    num_after_skip=2,
    num_concat=1,
    num_atom=3,
    cutoff=6.0,
    max_neighbors=50,
    direct_forces=True,
)


def _gemnet(num_blocks: int, atom: int, edge: int, trip: int, bil: int) -> dict[str, Any]:
    return dict(
        _GEMNET_OC20,
        num_blocks=num_blocks,
        emb_size_atom=atom,
        emb_size_edge=edge,
        emb_size_trip=trip,
        emb_size_bil_trip=bil,
    )


CONFIGURATIONS.update(
    {
        "gemnet-dt": ("gemnet", _gemnet(3, 512, 512, 64, 64)),
        "gemnet-xl": ("gemnet", _gemnet(6, 128, 1536, 384, 192)),
        "gemnet-125m": ("gemnet", _gemnet(3, 1280, 768, 128, 64)),
        "gemnet-245m": ("gemnet", _gemnet(4, 1536, 1024, 192, 96)),
        "gemnet-480m": ("gemnet", _gemnet(6, 1792, 1184, 288, 160)),
        "gemnet-960m": ("gemnet", _gemnet(8, 2320, 1302, 512, 288)),
        "gemnet-small": ("gemnet", dict(_gemnet(3, 64, 64, 32, 32), num_radial=16)),
        "gemnet-tiny": (
            "gemnet",
            dict(
                _gemnet(2, 16, 16, 8, 8),
                emb_size_rbf=4,
                emb_size_cbf=4,
                num_radial=8,
                num_atom=2,
                num_after_skip=1,
            ),
        ),
    }
)


def tiny_widths(name: str) -> dict[str, Any]:
    """The width hyperparameters (embedding and channel sizes) of configuration `name`'s family
    at its tiny configuration's values: `build_model(name, **tiny_widths(name))` keeps `name`'s
    depth, cutoff and scale-factor names at a CPU test's size (config/rehearsal.yaml)."""
    family = CONFIGURATIONS[name][0]
    tiny = CONFIGURATIONS[f"{family}-tiny"][1]
    return {key: value for key, value in tiny.items() if "emb" in key or "channels" in key}
