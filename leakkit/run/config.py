"""Recipes: declarative TOML files resolved into typed dataclasses, plus `key=value` overrides."""

from __future__ import annotations

import copy
import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from leakkit.engine.matching import AttackConfig
from leakkit.errors import ConfigError
from leakkit.tasks import MODALITIES, modality_of
from leakkit.text.attack import TextAttackSettings


@dataclass
class TaskSpec:
    """`[task]`: name in TASKS and the options its builder takes.

    Image tasks use num_classes, image_size, channels, mean, std. Text tasks use model (a directory,
    a cached hub id or "minilm"), num_classes (classification), max_length (0 = the model's limit),
    mask_probability (masked LM) and frozen: parameter-name fragments whose gradients the client
    does not share (e.g. "word_embeddings"). Image tasks also take a user's class as
    model="FILE.py:Class". weights="FILE.safetensors" (a state_dict of the model) replaces the seeded or
    pretrained weights, for either modality.
    """

    name: str = "image-classification"
    model: str = "lenet"
    weights: str = ""
    num_classes: int = 100
    image_size: int = 32
    channels: int = 3
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    max_length: int = 0
    mask_probability: float = 0.15
    frozen: list[str] = field(default_factory=list)


@dataclass
class DataSpec:
    """`[data]`: where private examples come from. samples: images attacked when --samples is absent."""

    source: str = "embedded"
    path: str = ""
    batch_size: int = 1
    samples: int = 1
    reduction: str = "mean"


@dataclass
class ClientSpec:
    """`[client]`: the victim's local training. local_steps=1 shares one gradient (FedSGD); more
    steps share the weight difference after that many SGD steps at local_lr (FedAvg), each on
    local_batch examples of the client's data in turn (0 = all of them)."""

    local_steps: int = 1
    local_lr: float = 0.1
    local_batch: int = 0


@dataclass
class MetricsSpec:
    """`[metrics]`: success_psnr is the PSNR (dB) at which an image counts as recovered (the `exact`
    tier); success_rouge1 the ROUGE-1 at which a sentence does (defaults: the tasks' modalities).
    close_psnr and recognisable_ssim start the `close` and `recognisable` image tiers; success_tier
    is the tier an audit counts as a successful attack (a privacy verdict is about recognition)."""

    success_psnr: float = MODALITIES["image"].threshold
    success_rouge1: float = MODALITIES["text"].threshold
    close_psnr: float = 30.0
    recognisable_ssim: float = 0.5
    success_tier: str = "recognisable"

    def threshold(self, score: str) -> float:
        """The success threshold of a modality's score ("psnr", "rouge1")."""
        return float(getattr(self, f"success_{score}"))

    def tiers(self) -> Any:
        """Image leakage tiers: exact from success_psnr, close from close_psnr, recognisable from recognisable_ssim."""
        from leakkit.metrics import TierThresholds

        return TierThresholds(exact_psnr=self.success_psnr, close_psnr=self.close_psnr, recognisable_ssim=self.recognisable_ssim)


@dataclass
class UtilitySpec:
    """`[utility]`: what a defense costs, measured by an audit. data is a labelled sentence file
    (.tsv/.csv, as --input reads it) for text classification (image tasks train on scikit-learn's
    digits); steps, batch and lr set the brief training (0 = the task's default)."""

    data: str = ""
    steps: int = 0
    batch: int = 0
    lr: float = 0.0


@dataclass
class AttackChoice:
    """`[attack] method`: which attack family runs (a name in `leakkit list attacks`); candidates: the
    bundled recipes whose attacks `auto` tries, in order."""

    method: str = "match"
    candidates: list[str] = field(default_factory=list)


