"""eat_fairseq: EAT (Efficient Audio Transformer) as a pip-installable fairseq extension."""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

setup(
    name="eat_fairseq",
    version="0.1.0",
    description="EAT self-supervised audio pre-training, fine-tuning and inference as a fairseq extension",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    # the recipes (examples/*/*.yaml) ship inside the package as eat_fairseq.recipes, so an installed copy
    # finds them without the source tree: `fairseq-hydra-train --config-dir $(eat-recipes pretraining) ...`
    packages=find_packages(include=["eat_fairseq", "eat_fairseq.*"]) + ["eat_fairseq.recipes"],
    # the recipes' Hydra callback (common.user_dir when not given); outside the package, see its doc
    py_modules=["eat_fairseq_hydra"],
    package_dir={"eat_fairseq.recipes": "examples"},
    package_data={"eat_fairseq.recipes": ["*/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "torchaudio>=2.4",
        "numpy>=1.24",
        "soundfile>=0.12",
        "tqdm>=4.60",
        "safetensors>=0.4",
    ],
    extras_require={
        # The training/fine-tuning layer. The core (features, model, extraction, tagging) runs without it.
        "fairseq": ["ve-fairseq==0.12.3", "hydra-core>=1.3,<1.4", "omegaconf>=2.3,<2.4", "tensorboardX>=2.6"],
        "eval": ["scikit-learn>=1.3"],
        # eat-plot (training curves) and the last step of `make demo`
        "plot": ["matplotlib>=3.8"],
        # eat-export and running .onnx models (eat-extract, eat-tag, load_model, HEAR) with onnxruntime
        "onnx": ["onnxruntime>=1.20", "onnx>=1.16"],
        "test": ["pytest>=8", "scikit-learn>=1.3"],
    },
    entry_points={
        "console_scripts": [
            "eat-user-dir=eat_fairseq.cli.user_dir:main",
            "eat-recipes=eat_fairseq.cli.recipes:main",
            "eat-manifest=eat_fairseq.prep.audio_folder:main",
            "eat-validate-manifest=eat_fairseq.prep.validate:main",
            "eat-convert=eat_fairseq.cli.convert:main",
            "eat-extract=eat_fairseq.cli.extract:main",
            "eat-tag=eat_fairseq.cli.tag:main",
            "eat-export=eat_fairseq.cli.export:main",
            "eat-evaluate=eat_fairseq.cli.evaluate:main",
            "eat-probe=eat_fairseq.cli.probe:main",
            "eat-plot=eat_fairseq.cli.plot:main",
        ]
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Multimedia :: Sound/Audio :: Analysis",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
