"""The sample metrics of real digits, the floor to read a model's against: N official training digits scored
exactly as ``hf_ddpm evaluate MODEL --data embedded --split test --num_samples N`` scores N samples (against all
10,000 t10k digits, in the features of hf_ddpm's MNIST classifier).

    python benchmarks/real_digits.py [--num_images 1000] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from hf_ddpm.data.sources import load_images
from hf_ddpm.image_utils import uint8_to_model_range
from hf_ddpm.metrics import sample_quality


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=1000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    real = load_images("embedded", split="train", max_images=args.num_images).images
    reference = load_images("embedded", split="test").images
    quality = sample_quality(uint8_to_model_range(real), uint8_to_model_range(reference))
    result = {"real_train_digits": args.num_images, "reference": "all 10,000 t10k digits", **asdict(quality)}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
