"""GemNet scale factors: fitting (graphpar.fit_scale_factors), the scale-file loader
(graphpar.models.gemnet.load_scale_factors) and the training config's `scale_factors` key."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA
from test_gemnet import batch_of, fixture_batch, slabs

from graphpar.fit_scale_factors import fit_scale_factors, scale_factor_order, scale_variances
from graphpar.models import build_model
from graphpar.models.gemnet import (
    GemNetT,
    load_fairchem_state_dict,
    load_scale_factors,
    read_scale_factors,
)
from graphpar.training.config import TrainingError, load_config
from graphpar.training.normalization import build_normalized_model

CHECKPOINTS = DATA / "fairchem-checkpoints"
PAPER = Path(__file__).resolve().parents[1] / "config" / "paper" / "scale_factors"


def tiny_gemnet(**overrides) -> GemNetT:
    torch.manual_seed(0)
    return build_model("gemnet-tiny", **overrides).double()


def test_fitting_gives_each_scaled_output_the_variance_of_its_input():
    """Fitted in forward order on 2 batches, every scaled output has the variance of its
    reference input (fairchem's criterion: ratio 1), measured on the same batches."""
    batches = [batch_of(slabs(seed)) for seed in (0, 10)]
    model = tiny_gemnet()
    fitted = fit_scale_factors(model, batches)
    names = {m.name: n for n, m in model.scale_factors().items()}
    assert set(fitted) == set(names) and len(fitted) == 12
    order = scale_factor_order(model, batches[0])
    assert [names[k] for k in sorted(fitted, key=lambda k: fitted[k]["order"])] == order
    after = scale_variances(model, batches)
    for name, stats in after.items():
        ratio = stats["variance_out"] / stats["variance_in"]
        print(f"{name}: Var_out / Var_in {ratio:.6f}")
        assert abs(ratio - 1) < 0.05, name
    values = {m.name: float(m.scale_factor) for m in model.scale_factors().values()}
    assert values == {k: v["value"] for k, v in fitted.items()}
    assert all(v > 0 for v in values.values())
    assert sum(abs(v - 1) > 0.05 for v in values.values()) >= 6  # the fit had work to do


def test_fixture_scale_file_reproduces_fairchem_outputs():
    """The fairchem 1.x checkpoint's weights without their scale factors, plus the factors
    through the JSON path: fairchem's outputs."""
    state = torch.load(CHECKPOINTS / "gemnet_t-fairchem1.pt", map_location="cpu", weights_only=True)
    args = {k: v for k, v in state["config"]["model"].items() if k != "name"}
    weights = {k: v for k, v in state["state_dict"].items() if not k.endswith(".scale_factor")}
    graph = dict(np.load(CHECKPOINTS / "graph.npz"))
    outputs = np.load(CHECKPOINTS / "outputs.npz")
    batch = fixture_batch({f"batch_{k}": v for k, v in graph.items()}, "batch")
    path = CHECKPOINTS / "gemnet_t-scale-factors.json"

    def check(model):
        out = model.eval()(batch)
        energy, forces = out["energy"].detach().numpy(), out["forces"].detach().numpy()
        ref_e, ref_f = outputs["gemnet_t_energy"], outputs["gemnet_t_forces"]
        assert np.abs(energy - ref_e).max() / np.abs(ref_e).max() < 1e-9
        assert np.abs(forces - ref_f).max() < 1e-9 * max(1.0, np.abs(ref_f).max())

    model = load_fairchem_state_dict(GemNetT(**args).double(), weights, read_scale_factors(path))
    check(model)
    # load_scale_factors on its own, after the weights (scale factors at 1 until then): the
    # same model.
    alone = GemNetT(**args).double()
    ones = {f"module.{k}": torch.tensor(1.0) for k in alone.scale_factors()}
    load_fairchem_state_dict(alone, {**weights, **ones})
    loaded = load_scale_factors(alone, path)
    assert len(loaded) == 12
    by_name = {m.name: float(m.scale_factor) for m in alone.scale_factors().values()}
    assert by_name == state["scale_dict"]
    expected = model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in alone.state_dict().items())


