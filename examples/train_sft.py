"""The SFT warm-start recipe on its own: writes EXP_DIR/sft_checkpoint for model.restore_from_path.

python examples/train_sft.py --config-name sft_tiny exp_manager.exp_dir=/tmp/sft
"""

from nemo_optune.run import main

if __name__ == "__main__":
    main(default_config="sft_tiny")
