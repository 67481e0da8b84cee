"""Write synthetic img2dataset-format shards (coloured shapes + captions that describe them).

    python tools/make_synthetic.py --out data/synthetic --shards 4 --per-shard 256 --resolution 64
"""
import argparse

from vqd_scale.data.synthetic import SyntheticSpec, write_shards


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--per-shard", type=int, default=256)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--two-object-prob", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-captions", action="store_true",
                    help="image-only shards (no txt member; vqd-extract --keep-uncaptioned keeps them); give another "
                         "--seed than the captioned shards so the images differ")
    a = ap.parse_args(argv)
    spec = SyntheticSpec(num_shards=a.shards, samples_per_shard=a.per_shard, resolution=a.resolution,
                         two_object_prob=a.two_object_prob, seed=a.seed, captioned=not a.no_captions)
    paths = write_shards(a.out, spec)
    print(f"wrote {len(paths)} shards × {a.per_shard} samples to {a.out}")


if __name__ == "__main__":
    main()
