"""Launch an OPTune / online-DPO / DPO / HyPO run from a recipe (Hydra override syntax); the
same as the optune-train console script. --help lists the recipes and every config key.

python examples/train_optune.py --config-name optune_tiny model.optune.rho=0.5 exp_manager.exp_dir=/tmp/x
python examples/train_optune.py --config my_recipes/run.yaml      # a recipe anywhere (defaults: [base, _self_])
torchrun --nproc_per_node 2 examples/train_optune.py model.tensor_model_parallel_size=2
"""

from nemo_optune.cli import train

if __name__ == "__main__":  # dist_checkpointing spawns workers: keep the guard
    train()
