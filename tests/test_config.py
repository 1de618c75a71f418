from pathlib import Path

import pytest

from leakkit.run.config import bundled_recipes, load_recipe, valid_keys
from leakkit.errors import ConfigError


def test_bundled_recipes_load_and_cite():
    names = set(bundled_recipes())
    assert {"dlg", "idlg", "inverting-gradients"} <= names
    for name in names:
        recipe = load_recipe(name)
        assert recipe.citation and "20" in recipe.citation  # a year
        text = bundled_recipes()[name].read_text()
        assert text.startswith("#") and "Threat model" in text and "Deviation" in text


def test_overrides_are_typed():
    r = load_recipe("dlg", ["attack.steps=7", "attack.lr=0.5", "attack.box=true", "task.mean=0.5,0.4,0.3", "attack.priors.tv=0.01"])
    assert r.attack.steps == 7 and isinstance(r.attack.steps, int)
    assert r.attack.lr == 0.5 and r.attack.box is True
    assert r.task.mean == [0.5, 0.4, 0.3]
    assert r.attack.priors == {"tv": 0.01}


@pytest.mark.parametrize(
    "override, needle",
    [
        ("attack.steps=many", "attack.steps expects an integer, got 'many'"),
        ("attack.box=maybe", "true or false"),
        ("attack.stepz=3", "valid: attack.objective"),
        ("nosection.x=1", "valid: task.name"),
        ("attack.steps", "section.key=value"),
        ("attack.objective=l3", "unknown objective 'l3'; valid: cosine, l2, l2+l1"),
        ("attack.priors.smooth=1", "unknown prior 'smooth'"),
        ("attack.start=rgap", "attack.start must be one of"),
        ("attack.steps=0", "at least 1"),
        ("data.batch_size=0", "at least 1"),
        ("task.mean=0.5", "one value per channel"),
    ],
)
def test_bad_overrides_name_the_problem(override, needle):
    with pytest.raises(ConfigError, match=None) as e:
        load_recipe("dlg", [override])
    assert needle in str(e.value)


def test_unknown_recipe_lists_bundled():
    with pytest.raises(ConfigError) as e:
        load_recipe("dlgg")
    assert "dlg" in str(e.value) and "inverting-gradients" in str(e.value)


def test_recipe_file_path_and_bad_toml(tmp_path: Path):
    good = tmp_path / "mine.toml"
    good.write_text('description = "x"\n[attack]\nsteps = 5\n')
    assert load_recipe(str(good)).attack.steps == 5
    bad = tmp_path / "bad.toml"
    bad.write_text("[attack\nsteps = 5")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_recipe(str(bad))
    typed = tmp_path / "typed.toml"
    typed.write_text('[attack]\nsteps = "five"\n')
    with pytest.raises(ConfigError, match="attack.steps expects an integer"):
        load_recipe(str(typed))
    extra = tmp_path / "extra.toml"
    extra.write_text("[defence]\nx = 1\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_recipe(str(extra))


def test_valid_keys_cover_every_section():
    keys = valid_keys()
    assert "attack.objective" in keys and "data.batch_size" in keys and "metrics.success_psnr" in keys


def test_underdetermined_table_adapts_the_attack_and_says_so(tmp_path):
    import json

    from leakkit.run.runner import run_recipe

    assert load_recipe("dlg").adapted_to(1).adapted == {}
    # one example the layers do not determine (a 64 px LeNet) is adapted too
    assert load_recipe("dlg").adapted_to(1, determined=lambda: False).attack.labels == "batch"
    adapted = load_recipe("dlg", ["attack.steps=7", "attack.priors.tv=0.5"]).adapted_to(4)
    assert (adapted.attack.labels, adapted.attack.feature_weight, adapted.attack.init) == ("batch", 1.0, "mid")
    # the user's own overrides win over the table
    assert adapted.attack.steps == 7 and adapted.attack.priors == {"tv": 0.5}
    assert "attack.steps" not in adapted.adapted and adapted.adapted["attack.labels"] == "batch"
    # feature targets need one gradient: a FedAvg update keeps the recipe's (off)
    assert load_recipe("dlg").adapted_to(4, local_steps=2).attack.feature_weight == 0.0
    recipe = load_recipe("dlg", ["task.image_size=16", "task.num_classes=10", "data.batch_size=2", "attack.steps=2"])
    assert recipe.attack.labels == "soft"  # the recipe itself is unchanged; runs adapt it
    run_recipe(recipe, out=tmp_path / "run", samples=2, seed=0)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["recipe"]["adapted"]["attack.labels"] == "batch" and config["recipe"]["attack"]["labels"] == "batch"


def test_underdetermined_table_rejects_keys_that_are_not_attack_settings(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text('[task]\nimage_size = 16\n[underdetermined]\nlabels = "batch"\nbatch_size = 4\n')
    with pytest.raises(ConfigError, match=r"\[underdetermined\].*batch_size"):
        load_recipe(str(f))


def test_generic_determinacy_tells_batches_and_large_images_apart():
    import torch

    from leakkit.tasks import ImageClassification
    from leakkit.vision.determinacy import determined_in_general

    torch.manual_seed(0)
    small = ImageClassification.from_name("lenet", num_classes=100, image_size=32)
    assert determined_in_general(small, 1) and not determined_in_general(small, 4)
    assert not determined_in_general(ImageClassification.from_name("lenet", num_classes=100, image_size=64), 1)
