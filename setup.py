"""adv_soups: adversarial co-training of ViTs with domain adapters, and adapter soups."""
import setuptools

setuptools.setup(
    name="adv_soups",
    version="0.1.0",
    description=(
        "Clean/adversarial co-training of Vision Transformers with domain adapters "
        "and adversarial model soups (Rebuffi, Croce, Gowal, ICLR 2023) in JAX/Flax."
    ),
    packages=setuptools.find_packages(include=["adv_soups", "adv_soups.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2,<0.13",
        "flax>=0.12.8,<0.14",
        "optax>=0.2.5,<0.3",
        "ml-collections>=1.0,<2",
        "orbax-checkpoint>=0.11,<0.13",
        "clu>=0.0.12,<0.1",
        "tensorboard>=2.18,<3",  # clu.metric_writers needs it; TF >= 2.21 no longer pulls it in
        "tensorflow-cpu>=2.18,<3",  # tf.data for the TFDS pipelines (in-memory sets run without)
        "tensorflow-datasets>=4.9.7,<5",
        "etils[epath,epy]>=1.7,<2",  # file paths (local, gs://) and lazy imports, without TF
        "importlib_resources>=6",  # TFDS download_and_prepare of our own builder needs it
        "absl-py>=2,<3",
        "numpy>=1.26,<3",
        "scikit-learn>=1.4,<2",  # ships the real handwritten-digits images we train on by default
        "matplotlib>=3.8,<4",
        "tqdm>=4.66,<5",
        "safetensors>=0.4,<1",  # soups exported for timm (numpy API: no torch)
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            "pytest-xdist>=3.5,<4",  # make test runs the suite in two processes
            "nbclient>=0.10,<1",
            "nbformat>=5.10,<6",
            "ipykernel>=6.29,<8",
        ],
    },
)
