import json
import struct

import pytest
import torch

from leakkit.errors import InputError, ObservationMismatch
from leakkit.client.observation import Observation
from leakkit.tasks import ImageClassification
from leakkit.client.victim import observe
from conftest import real_image


def _obs(size=16, model="lenet"):
    torch.manual_seed(0)
    task = ImageClassification.from_name(model, num_classes=10, image_size=size)
    x = torch.from_numpy(real_image(size))[None]
    return task, observe(task, x, torch.tensor([3]), model_name=model)


def test_safetensors_round_trip_keeps_tensors_and_metadata(tmp_path):
    task, obs = _obs()
    path = obs.save(tmp_path / "g.safetensors")
    back = Observation.load(path)
    assert list(back.gradients) == list(obs.gradients)
    for k in obs.gradients:
        assert torch.equal(back.gradients[k], obs.gradients[k])
    assert back.batch_size == 1 and back.reduction == "mean" and back.fingerprint == obs.fingerprint
    back.check_against(task.model)


def test_file_is_safetensors_not_pickle(tmp_path):
    _, obs = _obs()
    raw = obs.save(tmp_path / "g.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])  # plain JSON header, then raw tensor bytes
    assert "fc.weight" in header and json.loads(header["__metadata__"]["leakkit"])["batch_size"] == 1
    assert not raw.startswith(b"\x80")  # pickle protocol marker


def test_mismatched_names_and_shapes_are_refused():
    _, obs = _obs(model="lenet")
    other = ImageClassification.from_name("convnet", num_classes=10, image_size=16)
    with pytest.raises(ObservationMismatch, match="names do not match"):
        obs.check_against(other.model)
    bigger = ImageClassification.from_name("lenet", num_classes=20, image_size=16)
    with pytest.raises(ObservationMismatch, match="shapes do not match.*fc.weight"):
        obs.check_against(bigger.model)


def test_garbage_and_missing_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        Observation.load(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x80\x04not a safetensors file at all")
    with pytest.raises(InputError, match="not a readable safetensors file"):
        Observation.load(junk)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(plain))
    with pytest.raises(InputError, match="no leakkit metadata"):
        Observation.load(plain)


def _save_raw(path, tensors, meta):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"leakkit": json.dumps(meta)})
    return path


def test_a_file_whose_tensors_differ_from_its_metadata_is_named(tmp_path):
    _, obs = _obs()
    meta = obs.metadata()
    tensors = {k: v.contiguous() for k, v in obs.gradients.items()}
    first = next(iter(tensors))
    lacking = _save_raw(tmp_path / "lacking.safetensors", {k: v for k, v in tensors.items() if k != first}, meta)
    with pytest.raises(InputError, match=f"missing {first}"):
        Observation.load(lacking)
    extra = _save_raw(tmp_path / "extra.safetensors", {**tensors, "stowaway": torch.zeros(2)}, meta)
    with pytest.raises(InputError, match="extra stowaway"):
        Observation.load(extra)
    nan = _save_raw(tmp_path / "nan.safetensors", {**tensors, first: torch.full_like(tensors[first], float("nan"))}, meta)
    with pytest.raises(InputError, match=f"NaN or inf in {first}"):
        Observation.load(nan)
    ints = _save_raw(tmp_path / "ints.safetensors", {**tensors, first: tensors[first].to(torch.int32)}, meta)
    with pytest.raises(InputError, match="not floating point"):
        Observation.load(ints)


def test_engine_pairs_tensors_by_name_when_one_is_withheld():
    from leakkit.engine import AttackConfig, reconstruct

    task, obs = _obs()
    first = next(iter(obs.gradients))
    partial = Observation({k: v for k, v in obs.gradients.items() if k != first}, obs.batch_size, obs.reduction, obs.model, obs.fingerprint)
    with pytest.warns(UserWarning, match="withholds 1 parameter"):
        rec = reconstruct(task, partial, AttackConfig(labels="idlg", restarts=1, steps=3, patience=0), seed=0)
    assert rec.inputs.shape == (1, 3, 16, 16)
