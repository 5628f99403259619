"""The embedded tasks' prompt sets: training prompts and disjoint held-out prompts.

data.task: sort (the toy task of the built-in model) | instructions (verifiable instructions
for real chat models, data/instructions.py)."""

import dataclasses

from nemo_optune.data.instructions import InstructionsTask
from nemo_optune.data.sort_task import SortTask

Task = SortTask | InstructionsTask


@dataclasses.dataclass
class TaskData:
    task: Task
    train_prompts: list
    heldout_prompts: list

    @property
    def tokenizer(self):
        return self.task.tokenizer


def build_task_data(data_cfg) -> TaskData:
    """From the `data:` config group: prompts drawn from data.seed, held-out ones excluded from training."""
    d = data_cfg
    task = (
        SortTask(min_digits=d.min_digits, max_digits=d.max_digits)
        if d.task == "sort"
        else InstructionsTask(d.instructions)
    )
    train = task.prompts(d.num_train_prompts, seed=d.seed)
    heldout = task.prompts(d.num_heldout_prompts, seed=d.seed + 1, exclude=train)
    return TaskData(task, train, heldout)
