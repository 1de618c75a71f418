"""Defenses transform the shared update as documented; FedAvg updates are what local SGD gives."""

import copy
import math

import pytest
import torch

from leakkit.client import defenses
from leakkit.run.config import load_recipe
from leakkit.client.defenses import ClientContext, parse_chain, sweep
from leakkit.errors import ConfigError
from leakkit.client.observation import Observation
from leakkit.tasks import ImageClassification
from leakkit.client.victim import defend, observe, per_example_gradients
from conftest import real_image


def _client(batch=2, size=16):
    torch.manual_seed(0)
    task = ImageClassification.from_name("lenet", num_classes=10, image_size=size)
    x = torch.stack([torch.from_numpy(real_image(size, i)) for i in range(batch)])
    y = torch.arange(batch)
    return task, x, y, observe(task, x, y)


def _ctx(seed=0, **kw):
    return ClientContext(generator=torch.Generator().manual_seed(seed), **kw)


def _flat(obs):
    return torch.cat([g.double().flatten() for g in obs.gradients.values()])


def test_spec_parsing_and_errors():
    assert parse_chain("noise:std=1e-2+fp16") == [("noise", {"std": 0.01}), ("fp16", {})]
    assert sweep("prune:ratio=0.1,0.3") == ["prune:ratio=0.1", "prune:ratio=0.3"]
    assert sweep("noise:std=0,1e-3+fp16") == ["noise:std=0+fp16", "noise:std=0.001+fp16"]
    for bad, needle in [("nois", "unknown defense"), ("noise:sd=1", "unknown parameter"), ("noise:std=-1", "out of range"),
                        ("prune:ratio=1.5", "out of range"), ("noise:std=x", "expects a number"), ("", "empty"), ("clients:n=2.5", "integer")]:
        with pytest.raises(ConfigError, match=needle):
            parse_chain(bad)


def test_noise_has_the_requested_spread():
    *_, obs = _client()
    noisy = defenses.apply(obs, "noise:std=0.01", _ctx())
    diff = _flat(noisy) - _flat(obs)
    assert abs(float(diff.std()) - 0.01) < 5e-4
    lap = defenses.apply(obs, "laplace:scale=0.01", _ctx())
    # Laplace(b) has standard deviation b * sqrt(2)
    assert abs(float((_flat(lap) - _flat(obs)).std()) - 0.01 * math.sqrt(2)) < 1e-3
    assert noisy.extra["defenses"] == [{"name": "noise", "std": 0.01}]


def test_half_precision_survives_the_file(tmp_path):
    *_, obs = _client()
    for name, dtype in [("fp16", torch.float16), ("bf16", torch.bfloat16)]:
        path = defenses.apply(obs, name, _ctx()).save(tmp_path / f"{name}.safetensors")
        back = Observation.load(path)
        assert all(t.dtype == dtype for t in back.gradients.values())
        assert back.upcast().gradients["fc.weight"].dtype == torch.float32


def test_pruning_topk_mask_and_int8():
    *_, obs = _client()
    pruned = defenses.apply(obs, "prune:ratio=0.7", _ctx())
    for n, g in pruned.gradients.items():
        zeros = int((g == 0).sum())
        assert abs(zeros - round(0.7 * g.numel())) <= max(1, int((obs.gradients[n] == 0).sum()))
        kept = g[g != 0].abs()
        if kept.numel():  # survivors are the largest entries
            assert float(kept.min()) >= float(obs.gradients[n].abs().flatten().kthvalue(max(1, round(0.7 * g.numel()))).values) - 1e-12
    top = _flat(defenses.apply(obs, "topk:keep=0.05", _ctx()))
    assert abs(int((top != 0).sum()) - round(0.05 * top.numel())) <= 2
    masked = _flat(defenses.apply(obs, "mask:ratio=0.5", _ctx()))
    assert 0.45 < float((masked == 0).double().mean()) < 0.55
    q = defenses.apply(obs, "int8", _ctx())
    for n, g in q.gradients.items():
        assert len(torch.unique(g)) <= 255
        assert float((g - obs.gradients[n]).abs().max()) <= float(obs.gradients[n].abs().max()) / 127 / 2 + 1e-9


