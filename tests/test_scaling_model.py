"""The scaling and memory models of the paper's Fig. 2a and Table 4 (`graphpar.scaling_model`):
the formulas on hand-made cases, the memory model's validation on the committed 1000-atom slab
measurements, and the report's figures and tables from the committed predictions."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from graphpar import scaling_model as sm
from graphpar.report import figures, sources, tables

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "results" / "benchmarks"


# ---- formulas ------------------------------------------------------------------------------


def test_ring_allreduce_sends_twice_the_payload_less_one_share():
    # 2 (n - 1) / n x bytes at the bandwidth, plus 2 (n - 1) latencies.
    assert sm.ring_allreduce_seconds(1e9, 2, 100e9) == pytest.approx(0.01)
    assert sm.ring_allreduce_seconds(1e9, 4, 100e9, latency=1e-6) == pytest.approx(
        1.5e9 / 100e9 + 6e-6
    )
    assert sm.ring_allreduce_seconds(1e9, 1, 100e9) == 0.0


def test_links_inside_and_across_nodes():
    hardware = sm.PRESETS["v100-1nic"]
    assert sm.link(hardware, 8) == (150e9, hardware.nvlink_latency)
    assert sm.link(hardware, 16) == (12.5e9, hardware.network_latency)
    assert sm.link(hardware, 16, rings_per_node=4)[0] == pytest.approx(12.5e9 / 4)
    # The world ring over 4 nodes crosses each node's network once: 2 (W - 1) / W x bytes.
    world = sm.gradient_seconds(4e8, 1, 32, hardware, "world")
    assert world == pytest.approx(2 * 31 / 32 * 4e8 / 12.5e9 + 62 * hardware.network_latency)
    # Ours at G = 8, D = 4: an NVLink ring, then 8 data-parallel rings sharing each node's NIC.
    ours = sm.gradient_seconds(4e8, 8, 4, hardware, "ours")
    expected = sm.ring_allreduce_seconds(4e8, 8, 150e9, hardware.nvlink_latency)
    expected += sm.ring_allreduce_seconds(4e8, 4, 12.5e9 / 8, hardware.network_latency)
    assert ours == pytest.approx(expected)
    with pytest.raises(ValueError):
        sm.gradient_seconds(4e8, 1, 2, hardware, "tree")


def test_exposed_gradient_time_overlaps_backward_but_not_the_last_bucket():
    assert sm.exposed_gradient_seconds(0.1, 0.04, 0.01, overlap=True) == pytest.approx(0.06)
    assert sm.exposed_gradient_seconds(0.1, 0.5, 0.01, overlap=True) == pytest.approx(0.001)
    assert sm.exposed_gradient_seconds(0.1, 0.5, 0.01, overlap=False) == 0.1


def test_compute_time_and_calibration_to_a_sustained_rate():
    operations = {
        "matmul_flops": 2e12,
        "gather_bytes": 1e9,
        "scatter_bytes": 1e9,
        "other_elements": 2.5e9,  # 2 x 4 bytes each: 20 GB
    }
    hardware = sm.calibrate(sm.PRESETS["v100-dgx1"], operations, 32e12)
    memory = 22e9 / 900e9
    assert sm.memory_traffic_bytes(operations) == 22e9
    assert hardware.matmul_flops == pytest.approx(2e12 / (2e12 / 32e12 - memory))
    # The reference step then runs at exactly the rate it was calibrated to.
    assert 2e12 / sm.compute_seconds(operations, hardware) == pytest.approx(32e12)
    with pytest.raises(ValueError):
        sm.calibrate(sm.PRESETS["v100-dgx1"], {**operations, "other_elements": 1e12}, 32e12)


def test_group_time_is_the_slowest_rank_and_efficiency_per_gpu():
    hardware = dataclasses.replace(sm.PRESETS["v100-dgx1"], matmul_flops=1e12)
    quiet = {"gather_bytes": 0, "scatter_bytes": 0, "other_elements": 0}
    collective = {"kind": "all_gather", "group_size": 2, "ring_send_bytes": 150e9 * 0.01}
    ranks = [
        {"operations": {"matmul_flops": 1e12, **quiet}, "collectives": [collective]},
        {"operations": {"matmul_flops": 0.5e12, **quiet}, "collectives": [collective]},
    ]
    group = sm.group_seconds(ranks, hardware)
    assert group["total"] == pytest.approx(1.0 + 0.01 + hardware.nvlink_latency)
    assert group["imbalance"] == pytest.approx(group["total"] / group["mean_rank"] - 1)
    # 8 GPUs doing 8x the work of one in 1.25x its time: 80% weak-scaling efficiency.
    assert sm.weak_scaling_efficiency(8e12, 8, 1.25, 1e12, 1.0) == pytest.approx(0.8)


def test_expected_slowest_group_of_equal_structures_is_their_sum():
    import numpy as np

    pool = np.arange(16)
    seconds = np.full(16, 0.5)
    slowest, work = sm.expected_group_max(pool, seconds, seconds, seconds * 2, 2, 4, 5, True)
    assert slowest == pytest.approx(1.0)
    assert work == pytest.approx(8.0)


def test_memory_state_and_minimal_g():
    state = sm.state_bytes(1000)
    assert state["adamw_amsgrad"] == 12000 and sum(state.values()) == 28000
    coefficients = {"triplets": 10.0, "edges": 100.0, "all_edges": 1.0, "atoms": 0.0}
    counts = {"triplets": 100, "edges": 10, "all_edges": 50, "atoms": 5}
    parts = sm.memory_bytes(1000, coefficients, counts, peak_factor=2.0)
    assert parts["activations"] == pytest.approx(2 * (1000 + 1000 + 50))
    assert parts["total"] == pytest.approx(28000 + 4100)
    assert sm.minimal_gp_size({1: 40e9, 2: 30e9, 4: 20e9}, 32e9) == 2
    assert sm.minimal_gp_size({1: 40e9}, 32e9) is None
    assert sm.usable_bytes(sm.PRESETS["v100-dgx1"]) == pytest.approx(31 * 2**30 * 0.9)


def test_activation_coefficients_are_recovered_from_exact_samples():
    truth = {"triplets": 300.0, "edges": 5000.0, "all_edges": 800.0, "atoms": 0.0}
    samples = []
    for triplets, edges, all_edges, atoms in [
        (1e5, 3e3, 3e3, 70), (2e5, 6e3, 6e3, 150), (1e5, 3.2e3, 6e3, 150),
        (5e4, 1.4e3, 6e3, 150), (3e5, 9e3, 9e3, 220), (7e4, 2.5e3, 9e3, 220),
    ]:  # fmt: skip
        counts = {"triplets": triplets, "edges": edges, "all_edges": all_edges, "atoms": atoms}
        samples.append({**counts, "bytes": sm.activation_bytes(truth, counts)})
    fitted = sm.fit_activation_coefficients(samples)
    for key, value in truth.items():
        assert fitted[key] == pytest.approx(value, rel=1e-6, abs=1e-6)


# ---- the committed predictions -------------------------------------------------------------


@pytest.fixture(scope="module")
def memory_record():
    return json.loads((BENCHMARKS / "memory_model.json").read_text())


@pytest.fixture(scope="module")
def scaling_record():
    return json.loads((BENCHMARKS / "scaling_model.json").read_text())


def test_memory_model_predicts_the_measured_slab_within_15_percent(memory_record):
    """The committed coefficients and peak factor, times the largest rank's counts on the
    1000-atom slab, against bench/gp_memory.py's committed measurements (never fitted)."""
    measured = json.loads((BENCHMARKS / "gp_memory.json").read_text())["runs"]
    assert set(memory_record["validation"]) == set(measured)
    for name, entry in memory_record["validation"].items():
        assert {row["G"] for row in entry["rows"]} == {int(g) for g in measured[name]["G"]}
        for row in entry["rows"]:
            ours = sm.activation_bytes(
                entry["coefficients_bytes"], row["largest_rank"], entry["peak_factor"]
            )
            truth = measured[name]["G"][str(row["G"])]["max_activation_mb"] * 2**20
            assert ours / 2**20 == pytest.approx(row["predicted_mb"])
            assert abs(ours / truth - 1) <= 0.15, (name, row["G"], ours / truth)


