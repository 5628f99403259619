# nemo_optune on an NGC PyTorch container (Python 3.12, CUDA, torch, apex, TransformerEngine).
#   docker build -t nemo_optune .   # then: enroot import dockerd://nemo_optune for Slurm + pyxis
# Not built in this repository (no registry access or docker daemon here).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.04-py3
FROM ${BASE_IMAGE}

# megatron-core >= 0.17 needs Python >= 3.12, which the container has; CI pins 0.16.1 on 3.11.
# torch, apex and TransformerEngine come from the container: nothing here may replace torch.
RUN pip install --no-cache-dir "megatron-core>=0.17" hydra-core==1.3.2 omegaconf==2.3.0 \
        tensorboard matplotlib psutil tqdm transformers safetensors

# TensorRT-LLM (optional extra, imported lazily) comes from NVIDIA's own index or its
# containers; install it in a derived image when the TensorRT-LLM rollout engine lands.

WORKDIR /workspace/nemo_optune
COPY . .
RUN pip install --no-cache-dir --no-deps -e .
