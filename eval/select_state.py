"""The streaming state of `python -m eval select`, saved after every chunk: a killed selection continues where it
stopped instead of scoring the pool again (MC dropout over 10^6 galaxies is the expensive part)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from eval.select import TopCandidates


def progress_path(out: Path) -> Path:
    return out.with_name(out.name + ".progress.npz")


class Checkpoint:
    """Candidates so far (each survey's TopCandidates and the labelled embeddings) and the stream position."""

    def __init__(self, out: Path, signature: dict):
        self.path = progress_path(out)
        self.signature = json.dumps(signature, sort_keys=True, default=str)

    def load(self, tops: dict[str, TopCandidates], labelled: TopCandidates | None) -> dict | None:
        """Restore the candidates in place and return the position, or None (nothing saved, or saved by a
        selection with other arguments, weights or shards, which is then ignored)."""
        if not self.path.is_file():
            return None
        with np.load(self.path, allow_pickle=False) as saved:
            if str(saved["signature"]) != self.signature:
                return None
            for name, top in {**tops, **({"__labelled": labelled} if labelled is not None else {})}.items():
                top.scores, top.ids, top.payload = (saved[f"{name}/{part}"] for part in ("scores", "ids", "payload"))
            return json.loads(str(saved["position"]))

    def save(self, tops: dict[str, TopCandidates], labelled: TopCandidates | None, position: dict) -> None:
        arrays = {"signature": np.array(self.signature), "position": np.array(json.dumps(position))}
        for name, top in {**tops, **({"__labelled": labelled} if labelled is not None else {})}.items():
            arrays.update({f"{name}/scores": top.scores, f"{name}/ids": top.ids, f"{name}/payload": top.payload})
        partial = self.path.with_name(self.path.name + ".partial.npz")
        np.savez(partial, **arrays)
        partial.replace(self.path)  # a kill mid-write leaves the previous checkpoint whole

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
