"""Where a DDPM's reconstruction term goes: L_0 = -log p(x_0 | x_1) of saved models, split by the pixels' value.

    python benchmarks/decoder_term.py RUN_DIR [RUN_DIR ...] [--num_images 2000] [--seed 0] [--device cuda] \
        [--json benchmarks/results/decoder_term_MACHINE_DATE.json]

For the first ``--num_images`` official t10k digits, x_1 ~ q(x_1 | x_0) with the noise of ``--seed`` (the same for
every model), the network in float32 and float64 arithmetic after it: the term in bits/dim of all pixels, and the
part of it from the pixels at -1 (black, whose bin reaches to -infinity), at +1 (white) and between; with, per class,
the decoder's mean standard deviation in 8-bit bins (2/255) and its mean distance from x_0 in bins. A saturated
pixel decoded with its mean at the edge loses -log2 Phi((1/255) / sigma) bits: the decoder's smallest sigma decides
how little it can cost (``HFDDPMScheduler``'s ``decoder_min_std``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from hf_ddpm.data import ImageTensorDataset, load_images  # noqa: E402
from hf_ddpm.ddpm.elbo import reconstruction_term  # noqa: E402
from hf_ddpm.distributions import discretized_gaussian_log_likelihood  # noqa: E402
from hf_ddpm.pipelines.auto import default_device, load_pipeline  # noqa: E402
from throughput import cpu_name  # noqa: E402

#: The width of one 8-bit bin of data in [-1, 1].
BIN = 2 / 255


@torch.no_grad()
def decoder_term_by_pixel_class(model_dir: str, images: torch.Tensor, seed: int, batch_size: int = 250) -> dict:
    """L_0 of ``images`` (float64, in [-1, 1]) under the DDPM saved in ``model_dir``, bits/dim, in total and by
    pixel class, with the decoder's standard deviation and mean error per class in bins; on ``images``' device (the
    noise drawn on the CPU, the same on every device)."""
    pipeline = load_pipeline(model_dir).to(images.device)
    chain = pipeline.train_chain
    first = torch.zeros(len(images), dtype=torch.long, device=images.device)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x1 = chain.add_noise(images, noise.to(images.device), first)
    output = torch.cat(
        [pipeline.unet(x.float(), t).sample.double() for x, t in zip(x1.split(batch_size), first.split(batch_size))]
    )
    mean, log_variance, _ = chain.p_mean_variance(output, x1, first)
    nats_per_pixel = -discretized_gaussian_log_likelihood(images, mean, 0.5 * log_variance)
    total = reconstruction_term(images, mean, log_variance)
    dims = images[0].numel()
    classes = {"black (-1)": images <= -1, "white (+1)": images >= 1}
    classes["between"] = ~(classes["black (-1)"] | classes["white (+1)"])
    result = {
        "model": model_dir,
        "decoder_min_std": pipeline.scheduler.config.get("decoder_min_std"),
        "bits_per_dim": float(total.mean()) / dims / math.log(2),
    }
    for name, mask in classes.items():
        result[name] = {
            "share_of_pixels": float(mask.double().mean()),
            "bits_per_dim": float(nats_per_pixel[mask].sum()) / mask.numel() / math.log(2),
            "bits_per_pixel": float(nats_per_pixel[mask].mean()) / math.log(2),
            "decoder_std_in_bins": float(torch.exp(0.5 * log_variance[mask]).mean()) / BIN,
            "mean_error_in_bins": float((mean - images)[mask].abs().mean()) / BIN,
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help="folders written by train.py or save_pretrained (DDPMs)")
    parser.add_argument("--num_images", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device", default=default_device(), help="torch device to run on (default: cuda where available, else cpu)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    data = load_images("embedded", split="test", max_images=args.num_images, resolution=28, channels=1)
    images = ImageTensorDataset(data.images)[:].double().to(args.device)
    results = []
    for model in args.models:
        result = decoder_term_by_pixel_class(model, images, args.seed)
        classes = ", ".join(
            f"{name} {value['bits_per_dim']:.4f} (sigma {value['decoder_std_in_bins']:.2f} bins)"
            for name, value in result.items()
            if isinstance(value, dict)
        )
        print(f"{model}: L_0 {result['bits_per_dim']:.4f} bits/dim = {classes}", flush=True)
        results.append(result)
    if args.json:
        command = "python benchmarks/decoder_term.py " + " ".join(sys.argv[1:])
        record = {
            "machine": cpu_name(),
            "device": args.device,
            "images": data.source,
            "num_images": len(images),
            "command": command,
        }
        args.json.write_text(json.dumps({**record, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