@dataclass
class Recipe:
    """A resolved recipe: one published method's setting, ready to run."""

    name: str
    description: str = ""
    citation: str = ""
    task: TaskSpec = field(default_factory=TaskSpec)
    data: DataSpec = field(default_factory=DataSpec)
    attack: AttackConfig = field(default_factory=AttackConfig)
    choice: AttackChoice = field(default_factory=AttackChoice)
    text: TextAttackSettings = field(default_factory=TextAttackSettings)
    metrics: MetricsSpec = field(default_factory=MetricsSpec)
    client: ClientSpec = field(default_factory=ClientSpec)
    utility: UtilitySpec = field(default_factory=UtilitySpec)
    defense: str = "none"
    # `[underdetermined]`: `attack.*` settings for updates that do not determine their inputs on their own
    # (more than one example, or larger inputs than the layers pin down); raw values as the file writes them
    underdetermined: dict[str, Any] = field(default_factory=dict)
    # `attack.*` keys the user set by override: an `[underdetermined]` table never replaces them
    explicit: set[str] = field(default_factory=set, repr=False, compare=False)
    # what `adapted_to` changed: `attack.KEY` -> value, written into config.json
    adapted: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        """The attack family this recipe runs."""
        return self.choice.method

    def attacked_as(self, name: str, *, batch_size: int | None = None, local_steps: int | None = None,
                    determined: Callable[[], bool] | None = None) -> "Recipe":
        """This setting (task, data, client, defense, metrics) attacked as the bundled recipe `name`
        attacks updates of `batch_size` examples after `local_steps` client steps (defaults: this setting's),
        adapted as `adapted_to` does."""
        other = load_recipe(name).adapted_to(self.data.batch_size if batch_size is None else batch_size,
                                             local_steps=self.client.local_steps if local_steps is None else local_steps,
                                             determined=determined)
        return dataclasses.replace(self, name=name, attack=other.attack, choice=other.choice, text=other.text,
                                   underdetermined=other.underdetermined, adapted=other.adapted)

    def adapted_to(self, batch_size: int, *, local_steps: int | None = None,
                   determined: Callable[[], bool] | None = None) -> "Recipe":
        """This recipe as it attacks an update of `batch_size` examples.

        Above one example, or where the update does not determine one example's input layer by layer
        (`determined()` false: R-GAP's count, `leakkit.vision.determinacy`; called only for a recipe with
        a table at batch size 1, since it costs a forward and backward pass; None: determined), the `[underdetermined]` table's
        `attack.*` settings replace the recipe's, except keys the user overrode; what changed is listed in
        `adapted` (and so in config.json). Feature targets need a single gradient, so a FedAvg update
        (local_steps > 1) keeps the recipe's feature_weight. Returns a copy; this recipe is unchanged.
        """
        out = copy.deepcopy(self)
        out.adapted = {}
        if not self.underdetermined or (batch_size <= 1 and (determined is None or determined())):
            return out
        steps = self.client.local_steps if local_steps is None else local_steps
        for key, value in self.underdetermined.items():
            if f"attack.{key}" in self.explicit or (key == "feature_weight" and steps > 1):
                continue
            if key == "priors":
                priors = {k: v for k, v in value.items() if f"attack.priors.{k}" not in self.explicit}
                _set(_section_of(out, "attack", key), "underdetermined", key, {**out.attack.priors, **priors}, from_text=False)
                out.adapted["attack.priors"] = dict(out.attack.priors)
                continue
            _set(_section_of(out, "attack", key), "underdetermined", key, value, from_text=False)
            out.adapted[f"attack.{key}"] = value
        out.validate()
        return out

    def to_dict(self) -> dict[str, Any]:
        """The recipe as a recipe file spells it: every `[attack]` key in one table (`adapted`: what `adapted_to` changed)."""
        out = dataclasses.asdict(self)
        out.pop("explicit")
        adapted = out.pop("adapted")
        if not out["underdetermined"]:
            out.pop("underdetermined")
        attack = {**out.pop("attack"), **out.pop("choice"), **out.pop("text")}
        return {**out, "attack": attack, **({"adapted": adapted} if adapted else {})}

    def setting_overrides(self) -> list[str]:
        """The client's setting (`[task]`, `[data]`, `[client]`, defense) as `key=value` overrides: applied to
        another recipe, that recipe attacks the same clients the same way they trained."""
        out = []
        for section in ("task", "data", "client"):
            for key, value in dataclasses.asdict(getattr(self, section)).items():
                text = ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
                out.append(f"{section}.{key}={text}")
        return out + [f"defense={self.defense}"]

    def validate(self) -> None:
        """Raise ConfigError for values no run could use."""
        from leakkit.run.attacks import attack_for

        self.attack.validate()
        self.text.validate()
        attack_for(self.choice.method, modality_of(self.task.name).name)
        if self.choice.method == "auto":
            known = bundled_recipes()
            wrong = [c for c in self.choice.candidates if c not in known or c == self.name]
            if not self.choice.candidates or wrong:
                raise ConfigError(f"attack.candidates must name bundled recipes other than this one; got {', '.join(wrong) or 'none'}")
        unknown = [k for k in self.underdetermined if k not in {f.name for f in dataclasses.fields(AttackConfig)}]
        if unknown:
            raise ConfigError(f"[underdetermined] holds attack settings; unknown key(s) {', '.join(unknown)}")
        if self.data.batch_size < 1:
            raise ConfigError("data.batch_size must be at least 1")
        if self.data.samples < 1:
            raise ConfigError("data.samples must be at least 1")
        if self.data.reduction not in ("mean", "sum"):
            raise ConfigError("data.reduction must be 'mean' or 'sum'")
        if self.metrics.success_tier not in ("exact", "close", "recognisable"):
            raise ConfigError(f"metrics.success_tier must be exact, close or recognisable, got {self.metrics.success_tier!r}")
        if not 0 < self.task.mask_probability <= 1:
            raise ConfigError("task.mask_probability must be in (0, 1]")
        if self.task.max_length < 0:
            raise ConfigError("task.max_length must be 0 (the model's limit) or positive")
        for key in ("num_classes", "image_size", "channels"):
            if getattr(self.task, key) < 1:
                raise ConfigError(f"task.{key} must be at least 1")
        for key in ("mean", "std"):
            values = getattr(self.task, key)
            if values and len(values) != self.task.channels:
                raise ConfigError(f"task.{key} needs one value per channel ({self.task.channels})")
        if any(s <= 0 for s in self.task.std):
            raise ConfigError("task.std values must be positive")
        if self.client.local_steps < 1 or self.client.local_batch < 0:
            raise ConfigError("client.local_steps must be at least 1 and client.local_batch 0 (all) or positive")
        if not (self.client.local_lr > 0 and math.isfinite(self.client.local_lr)):
            raise ConfigError("client.local_lr must be a positive number")
        u = self.utility
        if u.steps < 0 or u.batch < 0 or not (u.lr >= 0 and math.isfinite(u.lr)):
            raise ConfigError("utility.steps, utility.batch and utility.lr must be 0 (the default) or positive")
        from leakkit.client.defenses import format_chain, parse_chain

        self.defense = format_chain(parse_chain(self.defense))


