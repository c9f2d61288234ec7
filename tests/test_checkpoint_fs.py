"""Checkpoints on a shared filesystem: `latest` only ever names a complete checkpoint, a crash at any point of a save
leaves what start-up repairs into the newest complete checkpoint, and every rank waits (bounded, then a clear error)
to see what rank 0 published. No DeepSpeed run: the real Engine wrapper drives a stand-in for DeepSpeed's engine."""

import builtins
import io
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from train import checkpoint
from train.world import World

IDENTITY = {"schema": ["a"], "model": {"backbone": {"hidden_size": 8}}, "stage": "head", "lora": None}
STATE_FILE = "mp_rank_00_model_states.pt"
# Where the second save of step 4 dies -> which save of step 4 the next run resumes: the second one once its
# meta.json is written (it is complete) and the renames began, the first one before that.
RESUMED_RUN = {"before meta.json": 1, "before the renames": 1, "between the renames": 2,
               "before the old copy is removed": 2, "while pointing latest at it": 2}
CRASH_POINTS = list(RESUMED_RUN)


class _DeepSpeedLike:
    """What train.engine.Engine calls on a DeepSpeed engine. save_checkpoint writes a state file and, unless told
    not to, `latest` naming the tag it saved, as DeepSpeed's runtime/engine.py does on rank 0."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest=True):
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / tag / STATE_FILE).write_text(json.dumps(client_state))
        if save_latest:
            (Path(save_dir) / "latest").write_text(tag)
        return True

    def load_checkpoint(self, load_dir, tag):
        path = Path(load_dir) / tag / STATE_FILE
        return str(path), json.loads(path.read_text())


def _convert(source: Path, target: Path) -> None:
    """ds_to_universal's part here: a folder of DeepSpeed files next to the source (it writes no meta.json)."""
    shutil.copytree(source, target)
    (target / "meta.json").unlink()


def _checkpointer(out: Path, world: World = World(), timeout_s: float = 5.0) -> checkpoint.Checkpointer:
    from train.engine import Engine
    engine = Engine.__new__(Engine)  # the real save/load wrapper, around the stand-in
    engine.engine, engine.config = _DeepSpeedLike(), {}
    return checkpoint.Checkpointer(engine, out, world, keep=5, meta={"world_size": world.world_size, **IDENTITY},
                                   convert=_convert, on_event=lambda record: None, visibility_timeout_s=timeout_s)


class Crash(Exception):
    """The process dies here: what it wrote so far stays on disk, nothing after runs."""


class _DiesWritingStep4:
    """A file opened for writing that dies when step 4's tag is written into it (after open truncated it)."""

    def __init__(self, file):
        self.file = file

    def write(self, data):
        if data == "step00000004":
            raise Crash("while pointing latest at it")
        return self.file.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def __getattr__(self, name):
        return getattr(self.file, name)


def _crash_at(monkeypatch, point: str) -> None:
    """Patch the file operation at `point` to raise Crash (the publish's renames counted from here on)."""
    renames, rename, replace, rmtree, real_open = [], os.rename, os.replace, shutil.rmtree, io.open

    def crash(*args, **kwargs):
        raise Crash(point)

    def counting_rename(src, dst, *args, **kwargs):
        renames.append(src)
        if len(renames) == (1 if point == "before the renames" else 2):
            raise Crash(point)
        return rename(src, dst, *args, **kwargs)

    def rmtree_old(path, *args, **kwargs):
        if Path(path).name.startswith("partial-old-") and Path(path).exists():
            raise Crash(point)
        return rmtree(path, *args, **kwargs)

    def open_latest(file, mode="r", *args, **kwargs):
        opened = real_open(file, mode, *args, **kwargs)
        return _DiesWritingStep4(opened) if Path(str(file)).name == "latest" and "w" in mode else opened

    def replace_latest(src, dst, *args, **kwargs):
        if Path(dst).name == "latest" and Path(src).read_text() == "step00000004":
            crash()
        return replace(src, dst, *args, **kwargs)

    if point == "before meta.json":
        monkeypatch.setattr(checkpoint, "write_meta", crash)
    elif point in ("before the renames", "between the renames"):
        monkeypatch.setattr(os, "rename", counting_rename)
    elif point == "before the old copy is removed":
        monkeypatch.setattr(shutil, "rmtree", rmtree_old)
    else:
        monkeypatch.setattr(io, "open", open_latest)
        monkeypatch.setattr(builtins, "open", open_latest)
        monkeypatch.setattr(os, "replace", replace_latest)


