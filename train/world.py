"""Where this process sits in the job: the one place that reads the torch.distributed environment."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env(env: Mapping[str, str]) -> World:
    """The World that torchrun (or launch's SLURM mapping) describes in RANK/LOCAL_RANK/WORLD_SIZE/MASTER_*."""
    try:
        return World(rank=int(env.get("RANK", 0)), local_rank=int(env.get("LOCAL_RANK", 0)),
                     world_size=int(env.get("WORLD_SIZE", 1)), master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                     master_port=int(env.get("MASTER_PORT", 0) or 0))
    except ValueError as err:
        raise ValueError(f"malformed torch.distributed environment: {err}") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect() -> World:
    """This process's World. A plain `python -m train` becomes a world of one with a free local port,
    written back to the environment because torch.distributed's env:// rendezvous reads it there."""
    world = world_from_env(os.environ)
    if "RANK" not in os.environ:
        world = World(master_port=world.master_port or free_port())
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR=world.master_addr,
                          MASTER_PORT=str(world.master_port))
    return world