SECTIONS = {"task": TaskSpec, "data": DataSpec, "attack": AttackConfig, "text": TextAttackSettings, "metrics": MetricsSpec, "client": ClientSpec, "utility": UtilitySpec}
TOP_LEVEL = {"description", "citation", "defense"}
# `[attack]` keys are read by three concerns: the engine, the choice of attack family, the text attacks.
ATTACK_PARTS = {"attack": AttackConfig, "choice": AttackChoice, "text": TextAttackSettings}


def bundled_recipes() -> dict[str, Path]:
    """Names and paths of the recipes shipped with the package."""
    root = resources.files("leakkit.recipes")
    return {p.name[: -len(".toml")]: Path(str(p)) for p in root.iterdir() if p.name.endswith(".toml")}


def load_recipe(name_or_path: str, overrides: list[str] = ()) -> Recipe:
    """Resolve a bundled recipe name or a path to a recipe file, then apply `key=value` overrides.

    Raises:
        ConfigError: unknown recipe or key, malformed TOML, or a value of the wrong type.
    """
    bundled = bundled_recipes()
    if name_or_path in bundled:
        path, name = bundled[name_or_path], name_or_path
    else:
        path = Path(name_or_path)
        if not (path.suffix == ".toml" or path.exists()):
            raise ConfigError(f"unknown recipe {name_or_path!r}; bundled: {', '.join(sorted(bundled))}")
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        name = path.stem
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"recipe {path} is not valid TOML: {e}") from None
    recipe = _from_dict(name, raw, where=str(path))
    for item in overrides:
        apply_override(recipe, item)
        key = item.partition("=")[0].strip()
        if key.startswith("attack."):
            recipe.explicit.add(key)
    recipe.validate()
    return recipe


def _from_dict(name: str, raw: dict[str, Any], *, where: str) -> Recipe:
    unknown = set(raw) - set(SECTIONS) - TOP_LEVEL - {"underdetermined"}
    if unknown:
        valid = ", ".join(sorted(set(SECTIONS) | TOP_LEVEL | {"underdetermined"}))
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; valid: {valid}")
    recipe = Recipe(name=name, description=str(raw.get("description", "")), citation=str(raw.get("citation", "")))
    defense = raw.get("defense", "none")
    if isinstance(defense, dict):  # [defense] name = "prune", ratio = 0.3
        table = dict(defense)
        head = str(table.pop("name", "none"))
        defense = head + (":" + ",".join(f"{k}={v}" for k, v in table.items()) if table else "")
    if not isinstance(defense, str):
        raise ConfigError(f"{where}: defense must be a string like 'noise:std=1e-3' or a [defense] table")
    recipe.defense = defense
    for section, table in raw.items():
        if section in TOP_LEVEL:
            continue
        if section == "underdetermined":
            if not isinstance(table, dict):
                raise ConfigError(f"{where}: [underdetermined] must be a table")
            recipe.underdetermined = dict(table)
            continue
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [{section}] must be a table")
        for key, value in table.items():
            _set(_section_of(recipe, section, key), section, key, value, from_text=False)
    return recipe


def _section_of(recipe: Recipe, section: str, key: str) -> Any:
    """The dataclass that holds `section.key` (an `[attack]` key may belong to another concern)."""
    if section == "attack":
        for part in ATTACK_PARTS:
            if key in {f.name for f in dataclasses.fields(ATTACK_PARTS[part])}:
                return getattr(recipe, part)
    return getattr(recipe, section)


