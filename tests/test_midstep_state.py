"""Checkpoints inside an iteration: the Position's round trip through a checkpoint's trainer
state, and the order of checkpoint names. (Stops and bit-identical resumes: test_resume.py.)"""

import dataclasses
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from conftest import TINY

from nemo_optune.runtime.checkpoint import CheckpointError, checkpoint_path, iterations_done, list_checkpoints
from nemo_optune.runtime.distributed import free_port
from nemo_optune.trainers.preference import Position, PreferenceTrainer, stopped_point
from nemo_optune.trainers.preference_pool import RefreshStats


@pytest.fixture
def one_rank():
    """A world of one process (an earlier in-process run in this worker may have left its own)."""
    if dist.is_initialized():
        assert dist.get_world_size() == 1
        yield
        return
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _position() -> Position:
    g = torch.Generator().manual_seed(5)
    rows = {"chosen_tokens": torch.randint(0, 9, (6, 4), generator=g), "valid": torch.rand(6, generator=g) > 0.5}
    seconds = defaultdict(float, generation=1.5, scoring=0.25)
    return Position(
        iteration=2,
        generated=torch.rand(12, generator=g, dtype=torch.float64),
        seconds=seconds,
        selected=torch.tensor([1, 4, 7, 9, 12, 30]),
        rho=0.5,
        chunks_done=3,
        rows=rows,
        owned={"ids": torch.tensor([1, 4]), "chosen_tokens": torch.randint(0, 9, (2, 4), generator=g)},
        by_source=torch.rand(18, 2, generator=g),
        refresh=RefreshStats(regenerated=6, ties_dropped=1, responses=24, reward_by_source={"task": 0.25}),
        reference_done=True,
        batches_done=11,
        totals=torch.rand(9, generator=g),
        grad_norms=[0.5, 0.25],
        skipped=1,
        tokens=321,
    )


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


def test_a_position_round_trips_through_a_saved_trainer_state(one_rank, tmp_path):
    """trainer_state.pt's part and the new token rows' file (position_files) give the Position back."""
    trainer = SimpleNamespace(
        position=_position(),
        layout=SimpleNamespace(as_dict=lambda: {"tp": 1, "pp": 1, "dp": 1}, dp_rank=0, tp_rank=0, pp_rank=0),
        model=SimpleNamespace(device=torch.device("cpu")),
    )
    state = PreferenceTrainer.position_state(trainer)
    assert "owned" not in state and "owned" not in state["ranks"][0]  # the token rows stay out of it
    torch.save(state, tmp_path / "trainer_state.pt")
    for name, value in PreferenceTrainer.position_files(trainer).items():
        torch.save(value, tmp_path / name)
    state = torch.load(tmp_path / "trainer_state.pt", weights_only=False)
    back = PreferenceTrainer.load_position(trainer, state, str(tmp_path))
    for field in dataclasses.fields(Position):
        assert _equal(getattr(back, field.name), getattr(trainer.position, field.name)), field.name
    assert back.seconds["reference"] == 0.0  # still a defaultdict: phases not yet timed count from 0

    trainer.layout = SimpleNamespace(as_dict=lambda: {"tp": 2, "pp": 1, "dp": 1})
    with pytest.raises(CheckpointError, match=r"CKPT: written inside iteration 3 under layout .*'tp': 1"):
        PreferenceTrainer.load_position(trainer, state, "CKPT")


def test_only_the_first_model_parallel_rank_writes_the_new_token_rows():
    position = _position()
    files = [
        PreferenceTrainer.position_files(
            SimpleNamespace(position=position, layout=SimpleNamespace(dp_rank=3, tp_rank=tp, pp_rank=pp))
        )
        for tp, pp in ((0, 0), (1, 0), (0, 1))
    ]
    assert files == [{"position_tokens_dp00003.pt": position.owned}, {}, {}]


def test_checkpoints_inside_an_iteration_sort_between_iterations(tmp_path):
    names = [
        checkpoint_path(str(tmp_path), 1),
        checkpoint_path(str(tmp_path), 1, ("gen", 2)),
        checkpoint_path(str(tmp_path), 1, ("gen", 10)),
        checkpoint_path(str(tmp_path), 1, ("ref", 1)),
        checkpoint_path(str(tmp_path), 1, ("step", 3)),
        checkpoint_path(str(tmp_path), 1, ("step", 12)),
        checkpoint_path(str(tmp_path), 2),
    ]
    for path in reversed(names):
        os.makedirs(path)
    os.makedirs(checkpoint_path(str(tmp_path), 2, ("gen", 1)) + ".tmp")  # an unfinished save is none
    assert list_checkpoints(str(tmp_path / "checkpoints")) == names
    assert [iterations_done(n) for n in names] == [1, 1, 1, 1, 1, 1, 2]
    assert stopped_point(names[5], 1) == "inside iteration 2, after training batch 12"
    assert stopped_point(names[6], 2) == "after iteration 2"


def test_wall_time_checkpoints_inside_an_iteration(sft_checkpoint, tmp_path, monkeypatch):
    """exp_manager.checkpoint_every_seconds shorter than any stretch between two safe points: a
    checkpoint at every one of them inside the iteration (after its generation chunk and each
    of its 2 training batches), then the iteration's; keep_last=2 leaves the newest two."""
    from nemo_optune.config import load_config
    from nemo_optune.run import run_experiment

    saved: list[str] = []
    save = PreferenceTrainer.save_checkpoint

    def recorded(self, part=None):
        saved.append(os.path.basename(save(self, part)))
        return saved[-1]

    monkeypatch.setattr(PreferenceTrainer, "save_checkpoint", recorded)
    overrides = [
        f"model.restore_from_path={sft_checkpoint}",
        f"exp_manager.exp_dir={tmp_path}",
        "trainer.iterations=1",
        "exp_manager.checkpoint_every_seconds=1e-6",
        "exp_manager.keep_last=2",
    ]
    run_experiment(load_config("optune_tiny", TINY + overrides))
    assert saved == ["iter_000000_gen_000001", "iter_000000_step_000001", "iter_000000_step_000002", "iter_000001"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == saved[-2:]


def test_a_wall_time_checkpoint_waits_for_its_interval(monkeypatch):
    """checkpoint_every_seconds=10 on a fake clock, safe points at 4, 8, 12, 20 and 22 s: a
    checkpoint at the first safe point 10 s after the start (12), then 10 s after that save (22)."""
    from nemo_optune.trainers import preference

    clock = [0.0]
    monkeypatch.setattr(preference, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    saved: list = []
    trainer = SimpleNamespace(
        cfg=SimpleNamespace(exp_manager=SimpleNamespace(checkpoint_every_steps=0, checkpoint_every_seconds=10.0)),
        model=SimpleNamespace(optimizer_steps=0),
        stop=SimpleNamespace(agree=lambda estimate, save_due: (None, save_due)),  # one rank: its own clock
        next_safe_point_estimate=lambda: 0.0,
        last_save=0.0,
        last_safe_point=0.0,
        longest_gap=0.0,
        steps_at_save=0,
    )

    def save(part):
        saved.append((clock[0], part))
        trainer.last_save = clock[0]
        return "CKPT"

    trainer.save_checkpoint = save
    points = [(4.0, ("gen", 1)), (8.0, ("gen", 2)), (12.0, ("step", 1)), (20.0, ("step", 2)), (22.0, ("step", 3))]
    for seconds, part in points:
        clock[0] = seconds
        PreferenceTrainer.safe_point(trainer, part)
    assert saved == [(12.0, ("step", 1)), (22.0, ("step", 3))]
