"""The command line end to end, in fresh processes, as a user runs it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST, assert_one_line_error, run_cli

SAMPLE_KEYS = {"psnr", "ssim", "mse", "label_correct", "seconds"}
SUMMARY_KEYS = {"n", "success_rate", "psnr_median", "seconds_median"}


def test_help_is_instant_and_lists_commands():
    started = time.perf_counter()
    proc = run_cli("--help")
    assert proc.returncode == 0 and "run" in proc.stdout and "list" in proc.stdout
    assert time.perf_counter() - started < 10  # no torch import for --help
    code = "import sys, leakkit.cli; leakkit.cli.main(['--version']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert out.split() == ["leakkit", "0.1.0", "False"]


def test_list_shows_every_catalogue():
    proc = run_cli("list")
    assert proc.returncode == 0
    for word in ("recipes", "dlg", "inverting-gradients", "tasks", "image-classification", "objectives", "cosine", "labels", "idlg", "optimizers", "signed-adam"):
        assert word in proc.stdout
    assert run_cli("list", "objectives").stdout.count("l2") >= 2


def test_run_on_embedded_samples_writes_the_run_directory(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("run", "dlg", "--samples", "2", "--out", str(out), "--quiet", *FAST)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert SUMMARY_KEYS <= set(m["summary"]) and m["summary"]["n"] == 2
    assert all(SAMPLE_KEYS <= set(s) for s in m["samples"])
    assert {"leakkit_version", "git_commit", "torch_version", "device", "seed"} <= set(m["provenance"])
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"]["attack"]["steps"] == 3 and config["recipe"]["task"]["image_size"] == 16
    assert (out / "grid.png").stat().st_size > 0 and (out / "recovered.safetensors").exists()
    assert len((out / "trace.jsonl").read_text().splitlines()) >= 2


def test_run_on_an_image_and_a_folder(tmp_path, photo_png, photo_folder):
    proc = run_cli("run", "idlg", "--input", str(photo_png), "--out", str(tmp_path / "a"), *FAST)
    assert proc.returncode == 0, proc.stderr
    assert "success" in proc.stdout  # the summary table
    proc = run_cli("run", "dlg", "--input", str(photo_folder), "--out", str(tmp_path / "b"), "--quiet", *FAST)
    assert proc.returncode == 0, proc.stderr
    names = [Path(s["name"]).name for s in json.loads((tmp_path / "b" / "metrics.json").read_text())["samples"]]
    assert names == ["camera.png", "cat.jpg"]


def test_recovery_is_scored_honestly(tmp_path, photo_png):
    """A real (short) attack on a real photo through the CLI reaches a high PSNR."""
    out = tmp_path / "real"
    proc = run_cli("run", "idlg", "--input", str(photo_png), "--out", str(out), "--quiet",
                   "task.image_size=16", "task.num_classes=10", "attack.restarts=1", "attack.steps=80")
    assert proc.returncode == 0, proc.stderr
    s = json.loads((out / "metrics.json").read_text())["samples"][0]
    assert s["psnr"] > 35 and s["label_correct"]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "nope"], "unknown recipe 'nope'"),
        (["run", "dlg", "attack.stepz=3"], "unknown key 'attack.stepz'"),
        (["run", "dlg", "attack.steps=ten"], "attack.steps expects an integer"),
        (["run", "dlg", "--input", "/no/such/photo.png"], "input not found"),
        (["run", "dlg", "--device", "cuda"], "CUDA"),
        (["run", "dlg", "--samples", "0"], "--samples must be at least 1"),
        (["list", "spells"], "unknown catalogue"),
        (["attack", "dlg", "--gradients", "/no/such.safetensors"], "gradient file not found"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args, needle, tmp_path):
    if "--device" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
    assert_one_line_error(run_cli(*args, "--out", str(tmp_path / "x")) if args[0] == "run" else run_cli(*args), needle)


def test_unreadable_image(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("definitely not a jpeg")
    assert_one_line_error(run_cli("run", "dlg", "--input", str(bad), "--out", str(tmp_path / "r")), "cannot read image")


def test_observe_then_attack_and_mismatch(tmp_path, photo_png):
    grads = tmp_path / "client.safetensors"
    proc = run_cli("observe", "idlg", "--input", str(photo_png), "--out", str(grads), *FAST[:2])
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("attack", "idlg", "--gradients", str(grads), "--out", str(tmp_path / "a"), "--quiet", *FAST)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert m["recovery"]["labels"] and "psnr" not in json.dumps(m)  # the attacker has no truth to score
    # the same file against a different model: names/shapes do not match
    proc = run_cli("attack", "idlg", "--gradients", str(grads), "--out", str(tmp_path / "b"), "task.model=convnet", *FAST[:2])
    assert_one_line_error(proc, "gradient names do not match the model")
    proc = run_cli("attack", "idlg", "--gradients", str(grads), "--out", str(tmp_path / "c"), "task.num_classes=20", "task.image_size=16")
    assert_one_line_error(proc, "gradient shapes do not match")


def test_all_restarts_diverging_is_said(tmp_path):
    proc = run_cli("run", "idlg", "--out", str(tmp_path / "d"), "--quiet", *FAST,
                   "task.model=convnet", "attack.optimizer=adam", "attack.lr=1e300", "attack.restarts=2")
    assert proc.returncode == 3
    assert "diverged on every restart" in proc.stderr and "Traceback" not in proc.stderr
    m = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert m["summary"]["diverged"] == 1 and m["samples"][0]["status"] == "diverged"


def test_ctrl_c_keeps_finished_results(tmp_path):
    out = tmp_path / "int"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(
        [sys.executable, "-m", "leakkit", "run", "dlg", "--samples", "200", "--out", str(out), "--quiet",
         "task.image_size=16", "task.num_classes=10", "attack.restarts=1", "attack.steps=40", "attack.stop_distance=0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        # a suite started in the background (nohup ... &) inherits an ignored SIGINT, and Python then
        # installs no KeyboardInterrupt handler: give the run the default a user's terminal gives it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # wait for the first finished batch however slow the machine is; only then interrupt
    deadline = time.time() + 600
    while not (out / "metrics.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert (out / "metrics.json").exists(), "no batch finished within 10 minutes"
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()  # never leave a run behind to slow the rest of the suite
        raise
    assert proc.returncode == 130
    assert "interrupted after" in err and "Traceback" not in err
    m = json.loads((out / "metrics.json").read_text())
    assert m["summary"]["interrupted"] is True and 1 <= m["summary"]["n"] < 200


def test_python_dash_m_works():
    proc = subprocess.run([sys.executable, "-m", "leakkit", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("leakkit ")


def test_tiny_images_with_undefined_ssim_still_write_results(tmp_path):
    out = tmp_path / "tiny"
    proc = run_cli("run", "idlg", "--out", str(out), "--quiet", "task.image_size=2", "task.num_classes=10",
                   "attack.steps=2", "attack.restarts=1")
    assert proc.returncode == 0, proc.stderr
    sample = json.loads((out / "metrics.json").read_text())["samples"][0]
    assert sample["ssim"] is None and sample["psnr"] is not None


def test_out_is_never_overwritten_by_accident_and_resume_continues(tmp_path):
    out = tmp_path / "run"
    assert run_cli("run", "idlg", *FAST, "--samples", "2", "--out", str(out), "--quiet").returncode == 0
    before = (out / "metrics.json").read_bytes()
    assert_one_line_error(run_cli("run", "idlg", *FAST, "--out", str(out), "--quiet"), "--overwrite")
    assert_one_line_error(run_cli("run", "idlg", *FAST, "--samples", "3", "--out", str(out), "--resume", "--quiet"), "different run")
    assert_one_line_error(run_cli("run", "idlg", *FAST, "--out", str(out / "metrics.json"), "--quiet"), "is a file")
    assert_one_line_error(run_cli("run", "idlg", *FAST, "--resume", "--quiet"), "--resume needs --out")
    assert_one_line_error(run_cli("observe", "idlg", *FAST, "--out", str(out / "metrics.json")), "--overwrite")
    assert (out / "metrics.json").read_bytes() == before
    # resume after an interruption that kept only the first batch: it is kept, the second is attacked
    cut = json.loads(before)
    cut["samples"] = cut["samples"][:1]
    (out / "metrics.json").write_text(json.dumps(cut))
    proc = run_cli("run", "idlg", *FAST, "--samples", "2", "--out", str(out), "--resume", "--quiet")
    assert proc.returncode == 0, proc.stderr
    resumed = json.loads((out / "metrics.json").read_text())["samples"]
    assert resumed[0] == cut["samples"][0] and [r["batch"] for r in resumed] == [0, 1]
    proc = run_cli("run", "idlg", *FAST, "--out", str(out), "--overwrite", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "metrics.json").read_text())["summary"]["n"] == 1


def test_every_file_of_a_run_follows_the_umask(tmp_path):
    out = tmp_path / "run"
    assert run_cli("run", "idlg", *FAST, "--out", str(out), "--quiet").returncode == 0
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert {"config.json", "metrics.json", "grid.png", "recovered.safetensors"} <= set(modes)
    assert set(modes.values()) == {0o666 & ~mask}, modes


def test_list_json_describes_every_registry_for_scripts():
    proc = run_cli("list", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert {"recipes", "defenses", "attacks", "objectives", "recipe-keys"} <= set(data)
    noise = next(d for d in data["defenses"] if d["name"] == "noise")
    assert noise["parameters"]["std"]["swept"] is True and noise["parameters"]["std"]["default"] == 1e-3
    assert next(d for d in data["recipes"] if d["name"] == "dlg")["parameters"]["attack"]["objective"] == "l2"
    assert {"key": "data.batch_size", "type": "int", "default": 1} in data["recipe-keys"]
    one = json.loads(run_cli("list", "attacks", "--json").stdout)
    assert list(one) == ["attacks"] and {"match", "exact", "auto"} <= {d["name"] for d in one["attacks"]}
