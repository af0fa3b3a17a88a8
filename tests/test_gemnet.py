"""GemNet-dT against fairchem's `gemnet_t` (fixture with its weights and outputs), bases against
their closed forms, the checkpoint loader, gradient forces, and parameter counts."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ase.build import add_adsorbate, fcc111
from conftest import DATA, float64_batch

from graphpar.models import build_model, count_parameters, scale_shared_gradients
from graphpar.models.gemnet import (
    FAIRCHEM_NAME_MAP,
    GemNetT,
    fairchem_to_graphpar_name,
    load_fairchem_state_dict,
)
from graphpar.models.gemnet_basis import PolynomialEnvelope, RadialBasis, real_sph_harm_l0

FIXTURE = DATA / "fairchem-gemnet-dt"


def fixture():
    config = json.loads((FIXTURE / "model.json").read_text())
    weights = {k: torch.from_numpy(v) for k, v in np.load(FIXTURE / "weights.npz").items()}
    graph = dict(np.load(FIXTURE / "graph.npz"))
    outputs = dict(np.load(FIXTURE / "outputs.npz"))
    return config, weights, graph, outputs


def fixture_batch(graph, prefix):
    """The fixture's input graph (row 0 source, row 1 target) as a batch."""
    pos = torch.from_numpy(graph[f"{prefix}_pos"])
    if prefix == "batch":
        natoms = torch.from_numpy(graph["batch_natoms"])
    else:
        natoms = torch.tensor([pos.size(0)])
    return SimpleNamespace(
        pos=pos,
        atomic_numbers=torch.from_numpy(graph[f"{prefix}_atomic_numbers"]),
        cell=torch.from_numpy(graph[f"{prefix}_cell"]).reshape(-1, 3, 3),
        natoms=natoms,
        batch=torch.repeat_interleave(torch.arange(natoms.numel()), natoms),
        edge_index=torch.from_numpy(graph[f"{prefix}_edge_index"]),
        cell_offsets=torch.from_numpy(graph[f"{prefix}_cell_offsets"]),
    )


def fixture_model(config, weights):
    model = GemNetT(**config["constructor_args"]).double()
    return load_fairchem_state_dict(model, weights, config["scale_factors"]).eval()


def test_radial_basis_closed_form():
    p = 5
    env = PolynomialEnvelope(p)
    x = torch.linspace(0, 1.2, 241, dtype=torch.float64)
    a, b, c = -(p + 1) * (p + 2) / 2, p * (p + 2), -p * (p + 1) / 2
    assert [a, b, c] == [-21.0, 35.0, -15.0]
    expected = torch.where(x < 1, 1 + a * x**p + b * x ** (p + 1) + c * x ** (p + 2), 0.0)
    assert torch.allclose(env(x), expected, rtol=0, atol=1e-15)
    # Smooth cutoff: u(1) = u'(1) = u''(1) = 0 (closed-form derivatives), u(0) = 1.
    one = torch.tensor(1.0 - 1e-12, dtype=torch.float64)
    assert abs(float(env(one))) < 1e-10 and float(env(torch.zeros(1, dtype=torch.float64))) == 1
    du = p * a + (p + 1) * b + (p + 2) * c
    d2u = p * (p - 1) * a + (p + 1) * p * b + (p + 2) * (p + 1) * c
    assert du == 0 and d2u == 0

    cutoff, k = 6.0, 16
    basis = RadialBasis(k, cutoff, p).double()
    mu = torch.linspace(0, 1, k, dtype=torch.float32).double().numpy()  # fairchem's centres
    coeff = -0.5 / (mu[1] - mu[0]) ** 2
    d = torch.linspace(0.5, 6.5, 97, dtype=torch.float64)
    xs = d.numpy()[:, None] / cutoff
    env_np = np.where(xs < 1, 1 + a * xs**p + b * xs ** (p + 1) + c * xs ** (p + 2), 0.0)
    expected = env_np * np.exp(coeff * (xs - mu) ** 2)
    assert np.abs(basis(d).numpy() - expected).max() < 1e-14
    assert basis.rbf.coeff == coeff


