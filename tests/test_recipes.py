from pathlib import Path

import pytest

from streamguard.errors import ConfigError
from streamguard.recipes import list_recipes, load_recipe, parse_recipe, recipe_to_dict


def test_every_shipped_recipe_parses() -> None:
    names = list_recipes()
    assert {"synth-clip", "synth-detect", "ucf101-mars", "camera"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        assert recipe.name == name
        assert recipe.path is not None and recipe.path.name == f"{name}.toml"


def test_paper_settings_in_ucf101_recipe() -> None:
    recipe = load_recipe("ucf101-mars")
    assert (recipe.attack.eps, recipe.attack.step, recipe.attack.iters) == (1.0, 0.2, 20)
    assert recipe.attack.areas == [0.05, 0.10]
    assert recipe.data.subset == 202 and recipe.data.clip_len == 16 and recipe.data.size == 112
    assert (recipe.train.lr, recipe.train.batch) == (1e-4, 36)


def test_defaults_fill_missing_sections() -> None:
    recipe = parse_recipe({"name": "x", "attack": {"iters": 3}})
    assert recipe.attack.iters == 3 and recipe.attack.eps == 1.0
    assert recipe.defense.threshold == 0.5


@pytest.mark.parametrize(
    ("table", "field"),
    [
        ({"attack": {"iters": "20"}}, "attack.iters: expected int"),
        ({"attack": {"itres": 20}}, "attack.itres: unknown key"),
        ({"bogus": {}}, "bogus: unknown key"),
        ({"defense": {"temporal": "median"}}, "defense.temporal: expected one of"),
        ({"attack": {"areas": [0.05, "x"]}}, "attack.areas[1]: expected float"),
        ({"attack": {"random_init": 1}}, "attack.random_init: expected bool"),
        ({"pipeline": {"batch": True}}, "pipeline.batch: expected int"),
        ({"model": "tiny3d"}, "model: expected a table"),
    ],
)
def test_bad_recipes_name_the_field(table: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        parse_recipe(table)


def test_int_is_accepted_where_float_expected() -> None:
    recipe = parse_recipe({"attack": {"eps": 1}})
    assert recipe.attack.eps == 1.0 and isinstance(recipe.attack.eps, float)


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[attack\niters = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="recipe not found"):
        load_recipe(tmp_path / "missing.toml")
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("[attack]\neps = 'big'\n")
    with pytest.raises(ConfigError, match=r"wrong\.toml: attack\.eps"):
        load_recipe(wrong)


def test_recipe_to_dict_is_plain() -> None:
    out = recipe_to_dict(load_recipe("synth-clip"))
    assert out["attack"]["iters"] == 20 and out["path"].endswith("synth-clip.toml")
