"""Reward sources from config, combined with weights, scored once per data-parallel group.

Every source is wrapped in ResilientRewardSource (retries, timeout) on its own, so a flaky
server is retried without rerunning a local reward model. The total reward is the weighted
sum of the sources' rewards, shaped once (rewards/shaping.py); each source's column and each
penalty is kept for logging (reward/<name>). Sources get the prompt rows' other columns and
`truncated` by keyword (rewards/base.py).

Placement: the ranks of one model-parallel group (TP x PP) hold the same prompts and
responses, so only the group's first rank scores (and only it loads a reward model); the
rewards are then broadcast within the group. Each data-parallel rank scores its own share, so
a remote server sees each response once.
"""

import torch
import torch.distributed as dist

from nemo_optune.config import RewardConfig, RewardSourceConfig
from nemo_optune.rewards.resilient import ResilientRewardSource, RewardSourceError
from nemo_optune.rewards.shaping import shape_rewards, shaping_names
from nemo_optune.runtime.distributed import comm_device, raise_if_any_rank_failed, sum_over_dp


def build_source(s: RewardSourceConfig, key: str, task, timeout_seconds: float, load: bool = True):
    """One source. With load=False a reward model directory is checked but not loaded and a
    server is not asked (ranks that never score, dry runs); with load=True a server must answer
    its health check before any work starts."""
    if s.source == "task":
        from nemo_optune.rewards.task_reward import TaskReward

        return TaskReward(task)
    if s.source == "python":
        from nemo_optune.rewards.python_function import PythonFunctionReward

        assert s.function, "config.validate_reward requires the function of a python source"
        return PythonFunctionReward(s.function, key=f"{key}.function")
    if s.source == "hf":
        from nemo_optune.rewards.hf_model import HFRewardModel, check_reward_model_dir

        if not load:
            assert s.hf.path, "config.validate_reward requires the path of an hf source"
            check_reward_model_dir(s.hf.path, f"{key}.hf.path")
            return None
        return HFRewardModel(s.hf, key=f"{key}.hf")  # checks the directory first
    if s.source == "http":
        from nemo_optune.rewards.http_client import HTTPReward

        return HTTPReward(s.http, timeout_seconds=timeout_seconds, key=f"{key}.http", check_health=load)
    raise ValueError(f"config key {key}.source: unknown reward source {s.source!r}")


class RewardSources:
    """The configured sources: names, weights, and their rewards as columns."""

    def __init__(self, cfg: RewardConfig, task, load: bool = True):
        configs = cfg.source_configs()
        self.cfg = cfg
        self.source_names = [s.display_name() for _, s in configs]
        self.names = self.source_names + shaping_names(cfg)  # logged columns: sources, then penalties
        self.weights = torch.tensor([s.weight for _, s in configs], dtype=torch.float64)
        self.built = [build_source(s, key, task, cfg.timeout_seconds, load) for key, s in configs]
        self.sources = [
            ResilientRewardSource(source, name, cfg.retries, cfg.backoff_seconds, cfg.timeout_seconds)
            for source, name in zip(self.built, self.source_names)
        ]

    @property
    def failures(self) -> int:
        return sum(s.failures for s in self.sources)

    def check_columns(self, available: set[str]) -> None:
        """At start-up: every python source's required keywords are among `available`."""
        for source in self.built:
            if hasattr(source, "check_columns"):
                source.check_columns(available | {"truncated"})

    def score_columns(self, prompts: list[str], responses: list[str], **columns: list) -> torch.Tensor:
        """[n, sources] rewards (float64); raises RewardSourceError if a source fails for good."""
        scores = torch.zeros(len(prompts), len(self.sources), dtype=torch.float64)
        for j, source in enumerate(self.sources):
            scores[:, j] = torch.tensor(source.score(prompts, responses, **columns), dtype=torch.float64)
        return scores

    def total(self, columns: torch.Tensor) -> torch.Tensor:
        # A NaN in any source makes the total NaN (reward.non_finite decides), even at weight 0.
        return (columns * self.weights).sum(dim=1)

    def score(self, prompts: list[str], responses: list[str], **columns: list) -> list[float]:
        """Weighted total per pair, unshaped (the RewardSource interface, e.g. for the reward server)."""
        return self.total(self.score_columns(prompts, responses, **columns)).tolist()

    def score_once_per_model_parallel_group(
        self,
        prompts: list[str],
        responses: list[str],
        columns: dict[str, list],
        truncated: torch.Tensor,
        lengths: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Collective: (shaped total [n], [n, names]: each source's rewards, then each penalty)
        on every rank; scored by the first rank of each model-parallel group, which passes
        `columns` and `truncated` [n] bool to the sources. `lengths` [n]: response tokens (the
        stop token counted). If a scoring rank fails, every rank raises its error."""
        group, scorer = model_parallel_scorer()
        failure = None
        scores = torch.zeros(len(prompts), len(self.sources), dtype=torch.float64)
        if scorer == (dist.get_rank() if dist.is_initialized() else 0):
            try:
                scores = self.score_columns(prompts, responses, **columns, truncated=truncated.tolist())
            except RewardSourceError as err:
                failure = err
        raise_if_any_rank_failed(failure)
        if group is not None:
            shared = scores.to(comm_device())
            dist.broadcast(shared, src=scorer, group=group)
            scores = shared.cpu()
        c = self.cfg
        shaped, penalties = shape_rewards(
            self.total(scores), truncated, lengths, c.missing_eos_penalty, c.length_penalty, c.target_length
        )
        return shaped, torch.cat([scores, *(p[:, None] for p in penalties.values())], dim=1)

    def means_over_dp(self, columns: torch.Tensor) -> dict[str, float]:
        """Collective: each source's mean over the finite rewards of every DP rank's columns."""
        finite = torch.isfinite(columns)
        sums = sum_over_dp(torch.stack([torch.where(finite, columns, 0.0).sum(0), finite.sum(0).double()]))
        return {name: float(sums[0, j] / sums[1, j].clamp(min=1)) for j, name in enumerate(self.names)}


def model_parallel_scorer() -> tuple[dist.ProcessGroup | None, int]:
    """(model-parallel group or None, the global rank that scores for it)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None, 0
    from megatron.core import parallel_state as mpu

    group = mpu.get_model_parallel_group()
    ranks = dist.get_process_group_ranks(group)
    return (group if len(ranks) > 1 else None), min(ranks)


def is_scoring_rank() -> bool:
    """Whether this rank scores for its model-parallel group (and so loads reward models)."""
    return model_parallel_scorer()[1] == (dist.get_rank() if dist.is_initialized() else 0)
