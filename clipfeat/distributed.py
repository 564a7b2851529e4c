"""Rank/world detection from the torchrun environment, chunk assignment, barrier.

Ranks never exchange data: each takes the chunks ``i % world == rank`` of the shared plan
and writes only its own shards. The process group is used for barriers alone (gloo on the
CPU, nccl on CUDA), so a job begun with N ranks can be finished with M.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

from clipfeat.errors import ExtractionError

logger = logging.getLogger(__name__)

# Walking millions of files or finishing a slow shard can keep ranks apart for a long time.
BARRIER_TIMEOUT = datetime.timedelta(hours=6)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, chunk_id: int) -> bool:
        return chunk_id % self.world == self.rank

    def barrier(self) -> None:
        """Wait for every rank. ExtractionError when another rank died (its own error names
        the cause; this one's shards are intact)."""
        if self.world <= 1:
            return
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized():
            try:
                if tdist.get_backend() == "nccl":
                    import torch

                    tdist.barrier(device_ids=[torch.cuda.current_device()])
                else:
                    tdist.barrier()
            except RuntimeError as err:  # gloo/nccl: a peer crashed or exited with an error
                text = str(err).strip()
                # "[.../pair.cc:553] Connection closed by peer [...]:N. This is typically ..."
                detail = text.splitlines()[0].split("] ", 1)[-1].split(". ", 1)[0] if text \
                    else type(err).__name__
                raise ExtractionError(
                    f"rank {self.rank}: another rank stopped ({detail[:120]}); see its error "
                    "above. Finished shards are intact: rerun the same command to resume"
                ) from None

    def close(self) -> None:
        if self.initialized_here:
            import torch.distributed as tdist

            if tdist.is_initialized():
                tdist.destroy_process_group()


def env_world() -> tuple[int, int, int]:
    """(rank, world, local_rank) from torchrun/Slurm-launched torchrun variables."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def setup(device: str) -> Dist:
    """Join the torchrun process group when launched under torchrun; a no-op otherwise."""
    rank, world, local = env_world()
    if world <= 1:
        return Dist()
    import torch.distributed as tdist

    if tdist.is_initialized():
        return Dist(tdist.get_rank(), tdist.get_world_size(), local, False)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    kwargs = {}
    if backend == "nccl":
        import torch

        kwargs["device_id"] = torch.device(device)
    tdist.init_process_group(backend=backend, timeout=BARRIER_TIMEOUT, **kwargs)
    logger.info("joined process group: rank %d of %d (%s)", rank, world, backend)
    return Dist(rank, world, local, True)
