"""The embedded task's prompt sets: training prompts and disjoint held-out prompts."""

import dataclasses

from nemo_optune.data.sort_task import SortTask


@dataclasses.dataclass
class TaskData:
    task: SortTask
    train_prompts: list[str]
    heldout_prompts: list[str]

    @property
    def tokenizer(self):
        return self.task.tokenizer


def build_task_data(data_cfg) -> TaskData:
    """From the `data:` config group: prompts drawn from data.seed, held-out ones excluded from training."""
    d = data_cfg
    task = SortTask(min_digits=d.min_digits, max_digits=d.max_digits)
    train = task.prompts(d.num_train_prompts, seed=d.seed)
    heldout = task.prompts(d.num_heldout_prompts, seed=d.seed + 1, exclude=frozenset(train))
    return TaskData(task, train, heldout)
