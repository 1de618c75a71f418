"""A user's mistakes: each gets a non-zero exit, one line on stderr naming the problem, no
traceback, and leaves every file that was there before untouched.

The CLI runs in this process (`leakkit.cli.main`), as the installed command does, so the
suite stays fast; a few cases that depend on a fresh process use the real command.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import FAST, assert_one_line_error, run_cli
from leakkit.cli import main


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


class _Evil:
    """A pickle whose loading would create a marker file: proof that nothing unpickles it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: D105
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Files a confused user might point leakkit at, made once."""
    from PIL import Image
    from safetensors.torch import save_file
    from skimage import data

    root = tmp_path_factory.mktemp("world")
    Image.fromarray(data.chelsea()).resize((20, 20)).save(root / "cat.png")
    Image.fromarray(data.chelsea()[:1, :1]).save(root / "tiny.png")
    (root / "fake.png").write_bytes(b"\x89PNG but not really")
    (root / "empty").mkdir()
    (root / "notes.txt").write_text("the cat sat on the mat\n", encoding="utf-8")
    (root / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (root / "blank.txt").write_text("\n\n", encoding="utf-8")
    (root / "gap.txt").write_text("first sentence\n\nthird sentence\n", encoding="utf-8")
    (root / "long.txt").write_text(" ".join(["word"] * 10_000) + "\n", encoding="utf-8")
    (root / "wrong.csv").write_text("words,label\nthe cat,1\n", encoding="utf-8")
    (root / "labels.tsv").write_text("sentence\tlabel\nthe cat sat\t5\n", encoding="utf-8")  # 2 classes in TEXT
    (root / "bad.toml").write_text("[task\nname = 1\n", encoding="utf-8")
    (root / "latin1.toml").write_bytes("description = 'caf\xe9'\n".encode("latin-1"))
    (root / "a-file").write_text("I am a file, not a directory\n")
    # a real observed update, and broken variants of it
    assert main(["observe", "idlg", *FAST, "--out", str(root / "good.safetensors"), "--quiet"]) == 0
    from leakkit.client.observation import Observation

    good = Observation.load(root / "good.safetensors")
    tensors = {k: v.contiguous() for k, v in good.gradients.items()}
    meta = {"leakkit": json.dumps(good.metadata())}
    first = next(iter(tensors))
    save_file({k: v for k, v in tensors.items() if k != first}, str(root / "lacking.safetensors"), metadata=meta)
    save_file({**tensors, first: torch.full_like(tensors[first], float("inf"))}, str(root / "inf.safetensors"), metadata=meta)
    save_file(tensors, str(root / "nometa.safetensors"))
    save_file(tensors, str(root / "badmeta.safetensors"), metadata={"leakkit": "{not json"})
    raw = (root / "good.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    (root / "empty.safetensors").write_bytes(b"")
    with open(root / "evil.safetensors", "wb") as f:
        pickle.dump(_Evil(root / "PWNED"), f)
    torch.save(tensors, root / "model.pt")
    # a user's model files and checkpoints
    (root / "net.py").write_text("from torch import nn\n\nclass Net(nn.Linear):\n    def __init__(self, num_classes=10):\n        super().__init__(4, num_classes)\n")
    (root / "broken.py").write_text("raise RuntimeError('this file is broken')\n")
    from leakkit.tasks import ImageClassification

    lenet = ImageClassification.from_name("lenet", num_classes=10, image_size=16).model
    save_file(lenet.state_dict(), str(root / "lenet16.safetensors"))
    save_file({"fc.weight": torch.zeros(3, 3)}, str(root / "other.safetensors"))
    # a finished run and an audit to point --out at
    assert main(["run", "idlg", *FAST, "--out", str(root / "a-run"), "--quiet"]) == 0
    assert main(["audit", "idlg", *FAST, "--defense", "none", "--out", str(root / "an-audit"), "--no-utility", "--no-report", "--quiet"]) == 0
    (root / "broken-audit").mkdir()
    (root / "broken-audit" / "audit.json").write_text("{oops", encoding="utf-8")
    return root


TEXT = ["task.name=sequence-classification", "task.num_classes=2", "attack.steps=1"]

# (case id, argv with {w} for the world folder, what the one line must say)
CASES: list[tuple[str, list[str], str]] = [
    # run: recipes and overrides
    ("unknown recipe", ["run", "no-such-recipe"], "unknown recipe"),
    ("recipe not TOML", ["run", "{w}/bad.toml"], "not valid TOML"),
    ("recipe not UTF-8", ["run", "{w}/latin1.toml"], "not valid TOML"),
    ("missing recipe file", ["run", "{w}/missing.toml"], "recipe file not found"),
    ("unknown key", ["run", "dlg", "attack.stepz=3"], "unknown key 'attack.stepz'"),
    ("wrong type", ["run", "dlg", "data.batch_size=two"], "data.batch_size expects an integer"),
    ("override without =", ["run", "dlg", "attack.steps"], "must look like section.key=value"),
    ("non-finite lr", ["run", "dlg", "attack.lr=nan"], "attack.lr must be a positive number"),
    ("zero batch", ["run", "dlg", "data.batch_size=0"], "data.batch_size must be at least 1"),
    ("unknown objective", ["run", "dlg", "attack.objective=l3"], "unknown objective 'l3'"),
    ("unknown method", ["run", "dlg", "attack.method=exact"], "does not apply to image tasks"),
    ("unknown defense", ["run", "dlg", "--defense", "shield"], "unknown defense 'shield'"),
    ("defense not a number", ["run", "dlg", "--defense", "noise:std=abc"], "noise"),
    ("unknown text space", ["run", "dlg-bert", "text.space=pixels"], "unknown attack.space 'pixels'"),
    ("continuous search on a decoder", ["run", "decoder-exact", "attack.method=match", "data.batch_size=1"], "attack.method=exact"),
    ("defense out of range", ["run", "dlg", "--defense", "noise:std=-1"], "out of range"),
    # run: inputs
    ("missing input", ["run", "idlg", *FAST, "--input", "{w}/nothing.png"], "input not found"),
    ("not an image", ["run", "idlg", *FAST, "--input", "{w}/fake.png"], "cannot read image"),
    ("empty folder", ["run", "idlg", *FAST, "--input", "{w}/empty"], "no images"),
    ("zero samples", ["run", "idlg", *FAST, "--samples", "0"], "--samples must be at least 1"),
    ("no cuda", ["run", "idlg", *FAST, "--device", "cuda"], "CUDA is not available"),
    ("bogus device", ["run", "idlg", *FAST, "--device", "toaster"], "unknown device"),
    ("text not UTF-8", ["run", "bert-exact", *TEXT, "--input", "{w}/latin1.txt"], "not UTF-8"),
    ("text empty", ["run", "bert-exact", *TEXT, "--input", "{w}/blank.txt"], "holds no sentences"),
    ("text empty line", ["run", "bert-exact", *TEXT, "--input", "{w}/gap.txt"], "empty line"),
    ("10,000-token sentence", ["run", "bert-exact", *TEXT, "--input", "{w}/long.txt"], "the model takes at most"),
    ("csv without sentence column", ["run", "bert-exact", *TEXT, "--input", "{w}/wrong.csv"], "no sentence column"),
    ("labels beyond classes", ["run", "bert-exact", *TEXT, "--input", "{w}/labels.tsv"], "task.num_classes=2"),
    ("text model missing", ["run", "bert-exact", "model={w}/no-model-here"], "no-model-here"),
    # run: where results go
    ("out is a file", ["run", "idlg", *FAST, "--out", "{w}/a-file"], "is a file"),
    ("out holds a run", ["run", "idlg", *FAST, "--out", "{w}/a-run"], "--overwrite"),
    ("out not a run", ["run", "idlg", *FAST, "--out", "{w}/an-audit"], "holds no run"),
    ("resume without out", ["run", "idlg", *FAST, "--resume"], "--resume needs --out"),
    ("resume and overwrite", ["run", "idlg", *FAST, "--out", "{w}/a-run", "--resume", "--overwrite"], "give one of them"),
    ("resume another run", ["run", "idlg", *FAST, "--samples", "3", "--out", "{w}/a-run", "--resume"], "different run"),
    # observe
    ("observe out is a directory", ["observe", "idlg", *FAST, "--out", "{w}/empty"], "is a directory"),
    ("observe out exists", ["observe", "idlg", *FAST, "--out", "{w}/good.safetensors"], "--overwrite"),
    # attack: gradient files from strangers
    ("gradients missing", ["attack", "idlg", *FAST, "--gradients", "{w}/none.safetensors"], "gradient file not found"),
    ("gradients are a pickle", ["attack", "idlg", *FAST, "--gradients", "{w}/evil.safetensors"], "not a readable safetensors file"),
    ("gradients are torch.save", ["attack", "idlg", *FAST, "--gradients", "{w}/model.pt"], "not a readable safetensors file"),
    ("gradients truncated", ["attack", "idlg", *FAST, "--gradients", "{w}/truncated.safetensors"], "not a readable safetensors file"),
    ("gradients empty", ["attack", "idlg", *FAST, "--gradients", "{w}/empty.safetensors"], "not a readable safetensors file"),
    ("gradients without metadata", ["attack", "idlg", *FAST, "--gradients", "{w}/nometa.safetensors"], "no leakkit metadata"),
    ("gradients malformed metadata", ["attack", "idlg", *FAST, "--gradients", "{w}/badmeta.safetensors"], "malformed leakkit metadata"),
    ("gradients lacking a tensor", ["attack", "idlg", *FAST, "--gradients", "{w}/lacking.safetensors"], "listed in its metadata"),
    ("gradients with inf", ["attack", "idlg", *FAST, "--gradients", "{w}/inf.safetensors"], "NaN or inf"),
    ("gradients of another model", ["attack", "idlg", "task.image_size=16", "--gradients", "{w}/good.safetensors"], "do not match the model"),
    ("attack without recipe", ["attack", "--gradients", "{w}/good.safetensors"], "name a recipe"),
    ("attack unknown task", ["attack", "--task", "captioning", "--gradients", "{w}/good.safetensors"], "--task must be one of"),
    # a user's model, weights and checkpoints
    ("user model file missing", ["run", "idlg", *FAST, "task.model={w}/nothing.py:Net"], "no such file"),
    ("user model class missing", ["run", "idlg", *FAST, "task.model={w}/net.py:Nope"], "has no nn.Module class 'Nope'"),
    ("user model file broken", ["run", "idlg", *FAST, "task.model={w}/broken.py:Net"], "this file is broken"),
    ("weights are a pickle", ["run", "idlg", *FAST, "task.weights={w}/model.pt"], "never loaded"),
    ("weights missing", ["run", "idlg", *FAST, "task.weights={w}/none.safetensors"], "weights file not found"),
    ("weights of another model", ["run", "idlg", *FAST, "task.weights={w}/other.safetensors"], "does not fit the model"),
    ("checkpoints identical", ["attack", "idlg", *FAST, "--checkpoints", "{w}/lenet16.safetensors", "{w}/lenet16.safetensors"], "same weights"),
    ("checkpoints of another model", ["attack", "idlg", *FAST, "--checkpoints", "{w}/lenet16.safetensors", "{w}/other.safetensors"], "does not fit"),
    ("checkpoints for text", ["attack", "bert-exact", *TEXT, "--checkpoints", "{w}/lenet16.safetensors", "{w}/other.safetensors"], "image tasks"),
    ("opacus on text", ["run", "bert-exact", *TEXT, "--defense", "opacus"], "use clip-noise"),
    # audit
    ("audit from a non-capture", ["audit", "idlg", "--from", "{w}/empty"], "not a capture directory"),
    ("audit from with a grid", ["audit", "idlg", "--from", "{w}/empty", "--grid", "data.batch_size=1,2"], "drop --grid"),
    ("flower without clients", ["flower", "simulate", "idlg", "--clients", "0", "--out", "{w}/new-capture"], "--clients"),
    ("grid malformed", ["audit", "idlg", *FAST, "--grid", "data.batch_size"], "--grid"),
    ("grid sweeps a defense", ["audit", "idlg", *FAST, "--grid", "defense=noise"], "sweep defenses with --defense"),
    ("workers zero", ["audit", "idlg", *FAST, "--workers", "0"], "--workers must be at least 1"),
    ("unknown backend", ["audit", "idlg", *FAST, "--backend", "spark", "--out", "{w}/new-audit"], "unknown backend"),
    ("audit out holds another audit", ["audit", "idlg", *FAST, "--defense", "fp16", "--out", "{w}/an-audit"], "different audit"),
    ("audit out is a file", ["audit", "idlg", *FAST, "--out", "{w}/a-file"], "is a file"),
    # report and list
    ("report of a non-audit", ["report", "{w}/a-run"], "not an audit directory"),
    ("report of nothing", ["report", "{w}/no-such-dir"], "not an audit directory"),
    ("report of a broken audit", ["report", "{w}/broken-audit"], "not readable JSON"),
    ("list unknown catalogue", ["list", "spells"], "unknown catalogue"),
]


@pytest.mark.parametrize("case, argv, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line(
    case: str, argv: list[str], needle: str, world: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # a default --out lands here, never in the checkout
    before = _snapshot(world)
    capsys.readouterr()
    code = main([a.replace("{w}", str(world)) for a in argv])
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("leakkit: warning:")]
    assert code != 0, out + err
    assert len(lines) == 1 and lines[0].startswith("leakkit: error:"), err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert _snapshot(world) == before, "a mistake changed files that were already there"
    assert not (world / "PWNED").exists()


def test_there_are_at_least_forty_cases() -> None:
    assert len({c[0] for c in CASES}) >= 40


def test_a_one_pixel_image_is_still_an_image(world: Path, capsys: pytest.CaptureFixture) -> None:
    out_dir = world.parent / "tiny-run"
    assert main(["run", "idlg", *FAST, "--input", str(world / "tiny.png"), "--out", str(out_dir)]) == 0
    out, _ = capsys.readouterr()
    assert "read 1 example(s)" in out
    assert json.loads((out_dir / "metrics.json").read_text())["summary"]["n"] == 1


def test_a_fresh_process_answers_a_pickle_in_one_line(world: Path) -> None:
    proc = run_cli("attack", "idlg", *FAST, "--gradients", str(world / "evil.safetensors"), "--out", str(world.parent / "x"))
    assert_one_line_error(proc, "not a readable safetensors file")
    assert not (world / "PWNED").exists()


def _load_recipe(w: Path) -> object:
    from leakkit.run.config import load_recipe

    return load_recipe("dlg", ["task.colour=red"])


def _load_pickle(w: Path) -> object:
    from leakkit.client.observation import Observation

    return Observation.load(w / "evil.safetensors")


def _read_latin1(w: Path) -> object:
    from leakkit.text.data import read_input

    return read_input(str(w / "latin1.txt"))


API: list[tuple[str, Callable[[Path], object], str, str]] = [
    ("load_recipe unknown key", _load_recipe, "ConfigError", "unknown key"),
    ("Observation.load pickle", _load_pickle, "InputError", "safetensors"),
    ("read_input latin-1", _read_latin1, "InputError", "not UTF-8"),
]


@pytest.mark.parametrize("case, call, error, needle", API, ids=[a[0] for a in API])
def test_python_api_raises_leakkit_errors(case: str, call: Callable[[Path], object], error: str, needle: str, world: Path) -> None:
    from leakkit import errors

    with pytest.raises(getattr(errors, error), match=needle):
        call(world)
    assert not (world / "PWNED").exists()