def test_memory_model_covers_table4(memory_record):
    table4 = memory_record["table4"]
    assert [entry["paper_G"] for entry in table4.values()] == [1, 2, 4, 8]
    usable = memory_record["settings"]["usable_bytes"]
    for entry in table4.values():
        totals = {int(g): parts["total"] for g, parts in entry["typical"]["per_rank_bytes"].items()}
        assert entry["typical"]["minimal_G"] == sm.minimal_gp_size(totals, usable)
        state = sm.state_bytes(entry["parameters"])
        for parts in entry["typical"]["per_rank_bytes"].values():
            assert parts["total"] == pytest.approx(sum(state.values()) + parts["activations"])


@pytest.mark.parametrize("name", ["scaling_model", "memory_model", "gpu_step", "gpu_step_125m"])
def test_summaries_have_the_benchmark_keys(name):
    summary = json.loads((BENCHMARKS / f"{name}.json").read_text())["summary"]
    keys = {"metric", "ours", "baseline", "baseline_name", "ratio", "goal"}
    assert keys | {"higher_is_better", "machine"} <= set(summary)


def test_h200_compute_comes_from_the_measured_gpu_step(scaling_record):
    # bench/gpu_step.py's float32 step of the 125M model on a lent H200 sets the h200 preset's
    # sustained matmul rate (bench/scaling_model.py, measured_rate); the other presets keep the
    # V100's calibrated fraction of their peak.
    record = json.loads((BENCHMARKS / "gpu_step_125m.json").read_text())
    (run,) = [r for r in record["runs"] if r["mode"] == "float32"]
    assert run["model"] == "gemnet-125m" and "H200" in record["device"]
    expected = sm.calibrate(sm.PRESETS["h200"], run["operations"], run["tflops"] * 1e12)
    h200 = scaling_record["hardware"]["h200"]
    assert h200["matmul_flops"] == pytest.approx(expected.matmul_flops)
    assert "gpu_step_125m.json" in h200["sources"]["rate"]
    # The step's own arithmetic: its products over its median time.
    assert run["tflops"] == pytest.approx(run["matmul_flops"] / run["step_s_median"] / 1e12)
    assert run["matmul_flops"] == run["operations"]["matmul_flops"]


