"""The worker processes of a model split over GPUs: one per GPU beyond the first, started by the engine itself
(torch.multiprocessing, spawn), so a user never runs torchrun.

Rank 0 is the user's process. Workers are ranks 1 .. N-1: each joins torch.distributed's default process
group (NCCL on GPUs, gloo on CPUs; rank r takes the GPU r places after rank 0's), loads its slice of the
model, builds a ModelRunner over it and then runs, in order, the plans rank 0 sends through its pipe: a
runner call as (name, arguments). Every rank makes the same calls in the same order, so the model's
collectives meet. A worker exits on `close`, when its pipe closes (rank 0 has gone), and, should it be waiting
inside a collective then, when it sees its parent process gone. On a CPU the processes share its cores: each
runs torch on an equal share of this process's threads (this one too, until `close`).
"""
from __future__ import annotations

import os
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..methods.base import DecodeMethod
from ..models.loader import load_model
from ..models.parallel import TensorParallel
from .model_runner import ModelRunner

#: NVLink multicast (NVLS) off for NCCL, torch's symmetric memory and NVSHMEM, in the engine and its workers
NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
CLOSE_SECONDS = 30  # how long `close` waits for a worker to exit before killing it
PARENT_POLL_SECONDS = 1.0


@dataclass
class ShardSpec:
    """What a worker builds its runner from (the same as rank 0's)."""

    model: str
    dtype: torch.dtype
    compile_mode: str | None  # `Transformer.compile_decode`'s mode; None: the decode step is not compiled
    method: type[DecodeMethod]
    method_options: dict[str, Any]
    runner_options: dict[str, Any]  # ModelRunner's keyword arguments
    decode_linear: str = "torch"  # `Transformer.decode_linear`


def rank_device(device: torch.device, rank: int) -> torch.device:
    """The device of `rank` when rank 0's is `device`: the GPU `rank` places further, or the same CPU."""
    return torch.device("cuda", (device.index or 0) + rank) if device.type == "cuda" else device


class Workers:
    """Starts ranks 1 .. world_size - 1 and joins the process group with them as rank 0 (`tp`)."""

    def __init__(self, world_size: int, device: torch.device, spec: ShardSpec) -> None:
        if dist.is_initialized():
            raise RuntimeError("torch.distributed is already initialised in this process (another tensor-parallel "
                               "LLM, or torchrun): close that LLM first (llm.close()); the engine starts its own "
                               "worker processes")
        if device.type == "cuda" and (device.index or 0) + world_size > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size={world_size} needs GPUs {device.index or 0} .. "
                             f"{(device.index or 0) + world_size - 1}; {torch.cuda.device_count()} are visible")
        os.environ.update(NVLS_OFF)  # the workers inherit the environment
        self.threads = torch.get_num_threads()  # this process's, given back at `close`
        threads = max(1, self.threads // world_size) if device.type == "cpu" else self.threads
        address = f"tcp://127.0.0.1:{_free_port()}"
        context = mp.get_context("spawn")
        self.processes: list[mp.Process] = []
        self.connections: list[Connection] = []
        self.closed = False
        for rank in range(1, world_size):
            ours, theirs = context.Pipe()
            # Not daemonic: a worker's torch.compile may start processes of its own.
            process = context.Process(target=worker_main, name=f"sparsedecode-rank{rank}",
                                      args=(rank, world_size, address, device, spec, theirs, os.getpid(),
                                            threads))
            process.start()
            theirs.close()  # only the worker holds its end: when it exits, ours reads end-of-file
            self.processes.append(process)
            self.connections.append(ours)
        torch.set_num_threads(threads)  # threads spinning against each other would stall every collective
        try:
            self.expect("started")
            _join_group(address, 0, world_size, rank_device(device, 0))
        except BaseException:
            self.close()
            raise
        self.tp = TensorParallel(0, world_size, rank_device(device, 0))

    def send(self, name: str, *args: Any, reply: bool = False) -> None:
        """Have every worker run its runner's `name(*args)` (with `reply`, send back the result: `replies`)."""
        if self.closed:
            raise RuntimeError("this model's tensor-parallel workers were closed (llm.close()); load it again")
        for rank, connection in enumerate(self.connections, start=1):
            try:
                connection.send((name, args, reply))
            except OSError:
                raise self._gone(rank) from None

    def replies(self) -> list[Any]:
        """Each worker's result of the last plan sent with `reply`."""
        return [self._receive(rank) for rank in range(1, len(self.connections) + 1)]

    def expect(self, state: str) -> None:
        """Wait until every worker reports `state` ("started", "loaded", "ready"); raise what one that failed
        reports."""
        for rank in range(1, len(self.connections) + 1):
            message = self._receive(rank)
            if message != state:
                self.close()
                raise RuntimeError(f"tensor-parallel worker {rank} failed before it was {state}:\n{message}")

    def _receive(self, rank: int) -> Any:
        try:
            return self.connections[rank - 1].recv()
        except (EOFError, OSError):
            raise self._gone(rank) from None

    def _gone(self, rank: int) -> RuntimeError:
        process = self.processes[rank - 1]
        process.join(5)
        return RuntimeError(f"tensor-parallel worker {rank} has exited (exit code {process.exitcode}); its output "
                            "above says why")

    def close(self) -> None:
        """Stop the workers and leave the process group (once; later calls do nothing)."""
        if self.closed:
            return
        self.closed = True
        for connection in self.connections:
            try:
                connection.send(("close", (), False))
            except OSError:  # that worker has gone already
                pass
        if dist.is_initialized():
            dist.destroy_process_group()
        for process in self.processes:
            process.join(CLOSE_SECONDS)
            if process.is_alive():
                process.kill()
                process.join()
        for connection in self.connections:
            connection.close()
        torch.set_num_threads(self.threads)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_group(address: str, rank: int, world_size: int, device: torch.device) -> None:
    if device.type == "cuda":
        dist.init_process_group("nccl", init_method=address, rank=rank, world_size=world_size, device_id=device)
    else:
        dist.init_process_group("gloo", init_method=address, rank=rank, world_size=world_size)


def _exit_with_parent(parent_pid: int) -> None:
    """A worker whose rank 0 died inside a collective would wait there: end it once the parent is gone."""
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(1)


def worker_main(rank: int, world_size: int, address: str, device: torch.device, spec: ShardSpec,
                connection: Connection, parent_pid: int, threads: int) -> None:
    """A worker process: join the group, load this rank's slice, build its runner, run rank 0's plans."""
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    torch.set_num_threads(threads)
    connection.send("started")
    device = rank_device(device, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _join_group(address, rank, world_size, device)
    try:
        loaded = load_model(spec.model, device, spec.dtype, TensorParallel(rank, world_size, device))
    except Exception:  # noqa: BLE001 - rank 0 raises it, before any collective would wait for this rank
        connection.send(traceback.format_exc())
        return
    connection.send("loaded")
    if spec.compile_mode:
        loaded.model.compile_decode(spec.compile_mode)
    loaded.model.decode_linear = spec.decode_linear
    method = spec.method(loaded.config, **spec.method_options)
    runner = ModelRunner(loaded.model, loaded.config, method, **spec.runner_options)
    connection.send("ready")
    while True:
        try:
            name, args, reply = connection.recv()
        except EOFError:  # rank 0 has gone
            return
        if name == "close":
            dist.destroy_process_group()
            return
        if name == "use_method":  # a method travels as its class and options; built here for this rank
            method_type, options = args
            result = runner.use_method(method_type(loaded.config, **options))
        else:
            result = getattr(runner, name)(*args)
        if reply:
            connection.send(result)
