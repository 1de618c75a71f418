"""A real Flower simulation (Flower's own engine on Ray): the server captures every update without
changing what FedAvg aggregates, the attack recovers the clients' images, and an audit scores the capture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST
from leakkit.cli import main
from leakkit.client.observation import Observation

pytest.importorskip("flwr")
pytest.importorskip("ray")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 clients x 2 rounds of FedSGD on a 16 px LeNet, captured by the server."""
    out = tmp_path_factory.mktemp("fl") / "capture"
    assert main(["flower", "simulate", "rgap", *FAST, "--clients", "2", "--rounds", "2", "--workers", "2", "--out", str(out), "--quiet"]) == 0
    return out


def test_every_update_is_captured_with_its_protocol(capture: Path) -> None:
    index = json.loads((capture / "capture.json").read_text())
    assert index["flwr"] and index["strategy"] == "FedAvg"
    assert sorted((u["round"], u["client"]) for u in index["updates"]) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    obs = Observation.load(capture / "round-1" / "client-0.safetensors")
    assert obs.batch_size == 1 and not obs.extra.get("fedavg")
    assert obs.extra["flower"]["round"] == 1 and obs.extra["global_weights"] == "global.safetensors"
    # the truth is kept apart: the server's files hold parameters only
    assert set(load_file(str(capture / "round-1" / "client-0.safetensors"))) == set(load_file(str(capture / "round-1" / "global.safetensors")))
    assert (capture / "truth" / "round-1" / "client-0.safetensors").is_file()
    assert set(index["simulation"]["truth"]) == {"round-1/client-0", "round-1/client-1", "round-2/client-0", "round-2/client-1"}


def test_fedavg_aggregates_what_it_would_have_without_the_capture(capture: Path) -> None:
    """Round 2 starts from round 1's global model minus lr x the mean of the captured gradients."""
    g1, g2 = (load_file(str(capture / f"round-{r}" / "global.safetensors")) for r in (1, 2))
    updates = [Observation.load(capture / "round-1" / f"client-{k}.safetensors") for k in (0, 1)]
    for name, before in g1.items():
        expected = before.double() - 0.1 * torch.stack([u.gradients[name].double() for u in updates]).mean(0)
        assert torch.allclose(g2[name].double(), expected, atol=1e-6), name
    assert any(not torch.equal(g1[n], g2[n]) for n in g1)


def test_a_captured_update_is_attacked_at_its_rounds_weights(capture: Path, tmp_path: Path) -> None:
    out = tmp_path / "a"
    assert main(["attack", "rgap", "--gradients", str(capture / "round-2" / "client-1.safetensors"), "--out", str(out), "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"]["task"]["weights"].endswith("round-2/global.safetensors")
    assert config["recipe"]["task"]["image_size"] == 16  # the capture's model settings, not the recipe's defaults
    truth = load_file(str(capture / "truth" / "round-2" / "client-1.safetensors"))["pixels"].numpy()
    pixels = load_file(str(out / "recovered.safetensors"))["pixels"].numpy()
    assert 10 * np.log10(1 / np.mean((pixels - truth) ** 2)) >= 40


def test_audit_from_a_capture_scores_every_update(capture: Path, tmp_path: Path) -> None:
    out = tmp_path / "audit"
    assert main(["audit", "rgap", "--from", str(capture), "--out", str(out), "--quiet"]) == 0
    (row,) = json.loads((out / "summary.json").read_text())["settings"]
    assert row["n"] == 4 and row["batches_done"] == 4 and row["exact_rate"] == 1.0
    assert (out / "report.html").is_file()


def test_audit_from_refuses_a_changed_input(capture: Path, tmp_path: Path) -> None:
    index = json.loads((capture / "capture.json").read_text())
    index["simulation"]["truth"]["round-1/client-0"] = "0" * 16
    forged = tmp_path / "forged"
    forged.mkdir()
    for item in capture.iterdir():
        (forged / item.name).symlink_to(item)
    (forged / "capture.json").unlink()
    (forged / "capture.json").write_text(json.dumps(index))
    assert main(["audit", "rgap", "--from", str(forged), "--out", str(tmp_path / "x"), "--quiet", "--no-report"]) != 0


def test_capture_strategy_refuses_a_legacy_strategy(tmp_path: Path) -> None:
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.serverapp.strategy import FedAvg

    from leakkit.integrations.flower import CaptureStrategy

    with pytest.raises(TypeError, match="message-API"):
        CaptureStrategy(LegacyFedAvg(), out=tmp_path / "c")
    wrapped = CaptureStrategy(FedAvg(fraction_evaluate=0.0), out=tmp_path / "c")
    assert wrapped.fraction_evaluate == 0.0  # the inner strategy's settings stay readable
