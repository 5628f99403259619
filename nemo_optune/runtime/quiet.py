"""Warnings nobody can act on, filtered before anything imports megatron (a leaf module: the
command-line entry points and the trainers both call it)."""

import warnings


def quiet_megatron_warnings() -> None:
    # megatron-core warns at import and once per layer about missing apex/TE; nothing to act on here.
    warnings.filterwarnings("ignore", module=r"megatron\..*")
    warnings.filterwarnings("ignore", message=".*(Apex|apex|Transformer Engine|TransformerEngine).*")
    # dist_checkpointing still uses torch's ShardedTensor, which torch marks as deprecated.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\..*")