def _step4_saved_twice_the_second_save_crashing(out: Path, monkeypatch, point: str) -> None:
    """Run 1 saves steps 3 and 4 and converts step 4 to its universal form; run 2, resumed from step 3, saves
    step 4 again (replacing run 1's) and dies at `point`."""
    first = _checkpointer(out)
    for step in (3, 4):
        first.save(step, {"step": step, "sampler": {"run": 1}}, "periodic")
    root = out / "checkpoints"
    shutil.copytree(root / "step00000004", root / "step00000004_universal")  # as Checkpointer.load converts it
    second = _checkpointer(out)
    _crash_at(monkeypatch, point)
    with pytest.raises(Crash):
        second.save(4, {"step": 4, "sampler": {"run": 2}}, "periodic")
    monkeypatch.undo()


def _assert_latest_names_a_complete_checkpoint(root: Path) -> None:
    if (root / "latest").exists():
        tag = (root / "latest").read_text().strip()
        assert tag and not tag.startswith("partial-") and (root / tag / "meta.json").is_file(), f"latest: {tag!r}"


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_latest_only_ever_names_a_complete_checkpoint(tmp_path, process_group, monkeypatch, point):
    """DeepSpeed's own `latest` named the partial- folder until rank 0 rewrote it, in place."""
    _step4_saved_twice_the_second_save_crashing(tmp_path, monkeypatch, point)
    _assert_latest_names_a_complete_checkpoint(tmp_path / "checkpoints")


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_start_up_resumes_the_newest_complete_checkpoint_after_a_crash(tmp_path, process_group, monkeypatch,
                                                                       point):
    """A crash between publish's two renames stranded both copies of step 4 under partial- names."""
    _step4_saved_twice_the_second_save_crashing(tmp_path, monkeypatch, point)
    root = tmp_path / "checkpoints"
    plan = checkpoint.plan_resume(tmp_path, "auto", IDENTITY, 1, 0, resolve=checkpoint.shared_resolver(World()))
    assert plan.tag == "step00000004", sorted(p.name for p in root.iterdir())
    client = _checkpointer(tmp_path).load(plan)
    assert client["step"] == 4 and client["sampler"] == {"run": RESUMED_RUN[point]}
    assert not list(root.glob("partial-old-*"))
    assert (root / "latest").read_text() == "step00000004"
    universal = root / "step00000004_universal"  # converted from run 1's step 4: only valid beside it
    assert not universal.exists() or json.loads((universal / STATE_FILE).read_text())["sampler"] == client["sampler"]


def _version(folder: Path) -> str | None:
    return (folder / "version").read_text() if (folder / "version").is_file() else None


@pytest.mark.parametrize("before, after", [
    ({"partial-old-step00000004": "old", "step00000004": "new"}, {"step00000004": "new"}),
    ({"partial-old-step00000004": "old", "partial-step00000004": "new"}, {"step00000004": "new"}),
    ({"partial-old-step00000004": "old", "partial-step00000004": None}, {"step00000004": "old"}),
    ({"partial-old-step00000004": None, "step00000003": "3"}, {"step00000003": "3"}),
], ids=["after-second-rename", "between-renames", "between-renames-new-incomplete", "old-incomplete"])
def test_start_up_repair_finishes_or_undoes_an_interrupted_publish(tmp_path, before, after):
    """Folder -> version (None: no meta.json, an incomplete folder); what is left complete, and `latest`."""
    root = tmp_path / "checkpoints"
    for name, version in before.items():
        (root / name).mkdir(parents=True)
        if version is not None:
            (root / name / "version").write_text(version)
            (root / name / "meta.json").write_text("{}")
    (root / "latest").write_text("partial-step00000004")  # as DeepSpeed left it
    checkpoint.repair_checkpoints(tmp_path)
    complete = {p.parent.name: _version(p.parent) for p in root.glob("*/meta.json")}
    assert complete == after
    assert not list(root.glob("partial-old-*"))
    assert (root / "latest").read_text() == max(after)


