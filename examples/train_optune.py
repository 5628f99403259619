"""Launch an OPTune / online-DPO / DPO / HyPO run from a recipe in conf/ (Hydra override syntax).

python examples/train_optune.py --config-name optune_tiny model.optune.rho=0.5 exp_manager.exp_dir=/tmp/x
torchrun --nproc_per_node 2 examples/train_optune.py model.tensor_model_parallel_size=2
"""

from nemo_optune.run import main

if __name__ == "__main__":  # dist_checkpointing spawns workers: keep the guard
    main(default_config="optune_tiny")
