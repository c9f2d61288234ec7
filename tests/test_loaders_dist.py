"""Two real gloo ranks read disjoint slices of each global batch, and their union is the global batch."""

import json

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from loaders.loader import LoaderConfig, build_loader
from loaders.sampler import MixConfig, global_order
from loaders.shards import load_shard_root
from train.world import free_port

MIX = dict(ratios="sdss=0.34,decals=0.33,hst=0.33", global_batch_size=12, epoch_samples=48, seed=5)


def _rank_main(rank: int, world_size: int, port: int, shard_root: str, out_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        loader = build_loader(LoaderConfig(shard_root=shard_root, backend="torch", image_size=32, num_workers=0),
                              MixConfig(**MIX), rank=rank, world_size=world_size)
        steps = []
        for batch in loader:
            gathered: list = [None] * world_size
            dist.all_gather_object(gathered, {"keys": batch.keys, "n": len(batch), "images": list(batch.images.shape)})
            steps.append(gathered)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump({"steps": steps, "batches": len(loader)}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_read_disjoint_slices_of_the_global_batch(shard_root, tmp_path):
    out = tmp_path / "keys.json"
    mp.start_processes(_rank_main, args=(2, free_port(), str(shard_root), str(out)), nprocs=2, join=True,
                       start_method="spawn")
    result = json.loads(out.read_text())
    surveys = load_shard_root(shard_root, ["sdss", "decals", "hst"])
    order = global_order({s.name: s.shard_counts for s in surveys}, MixConfig(**MIX), epoch=0)
    keys = [surveys[s].key(shard, index) for s, shard, index in order.samples]
    assert len(result["steps"]) == result["batches"] == order.num_batches == 4
    for step, (rank0, rank1) in enumerate(result["steps"]):
        assert rank0["n"] == rank1["n"] == 6 and rank0["images"] == [6, 3, 32, 32]
        assert not set(rank0["keys"]) & set(rank1["keys"])
        assert rank0["keys"] + rank1["keys"] == keys[step * 12:(step + 1) * 12]