def test_clip_noise_is_dp_sgd():
    task, x, y, obs = _client(batch=3)
    per = per_example_gradients(task, x, y)
    ctx = _ctx(per_example=lambda: per)
    # no clipping in effect and no noise: the plain mean gradient
    same = defenses.apply(obs, "clip-noise:clip=1e6,multiplier=0", ctx)
    assert torch.allclose(_flat(same), _flat(obs), atol=1e-6)
    # every example's contribution is clipped to norm C, so the mean has norm <= C
    clipped = defenses.apply(obs, "clip-noise:clip=1e-3,multiplier=0", ctx)
    assert float(_flat(clipped).norm()) <= 1e-3 + 1e-9
    assert float(_flat(obs).norm()) > 1e-2
    eps = [defenses.dp_epsilon(m, sample_rate=0.01, steps=100, delta=1e-5) for m in (0.8, 1.6)]
    assert eps[0] > eps[1] > 0
    with pytest.raises(ConfigError, match="per-example"):
        defenses.apply(obs, "clip-noise", _ctx())


def test_aggregating_clients_equals_the_gradient_of_their_union():
    task, x, y, _ = _client(batch=4)
    mine = observe(task, x[:2], y[:2])
    theirs = observe(task, x[2:], y[2:])
    agg = defenses.apply(mine, "clients:n=2", _ctx(other_clients=lambda k: [theirs]))
    union = observe(task, x, y)
    assert torch.allclose(_flat(agg), _flat(union), atol=1e-6)


def test_fedavg_update_is_local_sgd_and_leaves_the_model_alone():
    task, x, y, _ = _client(batch=2)
    before = copy.deepcopy(task.model.state_dict())
    one = observe(task, x, y, local_steps=1)
    upd = observe(task, x, y, local_steps=3, local_lr=0.05, local_batch=1)
    assert upd.extra["fedavg"] == {"local_steps": 3, "local_lr": 0.05, "local_batch": 1}
    ref = copy.deepcopy(task.model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    for k in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ref(x[[k % 2]]), y[[k % 2]]).backward()
        opt.step()
    for n, p in ref.named_parameters():
        assert torch.allclose(upd.gradients[n], before[n] - p.detach(), atol=1e-6), n
    assert all(torch.equal(before[k], v) for k, v in task.model.state_dict().items())
    assert not torch.allclose(_flat(upd), 0.05 * 3 * _flat(one))


def test_engine_recovers_an_image_from_a_fedavg_update():
    from leakkit import metrics
    from leakkit.engine.matching import AttackConfig, reconstruct

    task, x, y, _ = _client(batch=1)
    upd = observe(task, x, y, local_steps=2, local_lr=0.05)
    rec = reconstruct(task, upd, AttackConfig(labels="idlg", restarts=1, steps=60, patience=0, stop_distance=1e-10), seed=0)
    psnr = metrics.psnr(x[0].numpy(), task.to_pixels(rec.inputs.double())[0].float().numpy())
    assert psnr > 30, psnr


def test_recipe_defense_overrides_and_table(tmp_path):
    assert load_recipe("dlg", ["defense=prune", "defense.ratio=0.3"]).defense == "prune:ratio=0.3"
    assert load_recipe("dlg", ["defense=noise:std=1e-3+fp16"]).defense == "noise:std=0.001+fp16"
    f = tmp_path / "r.toml"
    f.write_text('[defense]\nname = "mask"\nratio = 0.25\n[task]\nimage_size = 16\n')
    assert load_recipe(str(f)).defense == "mask:ratio=0.25"
    with pytest.raises(ConfigError, match="unknown parameter"):
        load_recipe("dlg", ["defense=prune", "defense.std=1"])
    with pytest.raises(ConfigError, match="local_steps"):
        load_recipe("dlg", ["client.local_steps=0"])


def test_defend_is_seeded_and_none_is_identity():
    task, x, y, obs = _client()
    assert defend(obs, "none", seed=0) is obs
    a, b = (defend(obs, "noise:std=0.1", seed=s) for s in (1, 1))
    c = defend(obs, "noise:std=0.1", seed=2)
    assert torch.equal(_flat(a), _flat(b)) and not torch.equal(_flat(a), _flat(c))