def valid_keys() -> list[str]:
    """Every `section.key` an override may name."""
    keys = [f"{s}.{f.name}" for s, cls in SECTIONS.items() if s != "text" for f in dataclasses.fields(cls)]
    return keys + [f"attack.{f.name}" for part in ("choice", "text") for f in dataclasses.fields(ATTACK_PARTS[part])]


def recipe_keys() -> list[dict[str, Any]]:
    """Every `section.key` an override may name, with its type and default (for `leakkit list --json`)."""
    out = []
    for key in valid_keys():
        section, _, name = key.partition(".")
        cls = next(c for c in ([*ATTACK_PARTS.values()] if section == "attack" else [SECTIONS[section]]) if name in {f.name for f in dataclasses.fields(c)})
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        hint = typing.get_type_hints(cls)[name]
        out.append({"key": key, "type": hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", ""), "default": default})
    return out


def apply_override(recipe: Recipe, item: str) -> None:
    """Apply one `section.key=value` (or `attack.priors.NAME=value`) to the recipe in place."""
    key, sep, value = item.partition("=")
    if not sep:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    parts = key.strip().split(".")
    if parts == ["model"]:  # shorthand users reach for first: model=path/or/hub-id
        parts = ["task", "model"]
    if parts[0] == "defense":
        _override_defense(recipe, parts[1:], value.strip())
        return
    if parts[0] not in SECTIONS or len(parts) < 2:
        raise ConfigError(f"unknown key {key!r}; valid: {', '.join(valid_keys())}")
    if len(parts) == 3 and parts[0] == "attack" and parts[1] == "priors":
        recipe.attack.priors[parts[2]] = _coerce(float, value, key, from_text=True)
        return
    if len(parts) != 2:
        raise ConfigError(f"unknown key {key!r}; valid: {', '.join(valid_keys())}")
    _set(_section_of(recipe, parts[0], parts[1]), parts[0], parts[1], value.strip(), from_text=True)


def _override_defense(recipe: Recipe, keys: list[str], value: str) -> None:
    """`defense=prune` (or a whole chain) replaces the defense; `defense.ratio=0.3` sets a
    parameter of its last step."""
    from leakkit.client.defenses import parse_chain

    if not keys:
        recipe.defense = value
        return
    steps = parse_chain(recipe.defense)
    name, params = steps[-1]
    if len(keys) != 1:
        raise ConfigError(f"unknown key 'defense.{'.'.join(keys)}'; set a parameter as defense.NAME=value")
    params = dict(params)
    params[keys[0]] = value  # type: ignore[assignment]  # checked by parse_chain below
    head = "+".join(s for s in recipe.defense.split("+")[:-1])
    last = f"{name}:" + ",".join(f"{k}={v}" for k, v in params.items())
    parse_chain(last)
    recipe.defense = f"{head}+{last}" if head else last


def _set(target: Any, section: str, key: str, value: Any, *, from_text: bool) -> None:
    hints = typing.get_type_hints(type(target))
    if key not in hints or key not in {f.name for f in dataclasses.fields(target)}:
        parts = ATTACK_PARTS.values() if section == "attack" else [type(target)]
        valid = ", ".join(f"{section}.{f.name}" for cls in parts for f in dataclasses.fields(cls))
        raise ConfigError(f"unknown key '{section}.{key}'; valid: {valid}")
    setattr(target, key, _coerce(hints[key], value, f"{section}.{key}", from_text=from_text))


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _coerce(kind: Any, value: Any, key: str, *, from_text: bool) -> Any:
    origin = typing.get_origin(kind)
    if origin is list:
        (item,) = typing.get_args(kind)
        items = [v for v in str(value).split(",") if v.strip()] if from_text else value
        if not isinstance(items, list):
            raise ConfigError(f"{key} expects a list, got {value!r}")
        return [_coerce(item, v, key, from_text=from_text) for v in items]
    if origin is dict:
        if from_text or not isinstance(value, dict):
            raise ConfigError(f"{key} is a table: set its entries as {key}.NAME=value")
        return {str(k): _coerce(float, v, f"{key}.{k}", from_text=False) for k, v in value.items()}
    if from_text:
        text = str(value).strip()
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return text.lower() in ("true", "1", "yes")
            if kind is int:
                return int(text)
            if kind is float:
                return float(text)
            return text
        except ValueError:
            raise ConfigError(f"{key} expects {_TYPE_WORDS.get(kind, kind)}, got {text!r}") from None
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        bool: isinstance(value, bool),
        str: isinstance(value, str),
    }.get(kind, True)
    if not ok:
        raise ConfigError(f"{key} expects {_TYPE_WORDS.get(kind, kind)}, got {value!r}")
    return float(value) if kind is float else value
