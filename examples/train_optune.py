"""Launch an OPTune / online-DPO / DPO / HyPO run from a Hydra recipe in conf/.

  python examples/train_optune.py --config-name optune_tiny model.optune.rho=0.5 exp_manager.exp_dir=/tmp/x
  torchrun --nproc_per_node 2 examples/train_optune.py model.tensor_model_parallel_size=2
"""

import hydra

from nemo_optune.run import main


@hydra.main(config_path="../conf", config_name="optune_tiny", version_base=None)
def train(cfg) -> None:
    main(cfg)


if __name__ == "__main__":  # dist_checkpointing spawns workers: keep the guard
    train()