def test_a_pruning_aware_attacker_beats_pruning_that_stops_a_naive_one():
    from leakkit import metrics
    from leakkit.engine.matching import AttackConfig, reconstruct

    task, x, y, _ = _client(batch=1)
    pruned = defenses.apply(observe(task, x, y), "prune:ratio=0.3", _ctx())
    psnr, notes = {}, {}
    # the default reads the prune step from the update's metadata; prune_aware=false is the naive attacker
    for aware in (False, True):
        cfg = AttackConfig(labels="idlg", restarts=1, steps=60, patience=0, stop_distance=1e-10, prune_aware=aware)
        rec = reconstruct(task, pruned, cfg, seed=0)
        psnr[aware] = metrics.psnr(x[0].numpy(), task.to_pixels(rec.inputs.double())[0].float().numpy())
        notes[aware] = " ".join(rec.notes)
    assert psnr[True] > 30 and psnr[True] > psnr[False] + 10, psnr
    assert "pruning-aware" in notes[True] and "pruning-aware" not in notes[False]


def test_zeroing_defenses_are_read_from_the_metadata():
    from leakkit.client.defenses import zeroed_by

    def obs(records):
        return Observation(gradients={}, batch_size=1, reduction="mean", extra={"defenses": records})

    assert zeroed_by(obs([{"name": "noise", "std": 1e-3}, {"name": "fp16"}])) == []
    assert zeroed_by(obs([{"name": "prune", "ratio": 0.5}, {"name": "topk", "keep": 0.1}, {"name": "mask", "ratio": 0.2}])) == ["prune", "topk", "mask"]
    assert zeroed_by(obs([{"name": "not-a-defense"}])) == []


def test_noise_variance_follows_the_recorded_chain():
    from leakkit.client.defenses import noise_variance

    def obs(records, batch=4, reduction="mean"):
        return Observation(gradients={}, batch_size=batch, reduction=reduction, extra={"defenses": records})

    assert noise_variance(obs([])) == 0
    assert noise_variance(obs([{"name": "noise", "std": 1e-3}, {"name": "fp16"}])) == pytest.approx(1e-6)
    assert noise_variance(obs([{"name": "laplace", "scale": 1e-3}])) == pytest.approx(2e-6)
    # DP-SGD: N(0, (multiplier * clip)^2) on the sum, then the mean over the batch
    assert noise_variance(obs([{"name": "clip-noise", "multiplier": 2.0, "clip": 0.5}])) == pytest.approx((1.0 / 4) ** 2)
    assert noise_variance(obs([{"name": "clip-noise", "multiplier": 2.0, "clip": 0.5}], reduction="sum")) == pytest.approx(1.0)
    # averaging with 2 clients halves this client's noise std; noise added after it is not averaged
    chain = [{"name": "noise", "std": 2e-3}, {"name": "clients", "n": 2}, {"name": "noise", "std": 1e-3}]
    assert noise_variance(obs(chain)) == pytest.approx(1e-6 + 1e-6)


def test_noise_aware_attacker_beats_one_that_ignores_the_noise():
    from leakkit.engine import reconstruct
    from leakkit.run import vision

    base = ["task.image_size=16", "task.num_classes=10", "attack.restarts=1", "attack.steps=60", "defense=noise:std=3e-3"]
    psnr = {}
    for aware in ("true", "false"):
        recipe = load_recipe("idlg", base + [f"attack.noise_aware={aware}"])
        task = vision.build_task(recipe, seed=0)
        values = []
        for seed in (1, 2):
            batch = vision.make_batches(recipe, vision.load_samples(recipe, input_path=None, samples=1, seed=seed), seed=seed)[0]
            rec = reconstruct(task, vision.client_update(task, recipe, batch, seed=seed), recipe.attack, seed=0)
            assert bool(rec.notes) == (aware == "true")
            values.append(vision.score_images(task, batch, rec, recipe)[0]["psnr"])
        psnr[aware] = sum(values) / len(values)
    assert psnr["true"] > psnr["false"] + 2
