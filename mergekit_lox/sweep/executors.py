"""Where the sweep's tasks run.

``local`` (default): one after another in this process. ``ray``: one Ray task per
point (and one for the reference model), each with its own resources, scheduled by
Ray on whatever cluster ``ray.init`` connects to; tasks and results are small
dicts of paths and numbers, the weights stay on (shared) disk. Both go through
``drive``: the same retry (a failed task runs once more) and the same record.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

from mergekit_lox.errors import one_line
from mergekit_lox.sweep.pipeline import execute
from mergekit_lox.sweep.spec import SweepError

EXECUTORS = ("local", "ray")


class ExecutorError(SweepError):
    """The executor cannot start; the message says what to install or fix."""


class LocalExecutor:
    """Sequential, in this process: a handle is the task itself, run when waited for."""

    name = "local"

    def submit(self, task: Dict[str, Any]):
        return task

    def wait(self, handles: List[Any]) -> Tuple[int, Dict[str, Any]]:
        return 0, execute(handles[0])

    def cancel(self, handles: List[Any]) -> None:
        pass

    def close(self) -> None:
        pass


def failed(error: BaseException) -> Dict[str, Any]:
    """The result of a task whose worker failed (crashed, killed, lost its node)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return {"status": "failed", "error": one_line(Exception(text)), "eval": None, "seconds": None, "model": None}


class RayExecutor:
    """One Ray task per unit of work, ``num_cpus``/``num_gpus`` each; Ray schedules them."""

    name = "ray"

    def __init__(self, address: Optional[str], num_cpus: float, num_gpus: float):
        try:
            import ray
        except ImportError:
            raise ExecutorError("--executor ray needs Ray: pip install 'mergekit-lox[ray]'") from None
        self.ray = ray
        # A Ray already initialised by the caller (a notebook, a test) is used as it is
        # and left running; otherwise connect to --ray-address when given, else start a
        # new local instance ("local": not whatever cluster /tmp/ray or RAY_ADDRESS
        # names, which plain ray.init() would join), and shut it down at the end.
        self.started = not ray.is_initialized()
        if self.started:
            try:
                ray.init(address=address or "local")
            except Exception as error:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ...
                where = f" at {address}" if address else ""
                raise ExecutorError(f"cannot start or reach a Ray cluster{where}: {one_line(error)}") from None
        self.remote = ray.remote(execute).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)

    def submit(self, task: Dict[str, Any]):
        return self.remote.remote(task)

    def wait(self, handles: List[Any]) -> Tuple[int, Dict[str, Any]]:
        done, _ = self.ray.wait(handles, num_returns=1)
        position = handles.index(done[0])
        try:
            return position, self.ray.get(done[0])
        except Exception as error:  # noqa: BLE001 - a lost worker or node fails this task only
            return position, failed(error)

    def cancel(self, handles: List[Any]) -> None:
        for handle in handles:
            self.ray.cancel(handle, force=True)

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def gpus_for(sweep, gpus_per_point: Optional[float]) -> float:
    """``--gpus-per-point``, else 1 when the eval or the merge asks for CUDA, else 0."""
    if gpus_per_point is not None:
        return gpus_per_point
    device = str(sweep.eval.get("device", "cpu"))
    merge = sweep.mergekit_options
    wants_cuda = device.startswith("cuda") or "--cuda" in merge or any(o.startswith("--device=cuda") for o in merge)
    wants_cuda = wants_cuda or any(str(a.get("device", "cpu")).startswith("cuda") for a in sweep.attacks.values())
    wants_cuda = wants_cuda or any(
        a == "--device" and b.startswith("cuda") for a, b in zip(merge, merge[1:], strict=False)
    )
    return 1.0 if wants_cuda else 0.0


def make_executor(name: str, sweep, address: Optional[str], gpus_per_point: Optional[float], cpus_per_point: float):
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address, cpus_per_point, gpus_for(sweep, gpus_per_point))
    raise ExecutorError(f"unknown executor {name!r}: local or ray")


def drive(executor, tasks: List[Dict[str, Any]], on_done: Callable[[Dict[str, Any], Dict[str, Any], int], None]):
    """Run every task; one that fails runs once more. ``on_done(task, result, attempts)``
    as each finishes (in the driver, so the record is written by one process). Tasks with
    the same ``group`` (a staged sweep's points sharing one defense and its attacks) run
    one after another, so that no attack runs twice; the others run side by side."""
    waiting, running, busy = list(tasks), [], set()

    def start_ready(front: bool) -> None:
        for task in list(waiting):
            group = task.get("group")
            if group is not None and group in busy:
                continue
            waiting.remove(task)
            entry = (executor.submit(task), task, 1)
            running.insert(0, entry) if front else running.append(entry)
            if group is not None:
                busy.add(group)

    start_ready(front=False)
    try:
        while running:
            position, result = executor.wait([handle for handle, _, _ in running])
            _, task, attempt = running.pop(position)
            if result["status"] != "ok" and attempt == 1:
                running.insert(0, (executor.submit(task), task, 2))
                continue
            busy.discard(task.get("group"))
            on_done(task, result, attempt)
            start_ready(front=True)  # locally: a group's next point right after it
    except BaseException:
        executor.cancel([handle for handle, _, _ in running])
        raise
