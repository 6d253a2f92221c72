"""``ray``: ranks 1..N-1 as Ray actors, placed with a placement group (one bundle per rank).

The cluster: ``ray.init()`` connects to the one ``RAY_ADDRESS`` names, else to a cluster already
running on this machine (``ray start --head``, and ``ray start --address=HEAD:6379`` on the other
nodes, as vLLM documents), else starts a local one (stopped again at shutdown). The driver (rank 0)
stays in the engine's process; the actors join its process groups at the driver's node address.

Each actor runs ``worker.run_worker`` as one long call (its step loop); the monitor thread waits on
those calls: one ending while the engine runs means that rank is gone (the actor died, or its loop
raised), and is reported at once. Actors are owned by the driver's process, so Ray ends them when it
ends (no orphans).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

from lmserve.config import EngineConfig
from lmserve.executor.distributed import DistributedExecutor, local_cpu_count, without_driver_only
from lmserve.executor.worker import WorkerSpec

logger = logging.getLogger(__name__)
_PLACEMENT_TIMEOUT_S = 60.0
_STOP_WAIT_S = 5.0


class _RankActor:
    """One worker rank (wrapped by ``ray.remote`` at run time, so importing this module needs no Ray)."""

    def node_info(self) -> tuple[str, int, int]:
        """(node address, CPUs there, this actor's process id)."""
        import os

        import ray

        from lmserve.executor.distributed import local_cpu_count
        return ray.util.get_node_ip_address(), local_cpu_count(), os.getpid()

    def run(self, spec: WorkerSpec) -> None:
        import logging as _logging
        import os

        _logging.basicConfig(level=os.environ.get("LMSERVE_WORKER_LOG_LEVEL", "WARNING"))
        os.environ["OMP_NUM_THREADS"] = str(spec.num_threads)
        from lmserve.executor.worker import run_worker

        run_worker(spec)


class RayExecutor(DistributedExecutor):
    backend_name = "ray"

    def __init__(self, config: EngineConfig, logitsprocs_classes: list[type]) -> None:
        try:
            import ray
        except ImportError:
            raise ValueError("--distributed-executor-backend ray needs Ray: pip install ray, or use "
                             "--distributed-executor-backend mp on one machine") from None
        self._ray = ray
        self._started_ray = False
        self._actors: list = []
        self._runs: list = []
        self._pg = None
        self.worker_pids: list[int] = []
        self._stop_monitor = threading.Event()
        super().__init__(config, logitsprocs_classes)

    def _driver_host(self) -> str:
        ray = self._ray
        if not ray.is_initialized():
            ray.init(ignore_reinit_error=True, log_to_driver=True)
            self._started_ray = True  # this process connected (or started a local cluster): ray.shutdown() at the end
        return ray.util.get_node_ip_address()

    def _start_workers(self, host: str, port: int) -> int:
        ray = self._ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        n = self.world_size - 1
        self._pg = placement_group([{"CPU": 1}] * n, strategy="PACK")
        ready, _ = ray.wait([self._pg.ready()], timeout=_PLACEMENT_TIMEOUT_S)
        if not ready:
            raise RuntimeError(f"Ray could not place {n} worker rank(s) of 1 CPU each within "
                               f"{_PLACEMENT_TIMEOUT_S:g} s (cluster resources: {ray.cluster_resources()}); "
                               "add nodes or lower --tensor-parallel-size / --pipeline-parallel-size")
        actor_cls = ray.remote(num_cpus=1)(_RankActor)
        self._actors = [actor_cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=self._pg, placement_group_bundle_index=i)).remote() for i in range(n)]
        infos = ray.get([a.node_info.remote() for a in self._actors])
        self.worker_pids = [pid for _, _, pid in infos]  # rank r is worker_pids[r - 1] (on its node)
        per_node = Counter(ip for ip, _, _ in infos)
        per_node[host] += 1  # the driver
        local_index: Counter = Counter({host: 1})
        config = without_driver_only(self.config)
        for rank, (actor, (ip, cpus, _)) in enumerate(zip(self._actors, infos), start=1):
            spec = WorkerSpec(config=config, rank=rank, host=host, port=port,
                              num_threads=max(1, cpus // per_node[ip]), local_rank=local_index[ip], node=ip)
            local_index[ip] += 1
            self._runs.append(actor.run.remote(spec))
        return max(1, local_cpu_count() // per_node[host])

    def _first_dead_worker(self) -> str | None:
        done, _ = self._ray.wait(self._runs, num_returns=1, timeout=0)
        return self._describe(done[0]) if done else None

    def _describe(self, ref) -> str:
        rank = self._runs.index(ref) + 1
        who = f"Ray worker rank {rank} (pid {self.worker_pids[rank - 1]})"
        try:
            self._ray.get(ref)
            return f"{who} left its step loop"
        except Exception as e:  # noqa: BLE001 - the reason is the message
            return f"{who} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

    def _start_monitor(self) -> None:
        threading.Thread(target=self._watch, name="lmserve-ray-monitor", daemon=True).start()

    def _watch(self) -> None:
        while not self._stop_monitor.is_set():
            done, _ = self._ray.wait(self._runs, num_returns=1, timeout=0.5)
            if done and not self._closed:
                self._report_failure(f"{self._describe(done[0])}: the engine cannot continue")
                return
            if done:
                return

    def _stop_workers(self, graceful: bool) -> None:
        ray = self._ray
        self._stop_monitor.set()
        if graceful and self._runs:
            ray.wait(self._runs, num_returns=len(self._runs), timeout=_STOP_WAIT_S)
        for actor in self._actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already dead
                pass
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group
            try:
                remove_placement_group(self._pg)
            except Exception:  # noqa: BLE001
                pass
        if self._started_ray:
            ray.shutdown()

