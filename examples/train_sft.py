"""The SFT warm-start recipe on its own: writes EXP_DIR/sft_checkpoint for model.restore_from_path.

  python examples/train_sft.py --config-name sft_tiny exp_manager.exp_dir=/tmp/sft
"""

import hydra

from nemo_optune.run import main


@hydra.main(config_path="../conf", config_name="sft_tiny", version_base=None)
def train(cfg) -> None:
    main(cfg)


if __name__ == "__main__":
    train()
