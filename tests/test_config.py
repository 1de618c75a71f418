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
