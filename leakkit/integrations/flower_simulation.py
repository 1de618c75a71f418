"""`leakkit flower simulate`: a real Flower simulation whose server captures every client's update.

Flower's own simulation engine (Ray) runs the ClientApps; the ServerApp runs FedAvg wrapped in
`CaptureStrategy`. Client k of round r holds the recipe's private batch (r-1) * clients + k of the
drawn data and trains the recipe's model on it with plain SGD: one step at client.local_lr (FedSGD)
or client.local_steps steps (FedAvg), after the recipe's defense, exactly as `leakkit run` simulates
one client. The clients' data is written to truth/ and only its digest into capture.json, so the
server's view and the ground truth stay apart; `leakkit audit RECIPE --from DIR` scores against it.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from leakkit.errors import ConfigError, InputError
from leakkit.files import apply_mode
from leakkit.run.capture import Capture, digest
from leakkit.run.config import load_recipe
from leakkit.run.rundir import provenance, write_json
from leakkit.run.runner import hooks_for


def simulate(
    recipe_name: str,
    overrides: list[str],
    *,
    clients: int,
    rounds: int,
    out: str | Path,
    input_path: str | None = None,
    seed: int = 0,
    workers: int | None = None,
) -> dict[str, Any]:
    """Run the simulation and return the capture's index.

    Args:
        recipe_name, overrides: the clients' setting (task, data.batch_size, client protocol, defense).
        clients, rounds: supernodes, and FedAvg rounds (every client trains in every round).
        out: the capture directory (must not hold one).
        input_path: images or sentences instead of the recipe's data source.
        seed: fixes the initial model, the data draw and the clients' randomness.
        workers: CPUs Ray may use (default: all).
    Raises:
        ConfigError / InputError: a bad setting, Flower missing, or an existing capture in `out`.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # Flower's own imports use deprecated Click helpers
            from flwr.simulation import run_simulation
    except ImportError:
        raise ConfigError("leakkit flower needs Flower: pip install 'leakkit[flower]'") from None
    if clients < 1 or rounds < 1:
        raise ConfigError("--clients and --rounds must be at least 1")
    recipe = load_recipe(recipe_name, overrides)
    root = Path(out)
    if (root / "capture.json").exists():
        raise InputError(f"{root} already holds a capture; choose another --out")
    hooks = hooks_for(recipe)
    samples = clients * rounds * recipe.data.batch_size
    task = hooks.build_task(recipe, seed=seed)
    pool = hooks.load_samples(recipe, input_path=input_path, samples=samples, seed=seed)
    batches = hooks.make_batches(task, recipe, pool, seed=seed)
    truth: dict[str, str] = {}
    for b, batch in enumerate(batches):
        files = hooks.truth(batch)
        name = f"round-{b // clients + 1}/client-{b % clients}"
        truth[name] = digest(files)
        for suffix, data in files.items():
            f = root / "truth" / f"{name}.{suffix}"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(data)
            apply_mode(f)
    setting = {"recipe": recipe_name, "overrides": list(overrides), "input": str(Path(input_path).resolve()) if input_path else None,
               "seed": seed, "clients": clients, "rounds": rounds, "samples": samples}
    started = time.perf_counter()
    server = _server_app(recipe_name, list(overrides), seed=seed, clients=clients, rounds=rounds, out=root)
    client = _client_app(recipe_name, list(overrides), seed=seed, clients=clients, input_path=input_path, samples=samples)
    cores = workers or os.cpu_count() or 1
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": cores, "include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}}
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    # Flower's per-round lines (and its notice that run_simulation will give way to `flwr run`) would bury leakkit's summary
    flwr_log.setLevel(logging.ERROR)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # CPU-only clients: silence Ray's GPU-variable notice
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)  # Ray's helper processes outlive the run by design
            run_simulation(server_app=server, client_app=client, num_supernodes=clients, backend_config=backend)
    finally:
        flwr_log.setLevel(level)
    capture = Capture.read(root) if (root / "capture.json").is_file() else None
    if capture is None or len(capture.index.get("updates", [])) < clients * rounds:
        got = 0 if capture is None else len(capture.index.get("updates", []))
        raise InputError(f"the Flower simulation captured {got} of {clients * rounds} updates; see Flower's log above")
    index = capture.index
    index["simulation"] = {**setting, "setting_overrides": recipe.setting_overrides(), "truth": truth,
                           "seconds": round(time.perf_counter() - started, 2), "provenance": provenance(seed=seed, device="cpu")}
    write_json(root / "capture.json", index)
    return index


def _server_app(recipe_name: str, overrides: list[str], *, seed: int, clients: int, rounds: int, out: Path) -> Any:
    from flwr.app import ArrayRecord, ConfigRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    from leakkit.integrations.flower import CaptureStrategy

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        recipe = load_recipe(recipe_name, overrides)
        task = hooks_for(recipe).build_task(recipe, seed=seed)
        c = recipe.client
        t = recipe.task
        options = {"name": t.name, "model": t.model, "num_classes": t.num_classes, "image_size": t.image_size, "channels": t.channels}
        inner = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients, min_available_nodes=clients)
        strategy = CaptureStrategy(inner, out, reduction=recipe.data.reduction, task_options=options)
        config = ConfigRecord({"local-lr": c.local_lr, "local-steps": c.local_steps, "local-batch": c.local_batch})
        strategy.start(grid=grid, initial_arrays=ArrayRecord(task.model.state_dict()), num_rounds=rounds, train_config=config)

    return app


def _client_app(recipe_name: str, overrides: list[str], *, seed: int, clients: int, input_path: str | None, samples: int) -> Any:
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()
    held: dict[str, Any] = {}  # per worker process: the model and the drawn data, built once

    def setup() -> dict[str, Any]:
        if not held:
            torch.set_num_threads(1)  # Ray gives each client one CPU
            recipe = load_recipe(recipe_name, overrides)
            hooks = hooks_for(recipe)
            task = hooks.build_task(recipe, seed=seed)
            pool = hooks.load_samples(recipe, input_path=input_path, samples=samples, seed=seed)
            held.update(recipe=recipe, hooks=hooks, task=task, batches=hooks.make_batches(task, recipe, pool, seed=seed))
        return held

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        h = setup()
        recipe, task = h["recipe"], h["task"]
        k = int(context.node_config["partition-id"])
        server_round = int(msg.content["config"]["server-round"])
        task.model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        update = h["hooks"].client_update(task, recipe, h["batches"], (server_round - 1) * clients + k, seed=seed)
        c = recipe.client
        # what SGD leaves: one step of lr x gradient, or the weight difference of several steps
        scale = 1.0 if update.extra.get("fedavg") else c.local_lr
        state = {n: (t - scale * update.gradients[n].to(t.dtype)) if n in update.gradients else t for n, t in task.model.state_dict().items()}
        metrics = MetricRecord({"num-examples": update.batch_size, "partition-id": k, "local-lr": c.local_lr,
                                "local-steps": c.local_steps, "local-batch": c.local_batch})
        return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=msg)

    return app
