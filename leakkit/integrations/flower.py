"""Flower: a strategy wrapper that records, on the server, every client's training reply as a leakkit update.

    from flwr.serverapp.strategy import FedAvg
    from leakkit.integrations.flower import CaptureStrategy
    strategy = CaptureStrategy(FedAvg(...), out="captured/")

The wrapper hands every call to the inner strategy unchanged (what it aggregates is what it would
have aggregated); on the side it writes

    captured/capture.json                  the index: flwr version, strategy, one entry per update
    captured/round-R/global.safetensors    the global model sent to the clients in round R
    captured/round-R/client-K.safetensors  client K's update (leakkit's observation format)

A client's update is the global model minus the model it sent back. One local step (FedSGD) is
saved as the gradient (difference / lr); more steps as the FedAvg weight difference. The learning
rate, step count and local batch are read from the reply's metrics, else from the config the
server sent, else from the wrapper's arguments (`local_lr=`, `local_steps=`): Flower itself does
not say how a client trained. K is the partition id a client reports ("partition-id" or
"client-id" in its metrics), else its node id.
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Any, Iterable

import torch

from leakkit.client.observation import Observation
from leakkit.files import apply_mode

try:
    from flwr.serverapp.strategy import Strategy
except ImportError as e:  # the module is only imported by those who use Flower
    raise ImportError("leakkit.integrations.flower needs Flower: pip install 'leakkit[flower]'") from e

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

# the names clients and servers commonly give each protocol value, in the order they are tried
PROTOCOL_KEYS = {
    "local_lr": ("local-lr", "lr", "learning-rate", "local_lr", "learning_rate"),
    "local_steps": ("local-steps", "local_steps", "steps"),
    "local_batch": ("local-batch", "local_batch"),
    "num_examples": ("num-examples", "num_examples"),
    "client": ("partition-id", "client-id", "partition_id", "client_id", "cid"),
}


class CaptureStrategy(Strategy):
    """Wrap any Flower (message API) strategy and save each client's update as an observation file.

    Args:
        strategy: the strategy that really runs the federation (FedAvg, FedProx, ...).
        out: the capture directory (created; an existing capture there is added to).
        local_lr, local_steps, local_batch: the clients' protocol where their replies and the config do not state it.
        reduction: how the clients' losses combine a batch ("mean" for PyTorch's default losses).
        task_options: the attacker's `task.*` settings for this model (e.g. {"model": "lenet", "num_classes": 10}),
            written into each update so `leakkit attack --gradients FILE` rebuilds the right model.
    """

    def __init__(
        self,
        strategy: Strategy,
        out: str | Path,
        *,
        local_lr: float | None = None,
        local_steps: int | None = None,
        local_batch: int = 0,
        reduction: str = "mean",
        task_options: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(strategy, Strategy):
            raise TypeError(
                f"CaptureStrategy wraps Flower's message-API strategies (flwr.serverapp.strategy), not {type(strategy).__module__}."
                f"{type(strategy).__name__}; the legacy flwr.server.strategy classes have message-API twins of the same name"
            )
        self.strategy = strategy
        self.out = Path(out)
        self.defaults = {"local_lr": local_lr, "local_steps": local_steps, "local_batch": local_batch}
        self.reduction = reduction
        self.task_options = dict(task_options or {})
        self._sent: dict[int, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self.out.mkdir(parents=True, exist_ok=True)
        self._index = _read_index(self.out)

    # --- the Strategy interface: each call goes to the inner strategy ------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        sent_config = dict(config)
        for m in messages:  # the inner strategy may add per-round keys to the config it sends
            for record in m.content.config_records.values():
                sent_config.update(dict(record))
        state = {k: t.clone() for k, t in arrays.to_torch_state_dict().items()}
        self._sent[server_round] = (state, sent_config)
        _save_state(self.out / f"round-{server_round}" / "global.safetensors", state)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)  # read twice: once here, once by the inner strategy
        for reply in replies:
            if not reply.has_error():
                self._capture(server_round, reply)
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()

    def __getattr__(self, name: str) -> Any:  # the inner strategy's own settings stay readable
        if name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)

    # --- capturing -----------------------------------------------------------------------------
    def _capture(self, server_round: int, reply: Message) -> None:
        before, config = self._sent[server_round]
        content = reply.content
        arrays = next(iter(content.array_records.values()), None)
        if arrays is None:
            return
        metrics: dict[str, Any] = {}
        for record in content.metric_records.values():
            metrics.update(dict(record))
        after = arrays.to_torch_state_dict()
        protocol = {key: _lookup(key, metrics, config, self.defaults) for key in PROTOCOL_KEYS}
        node = int(reply.metadata.src_node_id)
        client = protocol["client"]
        name = f"client-{int(client)}" if client is not None else f"node-{node}"
        observation = self._observation(before, after, protocol, metrics, config, server_round, node)
        path = self.out / f"round-{server_round}" / f"{name}.safetensors"
        observation.save(path)
        entry = {"round": server_round, "client": None if client is None else int(client), "node_id": node,
                 "file": str(path.relative_to(self.out)), "num_examples": observation.batch_size,
                 "kind": "weight difference" if observation.extra.get("fedavg") else "gradient"}
        with self._lock:
            self._index["updates"] = [u for u in self._index["updates"] if u["file"] != entry["file"]] + [entry]
            self._index["rounds"] = max(self._index.get("rounds", 0), server_round)
            self._index["strategy"] = type(self.strategy).__name__
            _write_index(self.out, self._index)

    def _observation(self, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], protocol: dict[str, Any],
                     metrics: dict[str, Any], config: dict[str, Any], server_round: int, node: int) -> Observation:
        # only the trained floating-point tensors are an update (integer buffers such as step counters are not)
        names = [k for k, t in before.items() if t.is_floating_point() and k in after]
        diff = {k: before[k].double() - after[k].double() for k in names}
        lr, steps = protocol["local_lr"], int(protocol["local_steps"] or 1)
        extra: dict[str, Any] = {
            "global_weights": "global.safetensors",
            "flower": {"round": server_round, "node_id": node, "flwr": _flwr_version(), "strategy": type(self.strategy).__name__,
                       "metrics": _plain(metrics), "config": _plain(config)},
        }
        if self.task_options:
            extra["task_options"] = self.task_options
        if steps > 1 or lr is None:
            # without a learning rate the difference cannot become a gradient: keep it as FedAvg's update
            extra["fedavg"] = {"local_steps": steps, "local_lr": lr, "local_batch": int(protocol["local_batch"] or 0)}
            grads = diff
        else:
            grads = {k: d / float(lr) for k, d in diff.items()}
        examples = protocol["num_examples"]
        return Observation(
            gradients={k: g.float() for k, g in grads.items()},
            batch_size=int(examples) if examples is not None else 1,
            reduction=self.reduction,
            model=str(self.task_options.get("model", "")),
            extra=extra,
        )


def _lookup(key: str, *sources: dict[str, Any]) -> Any:
    for source in sources:
        for name in PROTOCOL_KEYS.get(key, ()) + ((key,) if source is sources[-1] else ()):
            value = source.get(name)
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                return value
    return None


def _plain(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in record.items()}


def _flwr_version() -> str:
    from importlib.metadata import version

    return version("flwr")


def _save_state(path: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: t.detach().contiguous() for k, t in state.items()}, str(path))
    apply_mode(path)


def _read_index(out: Path) -> dict[str, Any]:
    f = out / "capture.json"
    if f.is_file():
        return json.loads(f.read_text(encoding="utf-8"))
    return {"format": "leakkit-capture", "version": 1, "flwr": _flwr_version(), "updates": []}


def _write_index(out: Path, index: dict[str, Any]) -> None:
    tmp = out / ".capture.json.tmp"
    tmp.write_text(json.dumps(index, indent=2), encoding="utf-8")
    os.replace(tmp, out / "capture.json")
    apply_mode(out / "capture.json")
