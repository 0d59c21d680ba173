"""minirlhf: a from-scratch, minimal RLHF toolkit. `make test` / `make demo` build a venv and install this."""
from setuptools import setup

setup(
    name="minirlhf",
    version="0.1.0",
    description="RLHF from scratch on GPT-2: SFT, reward model, PPO and red teaming, with Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=["minirlhf", "minirlhf.crowd", "minirlhf.demo", "minirlhf.redteaming", "kernels"],
    package_data={"minirlhf": ["assets/*", "demo/pretrained/*"]},
    py_modules=["train_sft", "train_rm", "train_ppo", "redteam"],
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",  # not pinned: a CUDA build of torch pins its own
        "tiktoken>=0.7",
        "numpy",
        "safetensors>=0.4",
        "tqdm",
    ],
    extras_require={
        # transformers 5.25 requires Hugging Face's `kernels` package and imports it at start-up, where this
        # repository's own `kernels/` answers instead (tests/test_packaging.py): below it, it is an optional probe
        "test": ["pytest", "transformers>=4.42,<5.25", "selenium>=4.10", "krippendorff"],
        "demo": ["vaderSentiment==3.3.2", "better-profanity==0.7.0", "matplotlib"],
        "hub": ["huggingface_hub"],
        "crowd": ["bottle>=0.13"],  # the labelling web app (python -m minirlhf.crowd serve)
    },
)