def test_circular_basis_closed_form_and_fixture_constants():
    config = json.loads((FIXTURE / "model.json").read_text())
    constants = config["derived_constants"]
    assert RadialBasis(16, 6.0).rbf.coeff == constants["gaussian_rbf_coeff"]
    z = torch.linspace(-1, 1, 201, dtype=torch.float64)
    ours = real_sph_harm_l0(z, 7)
    zn = z.numpy()
    for l, expr in enumerate(constants["cbf_spherical_harmonics_l0_to_l6_of_z_cos_angle"]):  # noqa: E741
        ref = np.broadcast_to(eval(expr, {"z": zn}), zn.shape)
        assert np.abs(ours[:, l].numpy() - ref).max() < 1e-13, l
    # Orthonormality on the sphere: 2 pi int_-1^1 Y_l Y_l' dz = delta (Gauss-Legendre).
    nodes, w = np.polynomial.legendre.leggauss(20)
    y = real_sph_harm_l0(torch.from_numpy(nodes), 7).numpy()
    gram = 2 * math.pi * (y * w[:, None]).T @ y
    assert np.abs(gram - np.eye(7)).max() < 1e-12


@pytest.mark.parametrize("prefix", ["batch", "s0", "s1"])
def test_matches_fairchem_fixture(prefix):
    config, weights, graph, outputs = fixture()
    model = fixture_model(config, weights)
    assert (
        sum(p.numel() for p in model.parameters()) + len(config["scale_factors"])
        == config["num_parameters"]
    )  # fairchem counts its 12 scale factors as (frozen) parameters
    out = model(fixture_batch(graph, prefix))
    energy, forces = out["energy"].detach().numpy(), out["forces"].detach().numpy()
    ref_energy, ref_forces = outputs[f"{prefix}_energy"], outputs[f"{prefix}_forces"]
    e_rel = np.abs(energy - ref_energy).max() / np.abs(ref_energy).max()
    f_abs = np.abs(forces - ref_forces).max()
    print(
        f"{prefix}: energy rel dev {e_rel:.2e}, forces abs dev {f_abs:.2e} eV/A "
        f"(max |F| {np.abs(ref_forces).max():.1f})"
    )
    assert energy.shape == ref_energy.shape and forces.shape == ref_forces.shape
    assert e_rel < 1e-6
    assert f_abs < 1e-6


def test_fairchem_symmetric_graph_order_gives_same_result():
    """fairchem's own symmetrised graph and triplets (its edge order, [kept | reversed]) in the
    batch reproduce the fixture too: the model does not depend on the edge order."""
    config, weights, graph, outputs = fixture()
    model = fixture_model(config, weights)
    batch = fixture_batch(graph, "batch")
    batch.edge_index_sym = torch.from_numpy(graph["batch_sym_edge_index"])
    batch.cell_offsets_sym = torch.from_numpy(graph["batch_sym_cell_offsets"])
    batch.id_swap = torch.from_numpy(graph["batch_id_swap"])
    batch.id3_ba = torch.from_numpy(graph["batch_id3_ba"])
    batch.id3_ca = torch.from_numpy(graph["batch_id3_ca"])
    out = model(batch)
    ref_energy = outputs["batch_energy"]
    assert (
        np.abs(out["energy"].detach().numpy() - ref_energy).max() / np.abs(ref_energy).max() < 1e-12
    )
    assert np.abs(out["forces"].detach().numpy() - outputs["batch_forces"]).max() < 1e-10


