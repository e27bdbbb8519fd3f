"""What the distributed-scan tests run in other processes: a tiny model and dataset (importable by name, for
``torch.multiprocessing`` children and for the CLI under torchrun), and the worker of the Python-API test.

``rows()``: a dataset that kills its own process (SIGKILL, as an OOM killer would) when it reads row
``HARDMINE_TEST_KILL_AT`` while the file ``HARDMINE_TEST_KILL_MARKER`` exists (the file is removed first, so
the rerun goes through). With ``HARDMINE_TEST_KILL_LEDGER`` (a rank's ``progress.json``) and
``HARDMINE_TEST_KILL_AFTER`` (a number of shards) it first waits until that ledger records that many shards:
shards are written by a thread beside the extraction, so the last ones cut may still be on their way when a
process dies, and the test wants a rank killed with complete shards behind it.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

N_ROWS, D_IN, N_CLASSES = 240, 6, 3


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, 16), nn.ReLU(), nn.Linear(16, N_CLASSES)).eval()


def arrays(n: int = N_ROWS) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(1)
    x = g.normal(size=(n, D_IN)).astype(np.float32)
    y = g.integers(0, N_CLASSES, n).astype(np.int64)
    return x, y


class Rows(Dataset):
    def __init__(self) -> None:
        self.x, self.y = arrays()
        self.kill_at = int(os.environ.get("HARDMINE_TEST_KILL_AT", "-1"))
        self.marker = os.environ.get("HARDMINE_TEST_KILL_MARKER")

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i == self.kill_at and self.marker and os.path.exists(self.marker):
            os.remove(self.marker)
            _wait_for_shards(os.environ.get("HARDMINE_TEST_KILL_LEDGER"), int(os.environ.get("HARDMINE_TEST_KILL_AFTER", "0")))
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.from_numpy(self.x[i]), torch.tensor(self.y[i])


def _wait_for_shards(ledger: str | None, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while ledger and n and time.monotonic() < deadline:
        try:
            if len(json.loads(Path(ledger).read_text())["shards"]) >= n:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)


def rows() -> Dataset:
    return Rows()


def population_data() -> tuple[np.ndarray, np.ndarray]:
    """Gradient-like rows and labels whose population statistics the ranks sum (rows of very different norms)."""
    g = np.random.default_rng(2)
    z = (g.normal(size=(101, 5)) * g.lognormal(0, 2, size=(101, 1))).astype(np.float32)
    return z, g.integers(0, N_CLASSES, 101)


def api_worker(rank: int, world: int, init_file: str, out: str, held: str, results: str) -> None:
    """One rank of a user's own gloo job: sums its rows' population statistics with the other ranks
    (``Job.sum_population``), then calls ``hardmine.scan`` into ``held`` (a directory another job holds: every
    rank must get the error), then into ``out``."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import torch.distributed as dist

    import hardmine
    from hardmine.scan.distributed import Job, row_range
    from hardmine.score import population_pass

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        z, labels = population_data()
        start, stop = row_range(len(z), rank, world)
        job = Job(rank, world, dist.new_group(backend="gloo"), created=False)
        pop = job.sum_population(population_pass([(0, z[start:stop])], z.shape[1], labels[start:stop], N_CLASSES))
        job.close()
        np.savez(Path(results, f"pop-{rank}.npz"), n=pop.n, unit_sum=pop.unit_sum, plain_sum=pop.plain_sum,
                 class_count=pop.class_count, class_unit_sum=pop.class_unit_sum, class_plain_sum=pop.class_plain_sum)
        model = make_model()
        loader = DataLoader(Rows(), batch_size=32)
        try:
            hardmine.scan(model, loader, out=held, dim=8, shard_rows=48)
            held_error = None
        except ValueError as exc:
            held_error = str(exc)
        result = hardmine.scan(model, loader, out=out, dim=8, shard_rows=48)
        summary = {"held_error": held_error, "n_samples": result.n_samples, "still_initialised": dist.is_initialized()}
        Path(results, f"{rank}.json").write_text(json.dumps(summary))
    finally:
        dist.destroy_process_group()