def test_unknown_missing_and_bad_names_fail_loudly(tmp_path):
    model = tiny_gemnet()
    good = read_scale_factors(CHECKPOINTS / "gemnet_t-scale-factors.json")
    with pytest.raises(KeyError, match="unexpected scale factor 'Bogus_1_sum'"):
        load_scale_factors(model, {**good, "Bogus_1_sum": 1.0})
    with pytest.raises(KeyError, match="unexpected scale factor 'IntBlock_3_sum'"):
        load_scale_factors(model, {**good, "IntBlock_3_sum": 1.0})  # only 2 blocks
    with pytest.raises(KeyError, match=r"missing scale factors: \['OutBlock_2_had'\]"):
        load_scale_factors(model, {k: v for k, v in good.items() if k != "OutBlock_2_had"})
    with pytest.raises(ValueError, match="not a number"):
        load_scale_factors(model, {**good, "OutBlock_0_sum": "1.5"})
    with pytest.raises(ValueError, match="finite"):
        load_scale_factors(model, {**good, "OutBlock_0_sum": float("nan")})
    with pytest.raises(ValueError, match="different values"):
        load_scale_factors(model, {**good, "out_blocks.0.scale_sum": 2.0})
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        load_scale_factors(model, tmp_path / "list.json")
    assert all(float(m.scale_factor) == 1.0 for m in model.scale_factors().values())
    # The key forms of the 2021 and 1.x code: names, module paths, state_dict names (with
    # "module." prefixes), {"value": x}, tensors; 0 is fairchem 1.x's "never fitted" = 1.
    names = {m.name: n for n, m in model.scale_factors().items()}
    mixed = {"comment": {"anything": 1}}
    for k, (name, value) in enumerate(good.items()):
        key = [name, names[name].removesuffix(".scale_factor"), "module.module." + names[name]][
            k % 3
        ]
        mixed[key] = [value, {"value": value}, torch.tensor(value, dtype=torch.float64)][k % 3]
    mixed["OutBlock_1_had"] = 0.0
    load_scale_factors(model, mixed)
    by_name = {m.name: float(m.scale_factor) for m in model.scale_factors().values()}
    assert by_name == {**good, "OutBlock_1_had": 1.0}


def test_gemnet_xl_intblock_keys_follow_the_papers_code():
    """gemnet-xl.json's IntBlock_{i}_sum values are not used and AtomUpdate_{i}_sum stays 1.0,
    as in the paper's code; every other published factor is loaded as it is."""
    published = read_scale_factors(PAPER / "gemnet-xl.json")
    assert len(published) == 32 and sum(k.startswith("IntBlock_") for k in published) == 6
    model = tiny_gemnet(num_blocks=6)
    loaded = load_scale_factors(model, PAPER / "gemnet-xl.json")
    by_name = {m.name: float(m.scale_factor) for m in model.scale_factors().values()}
    for i in range(1, 7):
        assert by_name[f"AtomUpdate_{i}_sum"] == 1.0 != published[f"IntBlock_{i}_sum"]
    others = {k: v for k, v in published.items() if not k.startswith("IntBlock_")}
    assert {k: by_name[k] for k in others} == others and len(loaded) == len(by_name) == 32
    # A file naming both keeps the AtomUpdate value.
    load_scale_factors(model, {**published, "AtomUpdate_2_sum": 1.25})
    assert float(model.int_blocks[1].atom_update.scale_sum.scale_factor) == 1.25
    # The dT file (AtomUpdate names) loads completely into a 3-block model.
    dt = read_scale_factors(PAPER / "gemnet-dT.json")
    model = tiny_gemnet(num_blocks=3)
    load_scale_factors(model, PAPER / "gemnet-dT.json")
    assert {m.name: float(m.scale_factor) for m in model.scale_factors().values()} == dt


def test_training_config_key_loads_the_file_into_the_model_and_its_state_dict(tmp_path):
    path = CHECKPOINTS / "gemnet_t-scale-factors.json"
    base = {"model": "gemnet-tiny", "train": [str(tmp_path)], "max_steps": 1}
    config = load_config(dict(base, scale_factors=str(path)))
    model = build_normalized_model(config, {"energy_mean": 0.0, "energy_std": 1.0})
    state = model.state_dict()  # what checkpoints save
    value = json.loads(path.read_text())["OutBlock_1_had"]  # float32 buffer until .to(dtype)
    assert float(state["model.out_blocks.1.scale_rbf_F.scale_factor"]) == pytest.approx(value, 1e-7)
    unloaded = build_normalized_model(config, {"energy_mean": 0, "energy_std": 1}, False)
    assert float(unloaded.model.out_blocks[1].scale_rbf_F.scale_factor) == 1.0
    with pytest.raises(TrainingError, match="scale_factors: model dimenetpp-tiny has none"):
        load_config(dict(base, model="dimenetpp-tiny", scale_factors=str(path)))
    bad = load_config(dict(base, model_args={"num_blocks": 3}, scale_factors=str(path)))
    with pytest.raises(TrainingError, match="missing scale factors"):
        build_normalized_model(bad, {"energy_mean": 0.0, "energy_std": 1.0})
