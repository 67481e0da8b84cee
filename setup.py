from setuptools import find_packages, setup

setup(
    name="vqd_scale",
    version="0.1.0",
    description="VQ-Diffusion and Shifted Diffusion (Corgi) training at LAION scale on SLURM",
    python_requires=">=3.11",
    packages=find_packages(include=["vqd_scale", "vqd_scale.*"]),
    package_data={"vqd_scale": ["assets/*"]},
    install_requires=[
        "torch==2.13.0",
        "deepspeed>=0.19",
        "webdataset>=1.0",
        "braceexpand",
        "transformers",
        "open_clip_torch>=3.0",
        "diffusers>=0.30",
        "submitit",
        "wandb",
        "omegaconf>=2.3",
        "safetensors",
        "numpy",
        "scipy",
        "scikit-learn",
        "pillow",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "pytorch-fid",  # FID Inception-v3 (eval.feature_extractor=inception) and the Fréchet oracle in tests
    ],
    extras_require={"test": [
        "pytest", "pytest-timeout",
        # the oracle for tools/prepare_tokenizer.py's taming VQGAN conversion (its Encoder/Decoder/quantiser)
        "taming-transformers-rom1504",
        # img2dataset's own requirements: tools/install.sh installs img2dataset itself with --no-deps, because
        # it pins webdataset<0.3 although it only uses TarWriter (webdataset>=1.0 has it unchanged)
        "opencv-python-headless>=4.5.5.62,<5", "fire>=0.4.0,<0.8.0", "pandas>=1.1.5,<3", "pyarrow>=6.0.0",
        "exifread-nocycle>=3.0.1,<4", "albumentations>=1.3.0,<2", "fsspec",
    ]},
    entry_points={
        "console_scripts": [
            "vqd-train=vqd_scale.cli.train:main",
            "vqd-extract=vqd_scale.cli.extract:main",
            "vqd-eval=vqd_scale.cli.eval:main",
            "vqd-sample=vqd_scale.cli.sample:main",
            "vqd-export=vqd_scale.cli.export:main",
        ]
    },
)