def test_loader_fails_loudly():
    config, weights, _, _ = fixture()
    args, scales = config["constructor_args"], config["scale_factors"]
    assert fairchem_to_graphpar_name("int_blocks.0.dense_ca.linear.weight") == (
        "int_blocks.0.dense_ca.weight"
    )
    assert fairchem_to_graphpar_name("out_blocks.1.seq_energy.0.linear.weight") is None
    assert len(FAIRCHEM_NAME_MAP) >= 3
    # Scale factors by fairchem scale-file name, and without them in the state_dict.
    no_scales = {k: v for k, v in weights.items() if not k.endswith("scale_factor")}
    by_name = {v["fairchem_name"]: v["value"] for v in scales.values()}
    model = load_fairchem_state_dict(GemNetT(**args).double(), no_scales, by_name)
    assert float(model.out_blocks[1].scale_sum.scale_factor) == by_name["OutBlock_1_sum"]
    with pytest.raises(KeyError, match="missing scale factors"):
        load_fairchem_state_dict(GemNetT(**args).double(), no_scales)
    with pytest.raises(KeyError, match="unexpected scale factor"):
        load_fairchem_state_dict(GemNetT(**args).double(), weights, {"IntBlock_3_sum": 1.0})
    with pytest.raises(ValueError, match="different values"):
        load_fairchem_state_dict(GemNetT(**args).double(), weights, {"OutBlock_0_sum": 0.123})
    missing = dict(weights)
    del missing["int_blocks.1.dense_ca.linear.weight"]
    with pytest.raises(RuntimeError, match="Missing"):
        load_fairchem_state_dict(GemNetT(**args).double(), missing, scales)
    extra = dict(weights, **{"int_blocks.1.bogus.linear.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="Unexpected"):
        load_fairchem_state_dict(GemNetT(**args).double(), extra, scales)
    alias = dict(weights)
    alias["out_blocks.0.seq_energy.0.linear.weight"] = (
        alias["out_blocks.0.seq_energy.0.linear.weight"] + 1
    )
    with pytest.raises(ValueError, match="alias"):
        load_fairchem_state_dict(GemNetT(**args).double(), alias, scales)
    module = {"module." + k: v for k, v in weights.items()}  # DDP checkpoints
    load_fairchem_state_dict(GemNetT(**args).double(), module, scales)


def slabs(seed=0):
    atoms = []
    for k, (metal, ads) in enumerate((("Cu", "O"), ("Pt", "H"))):
        slab = fcc111(metal, size=(2, 2, 2), vacuum=5.0)
        add_adsorbate(slab, ads, 1.5, "fcc")
        slab.rattle(0.05, seed=seed + k)
        atoms.append(slab)
    return atoms


def batch_of(atoms_list):
    return float64_batch(atoms_list, cutoff=4.0, max_neighbors=12)


def test_gradient_forces_are_finite_differences():
    torch.manual_seed(0)
    model = build_model("gemnet-tiny", cutoff=4.0, direct_forces=False).double().eval()
    atoms = slabs()[0]
    batch = batch_of([atoms])
    forces = model(batch)["forces"]
    h = 1e-5
    for atom in (0, len(atoms) - 1):
        for axis in range(3):
            energies = []
            for sign in (1, -1):
                shifted = batch.clone()
                shifted.pos = batch.pos.clone()
                shifted.pos[atom, axis] += sign * h
                with torch.no_grad():
                    energies.append(float(model(shifted)["energy"]))
            fd = -(energies[0] - energies[1]) / (2 * h)
            assert abs(fd - float(forces[atom, axis])) < 1e-6 * max(1.0, abs(fd))


def test_batching_and_graph_from_batch_or_built():
    torch.manual_seed(0)
    model = build_model("gemnet-tiny", cutoff=4.0).double().eval()
    atoms = slabs()
    batch = batch_of(atoms)
    ref = model(batch)
    assert ref["energy"].shape == (2,) and ref["forces"].shape == batch.pos.shape
    for key in ("edge_index_sym", "cell_offsets_sym", "id_swap", "id3_ba", "id3_ca"):
        delattr(batch, key)
    built = model(batch)
    assert torch.equal(built["energy"], ref["energy"])
    single = model(batch_of(atoms[1:]))
    assert torch.allclose(single["energy"], ref["energy"][1:], rtol=1e-12)
    assert torch.allclose(single["forces"], ref["forces"][len(atoms[0]) :], atol=1e-12)
    with torch.no_grad():
        assert not model(batch)["forces"].requires_grad


def test_registry_and_parameter_counts():
    counts = {
        name: count_parameters(name)
        for name in (
            "gemnet-dt",
            "gemnet-xl",
            "gemnet-125m",
            "gemnet-245m",
            "gemnet-480m",
            "gemnet-960m",
        )
    }
    print("parameters:", counts)
    assert abs(counts["gemnet-dt"] - 31.7e6) / 31.7e6 < 0.02
    assert abs(counts["gemnet-xl"] - 293e6) / 293e6 < 0.02
    # docs/paper.md, Table 4: arithmetic gives ~121M / 243M / 479M / 942M (table: 125M ... 960M).
    for name, paper in (
        ("gemnet-125m", 125e6),
        ("gemnet-245m", 245e6),
        ("gemnet-480m", 480e6),
        ("gemnet-960m", 960e6),
    ):
        assert abs(counts[name] - paper) / paper < 0.05, name
    model = build_model("gemnet-tiny")
    assert count_parameters("gemnet-tiny") == sum(p.numel() for p in model.parameters())
    assert build_model("gemnet-tiny", cutoff=5.0).cutoff == 5.0


def test_graph_parallel_matches_fixture_and_serial(tmp_path):
    """G = 2 gloo ranks on the fixture: energies and forces equal fairchem's outputs, and the
    synchronised gradients of an energy + force loss equal the serial model's (direct forces,
    and gradient forces -dE/dpos with create_graph)."""
    import gemnet_worker as gw
    import gloo

    _, _, _, outputs = fixture()
    reference = {
        direct: gw.train_step(gw.make_model(direct), gw.make_batch()) for direct in (True, False)
    }
    gp_size = 2
    gloo.spawn(gw.worker, gp_size, gp_size, str(tmp_path))

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))

    for rank in range(gp_size):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        energy, forces, _ = result[True]
        e_dev = rel(energy, torch.from_numpy(outputs["batch_energy"]))
        f_dev = float((forces - torch.from_numpy(outputs["batch_forces"])).abs().max())
        print(f"G=2 rank {rank}: energy rel dev {e_dev:.2e}, forces abs dev {f_dev:.2e}")
        assert e_dev < 1e-6 and f_dev < 1e-6
        for direct in (True, False):
            energy, forces, grads = result[direct]
            ref_energy, ref_forces, ref_grads = reference[direct]
            assert rel(energy, ref_energy) < 1e-9 and rel(forces, ref_forces) < 1e-9
            assert grads.keys() == ref_grads.keys()
            worst = max(rel(grads[name], ref_grads[name]) for name in grads)
            print(f"G=2 rank {rank} direct={direct}: max grad rel dev {worst:.2e}")
            for name, grad in grads.items():
                assert rel(grad, ref_grads[name]) < 1e-9, (rank, direct, name)


def test_shared_basis_gradients_divided_by_their_uses():
    """fairchem's serial GemNet divides the shared basis projections' gradients by their uses
    (blocks reading them); DimeNet++ has no shared parameters and is left alone."""
    model = build_model("gemnet-tiny").double()
    batch = batch_of(slabs())
    out = model(batch)
    (out["energy"].sum() + out["forces"].sum()).backward()
    before = {name: p.grad.clone() for name, p in model.named_parameters()}
    scale_shared_gradients(model)
    shared = {name: uses for name, _, uses in model.shared_parameters()}
    assert shared == {
        "mlp_rbf3.weight": 2,
        "mlp_cbf3.weight": 2,
        "mlp_rbf_h.weight": 2,
        "mlp_rbf_out.weight": 3,
    }
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, before[name] / shared.get(name, 1)), name

    dimenet = build_model("dimenetpp-tiny").double()
    dimenet(batch)["energy"].sum().backward()
    before = [p.grad.clone() for p in dimenet.parameters()]
    scale_shared_gradients(dimenet)
    assert all(torch.equal(p.grad, g) for p, g in zip(dimenet.parameters(), before, strict=True))
