"""Real token shards for tests: synthetic img2dataset tars → k-means tokenizer → vqd-extract (in-process)."""
from pathlib import Path

import numpy as np
import torch


def make_token_shards(root: Path, num_shards: int, per_shard: int) -> Path:
    """`num_shards` shards of `per_shard` 32-px samples as 4×4 tokens of a 32-code tokenizer; their directory."""
    from vqd_scale.cli.extract import main as extract
    from vqd_scale.data.synthetic import SyntheticSpec, make_sample, write_shards
    from vqd_scale.models.vqvae import KMeansTokenizer

    spec = SyntheticSpec(num_shards=num_shards, samples_per_shard=per_shard, resolution=32, seed=0)
    write_shards(root / "raw", spec)
    torch.manual_seed(0)
    n = num_shards * per_shard
    imgs = np.stack([np.array(make_sample(spec, 99, i)[0]) for i in range(n)])  # [n,32,32,3] uint8
    imgs = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1  # [n,3,32,32] in [-1,1]
    KMeansTokenizer.fit(imgs, patch=8, num_codes=32, seed=0).save(root / "tok")  # 4×4 tokens
    last = f"{num_shards - 1:05d}"
    inputs = root / "raw" / ("00000.tar" if num_shards == 1 else f"{{00000..{last}}}.tar")
    assert extract(["--inputs", str(inputs), "--out-dir", str(root / "tok_shards"), "--tokenizer", str(root / "tok"),
                    "--resolution", "32", "--no-progress"]) in (0, None)
    return root / "tok_shards"
