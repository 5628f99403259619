# nemo_optune on an NGC container. NEVER BUILT HERE: this machine has no docker daemon, no registry
# access and no GPU; the image names and tags below were read in public sources, not pulled.
#
#   docker build -t nemo_optune .                      # TensorRT-LLM 1.2.1 (generation.engine=trtllm)
#   docker build -t nemo_optune:vllm --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:25.04-py3 \
#       --build-arg ENGINE_EXTRA=vllm .                # vLLM (generation.engine=vllm)
#   then: enroot import dockerd://nemo_optune for Slurm + pyxis (examples/slurm: CONTAINER_IMAGE, ENGINE)
#
# One image cannot hold both engines: vLLM's wheels pin an exact torch and TensorRT-LLM's
# release image ships its own torch (NeMo-RL declares its `trtllm` and `vllm` extras as
# conflicting and gives each engine its own environment). So the engine picks the base:
# - default: nvcr.io/nvidia/tensorrt-llm/release:1.2.1, TensorRT-LLM's NGC release container
#   (tensorrt_llm 1.2.1, the version trtllm_engine.py was written against: docs/engines.md;
#   PyTorch, CUDA, TensorRT, Ray inside). The megatron engine works in it too.
# - vLLM: an NGC PyTorch container plus `pip install vllm` in a derived step (ENGINE_EXTRA=vllm);
#   vLLM brings the torch it was built for, which then replaces the container's.
ARG BASE_IMAGE=nvcr.io/nvidia/tensorrt-llm/release:1.2.1
FROM ${BASE_IMAGE}
ARG ENGINE_EXTRA=

# megatron-core >= 0.17 needs Python >= 3.12, which the containers have; CI pins 0.16.1 on 3.11.
# torch (and apex/TransformerEngine where the base has them) come from the container: nothing in
# this step may replace torch.
RUN pip install --no-cache-dir "megatron-core>=0.17" hydra-core==1.3.2 omegaconf==2.3.0 \
        tensorboard matplotlib psutil tqdm transformers safetensors

# vLLM only where asked for (it replaces torch, see above); TensorRT-LLM is already in the default base.
RUN if [ "$ENGINE_EXTRA" = "vllm" ]; then pip install --no-cache-dir vllm; fi

WORKDIR /workspace/nemo_optune
COPY . .
RUN pip install --no-cache-dir --no-deps -e .
