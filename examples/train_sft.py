"""The SFT warm-start recipe on its own: writes EXP_DIR/sft_checkpoint for model.restore_from_path
(the optune-sft console script).

python examples/train_sft.py --config-name sft_tiny exp_manager.exp_dir=/tmp/sft
"""

from nemo_optune.cli import sft

if __name__ == "__main__":  # dist_checkpointing spawns workers: keep the guard
    sft()
