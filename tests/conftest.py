import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

# Small enough for CI's 2 cores, big enough to exercise every phase.
TINY = [
    "sft.steps=40",
    "sft.num_demonstrations=512",
    "data.num_train_prompts=64",
    "data.num_heldout_prompts=32",
    "trainer.global_batch_size=32",
    "trainer.micro_batch_size=8",
    "trainer.iterations=2",
    "generation.micro_batch_size=64",
    "exp_manager.tensorboard=false",
    "exp_manager.report=false",
]


@pytest.fixture
def tiny_overrides(tmp_path):
    return TINY + [f"exp_manager.exp_dir={tmp_path / 'exp'}"]


@pytest.fixture(scope="session")
def sft_checkpoint(tmp_path_factory):
    """One short SFT warm start shared by the multi-process tests (spawned, like them)."""
    from parallel_harness import run_layout

    exp = tmp_path_factory.mktemp("sft")
    run_layout(1, TINY + [f"exp_manager.exp_dir={exp}", "method=sft"], str(exp / "result.pt"))
    return str(exp / "sft_checkpoint")


# The slow tier (make test-slow), kept out of CI's 15 minutes on 2 cores. The default tier
# covers every kill point and stop safe point with its bit-identical resume at TP1, stops inside
# an iteration at TP2 and DP2 too, every layout (TP, PP, DP, TP x PP) of OPTune and HyPO, and
# runs the Slurm scripts' logic under the stand-in with a fake trainer; these are the TP2 twins
# of the kill and stop points, more engine and real-model layouts and the Slurm scripts' real
# 4-process runs.
SLOW = {
    # the TP2 twins of test_resume's TP1 kill and stop points (the mid-iteration stops run at TP2
    # and DP2 in the default tier)
    "test_sigkill_then_resume_is_bit_identical[tp2-generation-iter2]",
    "test_sigkill_then_resume_is_bit_identical[tp2-training-iter3]",
    "test_sigkill_then_resume_is_bit_identical[tp2-checkpoint-iter2]",
    "test_a_stop_signal_saves_and_the_rerun_ends_bit_identical[tp2-SIGTERM-generation-iter1-rank0]",
    "test_a_stop_signal_saves_and_the_rerun_ends_bit_identical[tp2-SIGUSR1-training-iter2-then-again-while-saving]",
    "test_a_stop_signal_saves_and_the_rerun_ends_bit_identical[tp2-SIGTERM-training-iter2-after-a-save-then-again-while-saving]",
    # a stop after a generation chunk and a repeated one while saving: the mid-iteration test
    "test_a_stop_signal_saves_and_the_rerun_ends_bit_identical[tp1-SIGTERM-generation-iter1-rank0]",
    "test_a_stop_signal_saves_and_the_rerun_ends_bit_identical[tp1-SIGUSR1-training-iter2-then-again-while-saving]",
    # test_parallel's tp2 and pp2 runs generate with the cached engine and equal one process
    "test_tp2_pp2_match_tp1[model.tensor_model_parallel_size=2]",
    "test_tp2_pp2_match_tp1[model.pipeline_model_parallel_size=2]",
    # test_real_model compares the generate CLI's greedy tokens with transformers on SmolLM2,
    # from UltraChat-shaped rows (a prompt beside the chat); TP2 loading is covered by
    # test_hf_models' layouts, NeMo 2 loading by test_nemo2
    "test_greedy_generation_equals_transformers[hf-1]",
    "test_greedy_generation_equals_transformers[hf-2]",
    "test_greedy_generation_equals_transformers[nemo2-2]",
    "test_greedy_generation_equals_transformers[pp2]",  # tests/test_real_model.py: SmolLM2 at PP2
    "test_one_optune_iteration_of_the_demo_recipe",
    "test_optune_from_a_model_directory_and_back_to_hugging_face[nemo2]",
    # four processes: TP2 and PP2 each load, match transformers and export in the default tier
    "test_layouts_match_transformers_and_export_exactly[tp2pp2]",
    "test_cli_checkpoint_at_tp2_exports_at_another_layout[tp2pp2]",
    "test_torchrun_script_runs_to_the_end",
    "test_srun_script_stops_on_sigusr1_saves_and_requeues",
    "test_requeued_srun_job_resumes_and_runs_to_the_end_with_ranks_from_slurm",
    "test_requeued_run_ends_bit_identical_to_the_uninterrupted_one",
    # tests/test_data_sources.py: the default tier runs parquet shards and a mixture
    "test_optune_from_save_to_disk_and_through_the_reward_server_equals_the_task_run",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.name in SLOW:
            item.add_marker(pytest.mark.slow)
