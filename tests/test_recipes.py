from pathlib import Path

import pytest

from streamguard.errors import ConfigError
from streamguard.recipes import (
    find_recipe,
    list_recipes,
    load_recipe,
    parse_recipe,
    recipe_to_dict,
)


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
        ({"defense": {"temporal": "max"}}, "defense.temporal: expected one of"),
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


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_extends_a_shipped_recipe_deep_merges_under_the_child(tmp_path: Path) -> None:
    parent = load_recipe("synth-clip")
    child = load_recipe(_write(tmp_path / "mine.toml", """
extends = "synth-clip"
[attack]
iters = 3
areas = [0.2]
[train.classifier]
vortex = []
"""))
    assert child.name == "mine" and child.description == "" and child.path == tmp_path / "mine.toml"
    assert child.attack.iters == 3 and child.attack.areas == [0.2]  # the child wins; lists are replaced
    assert child.attack.methods == parent.attack.methods and child.attack.eps == parent.attack.eps  # tables merge
    assert child.train.classifier.vortex == [] and child.train.classifier.symmetries == ["hflip", "reverse"]
    assert child.train.steps == parent.train.steps and child.defense == parent.defense
    assert child.data == parent.data and child.model == parent.model


def test_extends_chains_and_paths_relative_to_the_file(tmp_path: Path) -> None:
    _write(tmp_path / "base" / "a.toml", 'name = "a"\ndescription = "base"\n[attack]\niters = 7\neps = 0.5\n')
    _write(tmp_path / "base" / "b.toml", 'extends = "a.toml"\n[attack]\neps = 0.25\n[data]\nsize = 32\n')
    c = load_recipe(_write(tmp_path / "c.toml", 'extends = "base/b.toml"\nname = "cee"\n[data]\nseed = 3\n'))
    assert c.name == "cee" and c.description == ""
    assert (c.attack.iters, c.attack.eps, c.data.size, c.data.seed) == (7, 0.25, 32, 3)


def test_extends_cycle_names_the_files(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.toml", 'extends = "b.toml"\n')
    _write(tmp_path / "b.toml", 'extends = "a.toml"\n')
    with pytest.raises(ConfigError, match="cycle") as err:
        load_recipe(a)
    assert "a.toml" in str(err.value) and "b.toml" in str(err.value)
    with pytest.raises(ConfigError, match="cycle"):
        load_recipe(_write(tmp_path / "self.toml", 'extends = "self.toml"\n'))


def test_extends_unknown_parent_is_one_line(tmp_path: Path) -> None:
    bad = _write(tmp_path / "bad.toml", 'extends = "no-such-recipe"\n')
    with pytest.raises(ConfigError, match=r"bad\.toml: extends: unknown recipe 'no-such-recipe'") as err:
        load_recipe(bad)
    assert "\n" not in str(err.value) and "synth-clip" in str(err.value)
    with pytest.raises(ConfigError, match="extends: expected a recipe name or path"):
        load_recipe(_write(tmp_path / "num.toml", "extends = 3\n"))


def test_extends_errors_name_the_file_that_has_them(tmp_path: Path) -> None:
    _write(tmp_path / "parent.toml", "[attack]\niters = 'many'\n")
    child = _write(tmp_path / "child.toml", 'extends = "parent.toml"\n')
    with pytest.raises(ConfigError, match=r"parent\.toml: attack\.iters: expected int"):
        load_recipe(child)
    _write(tmp_path / "ok.toml", "[attack]\niters = 2\n")
    with pytest.raises(ConfigError, match=r"child2\.toml: attack\.itres: unknown key"):
        load_recipe(_write(tmp_path / "child2.toml", 'extends = "ok.toml"\n[attack]\nitres = 3\n'))


@pytest.mark.parametrize("name", ["ablation-temporal"])
def test_shipped_recipes_that_extend_synth_clip(name: str) -> None:
    assert "extends" in find_recipe(name).read_text()
    assert load_recipe(name).train == load_recipe("synth-clip").train


def test_experiment_recipes_parse() -> None:
    experiments = Path(__file__).resolve().parents[1] / "experiments"
    clip = load_recipe("synth-clip")
    fast = load_recipe(experiments / "synth-fast-rotation.toml")
    assert fast.name == "synth-fast-rotation" and fast.data.rotation == [12.0, 20.0]
    assert fast.train.classifier.vortex == [] and fast.train.classifier.symmetries == [] and fast.train.eval_every == 100
    sym = load_recipe(experiments / "synth-symmetry.toml")
    assert sym.train.classifier.vortex == [] and sym.train.classifier.symmetries == clip.train.classifier.symmetries
    assert (sym.model, sym.defense, sym.data, sym.attack) == (clip.model, clip.defense, clip.data, clip.attack)
