"""Rule-based reward of the embedded task."""

from nemo_optune.data.sort_task import SortTask


class TaskReward:
    def __init__(self, task: SortTask):
        self.task = task

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [self.task.reward(p, r) for p, r in zip(prompts, responses)]