def test_scaling_model_has_every_curve_point(scaling_record):
    for preset, variants in scaling_record["points"].items():
        for points in variants.values():
            gpus = {s: sorted(p["gpus"] for p in points if p["series"] == s) for s in ("gp",)}
            gpus["gp_dp"] = sorted(p["gpus"] for p in points if p["series"] == "gp_dp")
            gpus["dp"] = sorted(p["gpus"] for p in points if p["series"] == "dp")
            assert gpus == {
                "gp": [1, 2, 4, 8],
                "gp_dp": [32, 64, 128, 256],
                "dp": [1, 2, 4, 8, 16, 32],
            }, preset
            base = next(p for p in points if p["series"] == "gp" and p["gpus"] == 1)
            assert base["efficiency"] == pytest.approx(1.0)
    assert {(row["series"], row["gpus"]) for row in scaling_record["comparison"]} == {
        ("gp", 8),
        ("dp", 32),
        ("gp_dp", 256),
    }


# ---- report builders -----------------------------------------------------------------------


def test_scaling_model_table_rows(scaling_record):
    frame = tables.build_scaling_model_table(BENCHMARKS)
    runs = sum(len(variants) for variants in scaling_record["points"].values())
    assert len(frame) == 3 * runs
    headline = frame[(frame["Preset"] == "v100-dgx1") & (frame["Variant"] == "headline")]
    assert list(headline["Paper [%]"]) == ["79", "75", "47"]
    for row in headline.itertuples():
        predicted = float(row[5])
        assert row[7] == f"{predicted - float(row[6]):+.1f}"
    markdown = tables.render_model_markdown("scaling_model", frame, BENCHMARKS)
    assert markdown.startswith("# Fig. 2a") and "v100-dgx1" in markdown


def test_memory_model_table_rows(memory_record, tmp_path):
    frame = tables.build_memory_model_table(BENCHMARKS)
    assert list(frame["Model"]) == list(memory_record["table4"])
    assert list(frame["Paper G"]) == ["1", "2", "4", "8"]
    for row, entry in zip(frame.itertuples(), memory_record["table4"].values(), strict=True):
        minimal = entry["typical"]["minimal_G"]
        assert row[-4] == ("n/a" if minimal is None else str(minimal))
        assert row[-1] == ("yes" if minimal == entry["paper_G"] else "no")
    # Through write_table, from a results folder without benchmarks: the committed files.
    paths = tables.write_table("memory_model", tmp_path, REPO / "results" / "paper", tmp_path)
    assert "Validation on bench/gp_memory.py" in paths["md"].read_text()


def test_model_figures_plot_the_committed_predictions(tmp_path, scaling_record):
    data = figures._scaling_model_data(BENCHMARKS)
    variants = scaling_record["points"].values()
    points = sum(len(points) for by_variant in variants for points in by_variant.values())
    assert len(data) == points
    assert set(data["series"]) == {"gp", "gp_dp", "dp"}
    memory = figures._memory_model_data(BENCHMARKS)
    assert set(memory["kind"]) == {"table4", "validation"}
    for name in ("scaling_model", "memory_model"):
        paths = figures.write_figure(name, tmp_path, REPO / "results/paper", BENCHMARKS, tmp_path)
        assert all(path.stat().st_size > 0 for path in paths.values())
    # Without predictions the figures still draw, with a note and an empty CSV.
    empty = tmp_path / "empty"
    empty.mkdir()
    paths = figures.write_figure("scaling_model", tmp_path, REPO / "results/paper", empty, empty)
    assert paths["csv"].read_text().startswith("preset,variant")
    assert sources.model_prediction(empty, "scaling_model") is None
    assert not math.isnan(scaling_record["summary"]["ours"])
