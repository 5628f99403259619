"""MegatronGPTOPTuneModel: the policy and its frozen reference on megatron-core.

The model owns weights, log-probs and the train/inference hooks (the NeMo-Aligner split);
the trainer owns the loop and hands in the loss as a function of per-sequence log-probs.
Everything runs through megatron-core's pipeline schedules, so one code path serves TP, PP
and DP on CPU (gloo) and GPU (NCCL). The optimizer (models/optimizers.py) is built only when
training asks for it (`lr` given): convert and generate build the model alone.
"""

import importlib.util
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nemo_optune.config import ModelConfig
from nemo_optune.data.micro_batch import MB, MicroBatchLoss
from nemo_optune.data.tokenizer import Tokenizer
from nemo_optune.models import optimizers
from nemo_optune.models.hf_spec import ModelSpec
from nemo_optune.runtime.cpu_shim import cuda_moves_stay_on_cpu
from nemo_optune.runtime.distributed import Layout, comm_device, sum_over_dp


def build_gpt(spec: ModelSpec, layout: Layout, seed: int, precision: str = "fp32", initialize: bool = True):
    """A megatron-core GPTModel of `spec` for this pipeline stage (TE layer spec when installed).
    initialize=False draws no random weights, for a model whose weights are loaded next (megatron's
    CPU initialisation draws each full weight on every rank: minutes at 70B). Its init runs with
    a no-op init method rather than perform_initialization=False, which would also skip
    setting the tensor-parallel attributes that the gradient norm needs."""
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel, gpt_layer_specs
    from megatron.core.transformer import TransformerConfig

    if spec.padded_vocab_size % layout.tp:
        raise ValueError(f"a vocabulary of {spec.padded_vocab_size} rows cannot be split over TP={layout.tp}")
    on_gpu = torch.cuda.is_available()
    bf16 = precision == "bf16"
    tcfg = TransformerConfig(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        ffn_hidden_size=spec.ffn_hidden_size,
        normalization=spec.normalization,
        layernorm_epsilon=spec.norm_epsilon,
        gated_linear_unit=spec.gated_linear_unit,
        activation_func=_ACTIVATIONS[spec.activation],
        add_bias_linear=spec.add_bias_linear,
        add_qkv_bias=spec.add_qkv_bias,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        # Initialise full weights on CPU from one seed and slice them: the model is then
        # identical whatever the TP/PP layout, which the equivalence tests rely on.
        use_cpu_initialization=True,
        **(
            {}
            if initialize
            else dict(init_method=_no_init, output_layer_init_method=_no_init, embedding_init_method=_no_init)
        ),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Losses come back pre-scaled by the global normaliser (no per-micro-batch mean).
        calculate_per_token_loss=True,
        # These fusions need CUDA kernels.
        gradient_accumulation_fusion=False,
        persist_layer_norm=on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        apply_rope_fusion=False,
    )
    if importlib.util.find_spec("transformer_engine") is not None:
        layer_spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    else:  # CPU, CI: megatron's own layers (torch.nn.LayerNorm / torch.nn.RMSNorm without apex)
        layer_spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization=spec.normalization)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=not on_gpu)
    with cuda_moves_stay_on_cpu():
        model = GPTModel(
            tcfg,
            layer_spec,
            vocab_size=spec.padded_vocab_size,
            max_sequence_length=spec.max_position_embeddings,
            pre_process=layout.is_first_stage,
            post_process=layout.is_last_stage,
            # Tied at PP>1: megatron keeps a copy on the last stage; the optimizers sum the two
            # copies' gradients over the embedding group.
            share_embeddings_and_output_weights=spec.tie_word_embeddings,
            position_embedding_type=spec.position_embedding_type,
            rotary_base=spec.rotary_base,
            rope_scaling=spec.rope_scaling_factor is not None,
            rope_scaling_factor=spec.rope_scaling_factor or 8.0,
        )
    _mask_padded_vocab(model, spec, layout)
    if bf16:
        # megatron's local layer spec builds its norms in fp32 (TE's follow params_dtype);
        # megatron's Float16Optimizer checkpoints only all-bf16 models, so cast them too.
        model.bfloat16()
    if on_gpu:
        model.cuda(torch.cuda.current_device())
    return model


_ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu}


def _no_init(weight: torch.Tensor) -> None:
    """Leaves the (torch.empty) weight as it is: it is loaded next."""


def _mask_padded_vocab(model, spec: ModelSpec, layout: Layout) -> None:
    """Logits of the padding rows are -inf: the softmax (log-probs, sampling) then runs over
    the real vocabulary only, as in the unpadded model."""
    local = spec.padded_vocab_size // layout.tp
    padding = torch.arange(layout.tp_rank * local, (layout.tp_rank + 1) * local) >= spec.vocab_size
    if not (model.post_process and padding.any()):
        return

    def hook(_module, _inputs, output):
        logits, bias = output
        return logits.masked_fill(padding.to(logits.device), float("-inf")), bias

    model.output_layer.register_forward_hook(hook)


def response_logprobs(token_nll: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log pi(token) over response positions: [B, L] per-token NLL -> [B]."""
    return -(token_nll.float() * loss_mask).sum(dim=-1)


def split_micro_batches(tensors: dict[str, torch.Tensor], micro_batch_size: int) -> list[dict]:
    """Split along dim 0 into equal micro-batches, zero-padding the last one: pipeline
    stages exchange activations of one fixed shape for every micro-batch."""
    rows = next(iter(tensors.values())).shape[0]
    size = min(micro_batch_size, rows)
    padded_rows = -(-rows // size) * size
    padded = {
        k: torch.cat([v, v.new_zeros((padded_rows - rows, *v.shape[1:]))]) if padded_rows > rows else v
        for k, v in tensors.items()
    }
    return [{k: v[i : i + size] for k, v in padded.items()} for i in range(0, padded_rows, size)]


class MegatronGPTOPTuneModel:
    """Policy + frozen reference; response log-probs; train and inference hooks."""

    def __init__(
        self,
        cfg: ModelConfig,
        spec: ModelSpec,
        layout: Layout,
        seed: int,
        lr: float | None = None,
        weight_decay: float = 0.0,
        grad_clip: float = 0.0,
        with_reference: bool = True,
        lr_schedule: Callable[[int], float] | None = None,
        tokenizer: Tokenizer | None = None,
        initialize: bool = True,
    ):
        """`spec` describes the network (models/sources.py: a checkpoint's, or the built-in
        model's); cfg gives precision and the optimizer settings. `tokenizer` is saved with
        every checkpoint. initialize=False: random weights are not drawn, because load_policy
        (and sync_reference_to_policy) will replace them. lr None: a model for inference only,
        without DDP or an optimizer (no gradient buffer, no fp32 main params)."""
        self.cfg = cfg
        self.layout = layout
        self.spec = spec
        self.tokenizer = tokenizer
        self.vocab_size = self.spec.vocab_size
        self.policy = build_gpt(self.spec, layout, seed, cfg.precision, initialize)
        self.weights_loaded = initialize  # set by every loader; see _require_weights
        self.reference = None
        if with_reference:
            self.reference = build_gpt(self.spec, layout, seed, cfg.precision, initialize)
            self.reference.requires_grad_(False)
            self.reference.eval()
        self.optimizer, self._train_module = None, None
        if lr is not None:
            self.optimizer, self._train_module = optimizers.build_optimizer(
                self.policy, cfg, lr, weight_decay, grad_clip
            )
        self.device = next(self.policy.parameters()).device
        self.lr_schedule = lr_schedule or (lambda step: lr)
        self.optimizer_steps = 0  # the schedule's position; checkpointed with the trainer state

    # ----------------------------------------------------------------- weights
    def load_policy(self, directory: str, from_training: bool = False) -> None:
        """Load policy weights (our checkpoint, a HF or NeMo 2 directory; with `from_training`,
        a training checkpoint's policy too), then refresh the optimizer's fp32 main params,
        which were copied from the random init when it was built."""
        from nemo_optune.models.sources import load_weights

        load_weights(directory, self, from_training)  # sets weights_loaded
        if self.optimizer is not None:
            self.optimizer.reload_model_params()

    def architecture(self) -> dict:
        """What a checkpoint must match to load into this model (stored in its manifest): the
        whole spec, which is also what restoring or exporting the checkpoint needs."""
        return self.spec.as_json()

    def sync_reference_to_policy(self) -> None:
        """Reference := current policy (done once, after loading the SFT checkpoint)."""
        self.reference.load_state_dict(self.policy.state_dict())

    # ------------------------------------------------------- megatron plumbing
    def _causal_mask(self, length: int) -> torch.Tensor:
        # megatron convention: True = masked out. Explicit, so no CUDA default mask is needed.
        return torch.triu(torch.ones(1, 1, length, length, dtype=torch.bool, device=self.device), diagonal=1)

    def _run_schedule(
        self,
        module,
        micro_batches: Sequence[Mapping[str, Any]],
        forward_only: bool,
        output_fn: Callable[[Any, torch.Tensor], tuple[torch.Tensor, dict]],
        with_labels: bool,
    ) -> list[dict]:
        """Run micro-batches through megatron's forward(-backward) schedule for this layout.

        `output_fn(micro_batch, last_stage_output)` -> (loss, metrics) runs on the last stage;
        returns the metrics dicts (last stage only; other stages get []).
        """
        self._require_weights()
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from nemo_optune.data.packing import packed_attention_mask

        if not micro_batches:
            return []
        micro_batches = self._trim_padding(micro_batches)
        length = max(mb["tokens"].shape[1] for mb in micro_batches)

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            tokens = mb["tokens"].to(self.device)
            if "pack_layout" in mb:  # packed pairs: own positions and mask (data/packing.py)
                mask = packed_attention_mask(mb["pack_layout"].to(self.device), tokens.shape[1])
                positions = mb["positions"].to(self.device)

                def forward():
                    return self._packed_forward(model, tokens, positions, mask)
            else:
                positions = torch.arange(tokens.shape[1], device=self.device).unsqueeze(0).expand_as(tokens)

                def forward():
                    return model(tokens, positions, self._causal_mask(tokens.shape[1]))

            out = self._response_nll(model, forward, tokens, mb["loss_mask"]) if with_labels else forward()

            def loss_func(output_tensor):
                loss, metrics = output_fn(mb, output_tensor)
                # 3-tuple + calculate_per_token_loss: megatron uses the loss unscaled.
                return loss, torch.tensor(1, dtype=torch.int), metrics

            return out, loss_func

        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=module,
            num_microbatches=len(micro_batches),
            seq_length=length,
            micro_batch_size=micro_batches[0]["tokens"].shape[0],
            forward_only=forward_only,
        )

    def _response_nll(
        self, model, forward: Callable[[], torch.Tensor], tokens: torch.Tensor, loss_mask
    ) -> torch.Tensor:
        """`forward()`'s per-token NLL [b, s] of the next tokens on the last stage (zero off
        `loss_mask`), its hidden states on the others. The output layer and megatron's
        vocab-parallel cross entropy run only at the loss mask's positions: at a real
        vocabulary (49k) the [tokens, V] logits of every prompt position cost as much as a
        few transformer layers and are never used."""
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
        from megatron.core.utils import unwrap_model

        gpt = unwrap_model(model)
        if not gpt.post_process:
            return forward()
        rows, cols = loss_mask.to(self.device).nonzero(as_tuple=True)

        def only_masked(_module, args, kwargs):  # hidden states [s, b, h] -> [n, 1, h]
            return (args[0][cols, rows].unsqueeze(1), *args[1:]), kwargs

        handle = gpt.output_layer.register_forward_pre_hook(only_masked, with_kwargs=True)
        try:
            logits = forward()  # no labels: megatron returns the logits, [1, n, V / TP]
        finally:
            handle.remove()
        labels = torch.roll(tokens, shifts=-1, dims=1)[rows, cols]
        nll = vocab_parallel_cross_entropy(logits, labels.unsqueeze(0)).squeeze(0)
        return torch.zeros(tokens.shape, dtype=nll.dtype, device=nll.device).index_put((rows, cols), nll)

    @staticmethod
    def _packed_forward(
        model, tokens: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """A forward of rows with their own token positions and attention mask. megatron's GPT
        applies RoPE at 0..s-1 whatever position_ids say, so for the call each attention layer
        runs models/kv_cache's attention (megatron's projections, RoPE at `positions`, the mask
        as given) on a cache of this micro-batch alone; gradients flow through it."""
        from megatron.core.utils import unwrap_model

        from nemo_optune.models.kv_cache import KVCache, cached_attention

        cache = KVCache(tokens.shape[0], tokens.shape[1])
        with cached_attention(unwrap_model(model), cache, plain_linears=False):
            cache.set_positions(positions)
            return model(tokens, positions, attention_mask)

    def _require_weights(self) -> None:
        """Every forward goes through here: uninitialised weights must not silently compute."""
        if not self.weights_loaded:
            raise RuntimeError("the policy was built without weights (initialize=False): call load_policy first")

    def _trim_padding(self, micro_batches: Sequence[Mapping[str, Any]]) -> Sequence[Mapping[str, Any]]:
        """Micro-batches with a loss mask cut after their last masked position's label: the
        right padding beyond changes no output of a causal model, only costs compute. Under PP
        all micro-batches of one schedule call keep one length (its p2p shapes are fixed)."""
        if "loss_mask" not in micro_batches[0]:
            return micro_batches

        def needed(mb):  # position j's label is token j + 1
            used = mb["loss_mask"].any(dim=0).nonzero()
            return min(mb["tokens"].shape[1], int(used[-1]) + 2 if len(used) else 1)

        lengths = [needed(mb) for mb in micro_batches]
        if self.layout.pp > 1:
            lengths = [max(lengths)] * len(lengths)
        trimmed = []
        for mb, n in zip(micro_batches, lengths):
            cut = {key: mb[key][:, :n] for key in ("tokens", "loss_mask", "rejected_mask", "positions") if key in mb}
            trimmed.append({**mb, **cut})
        return trimmed

    def _from_last_stage(self, tensor: torch.Tensor | None, shape, dtype) -> torch.Tensor:
        """Broadcast a result computed on the last pipeline stage to every stage."""
        from megatron.core import parallel_state as mpu

        if self.layout.pp == 1:
            return tensor
        if tensor is None:
            tensor = torch.empty(shape, dtype=dtype, device=comm_device())
        tensor = tensor.to(comm_device()).contiguous()
        dist.broadcast(
            tensor, src=mpu.get_pipeline_model_parallel_last_rank(), group=mpu.get_pipeline_model_parallel_group()
        )
        return tensor

    def global_metric_sums(self, values: torch.Tensor) -> torch.Tensor:
        """Loss metrics exist on the last stage only: sum them over DP there, then give every
        stage (rank 0 logs) a copy."""
        summed = sum_over_dp(values) if self.layout.is_last_stage else None
        return self._from_last_stage(summed, values.shape, values.dtype).to(values.device)

    # --------------------------------------------------------------- log-probs
    @torch.no_grad()
    def sequence_logprobs(
        self, which: str, tokens: torch.Tensor, loss_mask: torch.Tensor, micro_batch_size: int
    ) -> torch.Tensor:
        """Summed response log-probs [B] of `which` in {policy, reference}, on every rank.

        Computed from vocab-parallel logits by megatron's vocab-parallel cross entropy:
        the full vocabulary is never gathered."""
        module = self.policy if which == "policy" else self.reference
        was_training = module.training
        module.eval()
        batches = split_micro_batches({"tokens": tokens, "loss_mask": loss_mask}, micro_batch_size)
        outs = self._run_schedule(
            module,
            batches,
            forward_only=True,
            with_labels=True,
            output_fn=lambda mb, nll: (
                nll.sum() * 0,
                {"logps": response_logprobs(nll, mb["loss_mask"].to(nll.device))},
            ),
        )
        module.train(was_training)
        logps = torch.cat([o["logps"] for o in outs])[: tokens.shape[0]] if outs else None
        return self._from_last_stage(logps, (tokens.shape[0],), torch.float32).cpu()

    @torch.no_grad()
    def next_token_logits(
        self, tokens: torch.Tensor, last_positions: torch.Tensor, micro_batch_size: int
    ) -> torch.Tensor:
        """Full-vocabulary logits [B, V] (float32) at `last_positions`, on every rank, on the
        model's device (sampling runs there: no [B, V] copy to the CPU per decoding step).

        Generation samples from the full distribution, so here the TP shards of the
        vocabulary are gathered (V floats per sequence per step)."""
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        def pick(mb, logits):
            full = gather_from_tensor_model_parallel_region(logits)  # [b, s, V]
            rows = torch.arange(full.shape[0], device=full.device)
            # Padding rows of the vocabulary (logits -inf) are not part of the model's output.
            return logits.sum() * 0, {"logits": full[rows, mb["last"].to(full.device), : self.vocab_size].float()}

        batches = split_micro_batches({"tokens": tokens, "last": last_positions}, micro_batch_size)
        outs = self._run_schedule(self.policy, batches, forward_only=True, output_fn=pick, with_labels=False)
        logits = torch.cat([o["logits"] for o in outs])[: tokens.shape[0]] if outs else None
        return self._from_last_stage(logits, (tokens.shape[0], self.vocab_size), torch.float32)

    @torch.no_grad()
    def next_token_logits_cached(
        self, cache, tokens: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor, micro_batch_size: int
    ) -> torch.Tensor:
        """Run the next `s` positions `tokens` [B, s] of every cached row through the policy with
        `cache` (models/kv_cache.KVCache: each attention layer of this pipeline stage appends its
        keys/values at cache.sequence_len_offset and attends over all cached positions). Row b of
        `tokens` is row b of the cache. `positions` [B, s] are the tokens' positions in their
        rows; `attention_mask` [B, 1, s, offset + s], True = masked.

        Returns full-vocabulary logits [B, V] (float32) at the last of the s positions, on every
        rank (on the model's device), and advances cache.sequence_len_offset by s. Micro-batches pass through megatron's
        pipeline schedule like next_token_logits (at PP = 1 straight through the model); each writes its rows of the cache
        (cache.batch_size_offset), so the cache must hold the micro-batch-padded row count."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from nemo_optune.models.kv_cache import cached_attention

        self._require_weights()
        rows, length = tokens.shape
        batches = split_micro_batches(
            {"tokens": tokens, "positions": positions, "mask": attention_mask}, micro_batch_size
        )
        size = batches[0]["tokens"].shape[0]

        def forward_step(data_iterator, model):
            index, mb = next(data_iterator)
            cache.batch_size_offset = index * size
            cache.set_positions(mb["positions"].to(self.device))
            # megatron's inference path gathers the TP logits itself (gpt_model.py _postprocess
            # asserts runtime_gather_output).
            out = model(
                mb["tokens"].to(self.device),
                mb["positions"].to(self.device),
                mb["mask"].to(self.device),
                inference_context=cache,
                runtime_gather_output=True,
            )

            def loss_func(logits):
                # materialize_only_last_token_logits: megatron computed the last position only.
                # Padding rows of the vocabulary are cut off here.
                full = logits[:, -1, : self.vocab_size].float()
                return logits.sum() * 0, torch.tensor(1, dtype=torch.int), {"logits": full}

            return out, loss_func

        # The padded-vocabulary hook (_mask_padded_vocab) masks this rank's shard of the output
        # layer's logits; gathered, they are the full vocabulary: at TP > 1 it steps aside (the
        # padding rows are cut off above).
        output_layer = self.policy.output_layer if self.policy.post_process else None
        hooks = dict(output_layer._forward_hooks) if output_layer is not None and self.layout.tp > 1 else {}
        for key in hooks:
            del output_layer._forward_hooks[key]
        try:
            with cached_attention(self.policy, cache):
                if self.layout.pp == 1:  # no stage to pass activations to: the schedule is overhead per step
                    outs = []
                    for item in enumerate(batches):
                        out, loss_func = forward_step(iter([item]), self.policy)
                        outs.append(loss_func(out)[2])
                else:
                    outs = get_forward_backward_func()(
                        forward_step_func=forward_step,
                        data_iterator=iter(enumerate(batches)),
                        model=self.policy,
                        num_microbatches=len(batches),
                        seq_length=length,
                        micro_batch_size=size,
                        forward_only=True,
                    )
        finally:
            if hooks:
                output_layer._forward_hooks.update(hooks)
        cache.batch_size_offset = 0
        cache.sequence_len_offset += length
        logits = torch.cat([o["logits"] for o in outs])[:rows] if outs else None
        return self._from_last_stage(logits, (rows, self.vocab_size), torch.float32)

    # ------------------------------------------------------------ train hooks
    def prepare_for_training_step(self) -> None:
        if self.optimizer is None:
            raise RuntimeError("this model was built for inference (no lr given): it has no optimizer")
        self.policy.train()
        self.optimizer.zero_grad()

    def get_loss_and_metrics(
        self, micro_batches: Sequence[MB], loss_fn: MicroBatchLoss[MB], forward_only: bool = False
    ) -> list[dict]:
        """Forward + backward over this rank's micro-batches of one global batch; with
        `forward_only`, the loss metrics alone (eval mode, no gradients). Metrics: last stage."""

        def output_fn(mb: MB, nll: torch.Tensor) -> tuple[torch.Tensor, dict]:
            mask = mb["loss_mask"].to(nll.device)
            if "rejected_mask" in mb:  # packed: each row holds a pair, chosen then rejected labels
                rejected = mb["rejected_mask"].to(nll.device)
                return loss_fn(
                    mb, torch.cat([response_logprobs(nll, mask - rejected), response_logprobs(nll, rejected)])
                )
            return loss_fn(mb, response_logprobs(nll, mask))

        if not forward_only:
            return self._run_schedule(
                self._train_module, micro_batches, forward_only=False, output_fn=output_fn, with_labels=True
            )
        was_training = self.policy.training
        self.policy.eval()
        try:
            with torch.no_grad():
                return self._run_schedule(
                    self.policy, micro_batches, forward_only=True, output_fn=output_fn, with_labels=True
                )
        finally:
            self.policy.train(was_training)

    def finish_training_step(self) -> float:
        """Reduce gradients over DP, clip by the global norm, step at the scheduled learning
        rate. Returns the grad norm."""
        self.optimizer.set_lr(self.lr_schedule(self.optimizer_steps))
        norm = self.optimizer.step()
        self.optimizer_steps += 1
        return norm

    def train_step(self, micro_batches: Sequence[MB], loss_fn: MicroBatchLoss[MB]) -> tuple[list[dict], float]:
        self.prepare_for_training_step()
        metrics = self.get_loss_and_metrics(micro_batches, loss_fn)
        return metrics, self.finish_training_step()

    # -------------------------------------------------------- inference hooks
    def prepare_for_inference(self) -> None:
        self.policy.eval()

    def finish_inference(self) -> None:
        self.policy.train()

    # --------------------------------------------------------------- export
    def export_weights(self) -> dict[str, torch.Tensor]:
        """{megatron key: full tensor} of the policy, assembled from every TP/PP shard.

        Used by the cross-layout tests. Rollout engines take HF-named tensors instead, one at a
        time: models/hf_io.stream_hf_weights. Collective."""
        from nemo_optune.models.export import gather_full_tensors

        return gather_full_tensors(self.policy, of="param")


def inference_model(
    spec: ModelSpec, layout: Layout, seed: int = 0, tokenizer: Tokenizer | None = None
) -> MegatronGPTOPTuneModel:
    """A policy-only model of `spec` in this layout (fp32), without an optimizer, to load into
    (convert, the import tests)."""
    cfg = ModelConfig(tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp)
    return MegatronGPTOPTuneModel(cfg, spec, layout, seed, with_reference=False, tokenizer=tokenizer, initialize=False)