def _publish_later(root: Path, partial: str, final: str, delay_s: float) -> threading.Thread:
    """Rank 0 on another node: publishes `partial` as `final` once it exists, `delay_s` later."""
    def run():
        while not (root / partial).is_dir():
            time.sleep(0.01)
        time.sleep(delay_s)
        (root / partial / "meta.json").write_text(json.dumps({"step": 4, "sampler": {}}))
        os.rename(root / partial, root / final)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_rank_returns_from_a_save_once_it_sees_the_published_checkpoint(tmp_path, process_group):
    """Rank 1 of 2 (the gloo group of one stands in for the collectives): rank 0 publishes late."""
    root = tmp_path / "checkpoints"
    thread = _publish_later(root, "partial-step00000004", "step00000004", delay_s=0.4)
    assert _checkpointer(tmp_path, World(rank=1, world_size=2)).save(4, {"step": 4, "sampler": {}}, "periodic")
    assert (root / "step00000004" / "meta.json").is_file()
    thread.join()


def test_a_rank_loads_the_universal_form_once_it_sees_it(tmp_path, process_group):
    root = tmp_path / "checkpoints"
    (root / "step00000003").mkdir(parents=True)
    (root / "step00000003" / "meta.json").write_text(json.dumps({"step": 3, "sampler": {}, "world_size": 1}))
    (root / "partial-step00000003_universal").mkdir()
    thread = _publish_later(root, "partial-step00000003_universal", "step00000003_universal", delay_s=0.4)
    (root / "partial-step00000003_universal" / STATE_FILE).write_text(json.dumps({"step": 3, "sampler": {"at": 3}}))
    client = _checkpointer(tmp_path, World(rank=1, world_size=2)).load(checkpoint.ResumePlan("step00000003", 3, 1,
                                                                                             True))
    assert client == {"step": 3, "sampler": {"at": 3}}
    thread.join()


def test_a_rank_that_never_sees_the_checkpoint_fails_with_a_clear_error(tmp_path, process_group):
    """out_dir on node-local disk: rank 0's publish never shows on this node."""
    with pytest.raises(TimeoutError) as caught:
        _checkpointer(tmp_path, World(rank=1, world_size=2), timeout_s=0.5).save(4, {"step": 4, "sampler": {}},
                                                                                 "periodic")
    message = str(caught.value)
    assert str(tmp_path / "checkpoints" / "step00000004") in message and "after 0.5 s" in message
    assert "shared filesystem" in message and "checkpoint_visibility_timeout_s" in message


def test_every_rank_resumes_the_checkpoint_rank_0_chose(tmp_path, process_group, monkeypatch):
    """A node that does not see rank 0's newest checkpoint yet waits for it, instead of resuming an older one."""
    import torch.distributed as dist
    root = tmp_path / "checkpoints"
    (root / "step00000003").mkdir(parents=True)
    (root / "step00000003" / "meta.json").write_text(json.dumps({"step": 3, "sampler": {}, "world_size": 2}))
    answer = ("tag", "step00000004")
    monkeypatch.setattr(dist, "broadcast_object_list", lambda objects, src: objects.__setitem__(0, answer))
    (root / "partial-step00000004").mkdir()
    thread = _publish_later(root, "partial-step00000004", "step00000004", delay_s=0.4)
    resolve = checkpoint.shared_resolver(World(rank=1, world_size=2), timeout_s=5.0)
    plan = checkpoint.plan_resume(tmp_path, "auto", {}, 2, 0, resolve=resolve)
    assert plan.tag == "step00000004" and plan.step == 4
    thread.join()
    answer = ("ValueError", "--resume step00000009: no complete checkpoint")  # rank 0 refused: so does every rank
    with pytest.raises(ValueError, match="no complete checkpoint"):
        checkpoint.plan_resume(tmp_path, "step00000009", {}, 2, 0, resolve=resolve)
