#!/usr/bin/env python
"""Train hf_ddpm's diffusion model (--model ddpm, vdm or vae) with Accelerate, from one CPU process to many GPUs.

    accelerate launch training/train.py                      # the default recipe on the 60,000 MNIST digits
    accelerate launch training/train.py --config run.yaml    # any flag below, from a YAML or JSON file
    accelerate launch --config_file training/configs/cpu_2proc.yaml training/train.py --max_train_steps 100

Read it top to bottom: arguments -> data -> model + objective -> the accelerate loop (checkpoints, EMA, logging) ->
outputs (pipeline, sample grid, NLL, model card) -> push to the Hub. The flags, and every check made of them before
work starts, are hf_ddpm.training_args (``python training/train.py --help`` lists them); what a model kind does (its
loss, pipeline and bound) comes from hf_ddpm.objectives; what any run needs (checkpoints, grids, precision, the
output folder) from hf_ddpm.training_utils.

Batch sizes: ``--train_batch_size`` is per process; one optimizer step sees
``train_batch_size * num_processes * gradient_accumulation_steps`` images (logged at start). Only the main process
writes files, logs and pushes.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers import UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from hf_ddpm import DenoisingUNet, GaussianVAE, HFDDPMScheduler, NoiseSchedule
from hf_ddpm.data import ImageData, ImageTensorDataset, load_images, split_holdout
from hf_ddpm.ddpm.timestep_sampling import make_timestep_sampler
from hf_ddpm.evaluation import BoundOptions, BoundResult, evaluate_bound
from hf_ddpm.hub.card import NLLResult, TrainingReport, render_model_card
from hf_ddpm.hub.push import push_pipeline_to_hub, save_pipeline_repo
from hf_ddpm.objectives import DiffusionObjective, Objective, VAEObjective, VDMObjective
from hf_ddpm.pipelines.vdm import VDMModel
from hf_ddpm.plots import (
    BOUND_BY_TIME_PATH,
    LOSS_CURVE_PATH,
    bound_by_time,
    has_time_axis,
    plot_bound_by_time,
    plot_loss_curve,
)
from hf_ddpm.training_args import (
    DataArguments,
    ModelArguments,
    TrainingArguments,
    describe_network_layout,
    model_keys,
    parse_arguments,
    resolved_arguments,
    run_cli,
)
from hf_ddpm.training_utils import (
    PIPELINE_PREFIX,
    FiniteGuard,
    TrainLog,
    checkpoint_step,
    ema_weights,
    finished_run,
    flush_denormals,
    hardware_description,
    has_accelerator_device,
    log_sample_grid,
    nonfinite_stop_message,
    prepare_output_dir,
    read_train_log,
    require_finite_bound,
    resolve_mixed_precision,
    sample_grid,
    save_checkpoint,
    use_all_cores,
)

logger = get_logger(__name__, log_level="INFO")


# ================================================================================================ data
def load_data(data_args: DataArguments) -> tuple[ImageData, ImageData, str]:
    """(training images, held-out images, a sentence saying where the held-out set comes from). The held-out set is
    ``--eval_data``, else the official test split of the embedded MNIST when training on it, else images held out
    at random from the training data."""
    common = dict(channels=data_args.channels, resolution=data_args.resolution, center_crop=data_args.center_crop)
    source = data_args.dataset_name or data_args.train_data_dir
    train = load_images(
        source,
        split="train",
        dataset_config=data_args.dataset_config,
        image_column=data_args.image_column,
        max_images=data_args.max_train_images,
        cache_dir=data_args.cache_dir,
        **common,
    )
    if data_args.eval_data is not None or source is None:
        held_out = load_images(
            data_args.eval_data, split=data_args.eval_split, max_images=data_args.num_eval_images, **common
        )
        return train, held_out, f"the first {len(held_out.images)} images of {held_out.source}"
    train, held_out = split_holdout(train, data_args.num_eval_images)
    return train, held_out, f"{len(held_out.images)} images held out at random from {train.source} (not trained on)"


class IndexedImages(torch.utils.data.Dataset):
    """(index, image) pairs, so a run can record which images each process trained on."""

    def __init__(self, images: ImageTensorDataset):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        return index, self.images[index]


# ================================================================================================ model + objective
def build_model(
    model_args: ModelArguments, data_args: DataArguments, train_args: TrainingArguments
) -> tuple[torch.nn.Module, Objective]:
    """The network to train and the objective of its model kind (loss, pipeline, bound)."""
    options = BoundOptions(
        timesteps_per_image=train_args.eval_timesteps_per_image, iwae_samples=model_args.iwae_samples
    )
    if model_args.model == "vae":
        vae = GaussianVAE(
            sample_size=data_args.resolution,
            in_channels=data_args.channels,
            latent_dim=model_args.latent_dim,
            block_out_channels=tuple(model_args.block_out_channels[:2]),
            num_latent_layers=model_args.num_latent_layers,
        )
        return vae, VAEObjective(options)
    if model_args.model == "vdm":
        unet = DenoisingUNet(
            sample_size=data_args.resolution,
            in_channels=data_args.channels,
            learn_variance=False,
            block_out_channels=tuple(model_args.block_out_channels),
            layers_per_block=model_args.layers_per_block,
            attention_resolutions=tuple(model_args.attention_resolutions),
            dropout=model_args.dropout,
            fourier_features=(7, 8),
        )
        model = VDMModel(unet, NoiseSchedule(schedule_type=model_args.noise_schedule), model_args.schedule_interior)
        return model, VDMObjective(options, sample_steps=train_args.sample_steps)
    scheduler = HFDDPMScheduler(
        num_train_timesteps=model_args.num_train_timesteps,
        beta_schedule=model_args.beta_schedule,
        variance_type=model_args.variance_type,
        prediction_type=model_args.prediction_type,
    )
    sampler_name = model_args.timestep_sampler
    if sampler_name == "auto":
        sampler_name = "loss-second-moment" if model_args.loss_type == "vlb" else "uniform"
    objective = DiffusionObjective(
        scheduler,
        model_args.loss_type,
        make_timestep_sampler(sampler_name, model_args.num_train_timesteps),
        snr_gamma=model_args.snr_gamma,
        bound_options=options,
        sample_steps=train_args.sample_steps,
    )
    out_channels = data_args.channels * (2 if model_args.variance_type == "learned_range" else 1)
    if model_args.architecture == "diffusers_unet2d":
        sizes = [data_args.resolution // 2**level for level in range(len(model_args.block_out_channels))]
        attention = [size in model_args.attention_resolutions for size in sizes]
        unet = UNet2DModel(
            sample_size=data_args.resolution,
            in_channels=data_args.channels,
            out_channels=out_channels,
            block_out_channels=tuple(model_args.block_out_channels),
            layers_per_block=model_args.layers_per_block,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
            norm_num_groups=8,
            dropout=model_args.dropout,
        )
        return unet, objective
    if model_args.model_config_name_or_path is not None:  # diffusers' flag: the network from a saved config
        try:
            unet = DenoisingUNet.from_config(DenoisingUNet.load_config(model_args.model_config_name_or_path))
        except (OSError, ValueError) as error:
            reason = " ".join(str(error).split())
            raise SystemExit(f"--model_config_name_or_path {model_args.model_config_name_or_path}: {reason}") from None
        given = (unet.config.sample_size, unet.config.in_channels, unet.config.learn_variance)
        wanted = (data_args.resolution, data_args.channels, model_args.variance_type == "learned_range")
        if given != wanted:
            raise SystemExit(
                f"--model_config_name_or_path {model_args.model_config_name_or_path}: its (sample_size, in_channels, "
                f"learn_variance) {given} do not fit --resolution, --channels and --variance_type {wanted}."
            )
        return unet, objective
    unet = DenoisingUNet(
        sample_size=data_args.resolution,
        in_channels=data_args.channels,
        learn_variance=model_args.variance_type == "learned_range",
        block_out_channels=tuple(model_args.block_out_channels),
        layers_per_block=model_args.layers_per_block,
        attention_resolutions=tuple(model_args.attention_resolutions),
        dropout=model_args.dropout,
    )
    return unet, objective


def evaluate(
    objective: Objective, model: torch.nn.Module, images: torch.Tensor, train_args: TrainingArguments
) -> BoundResult:
    """The bound of the model being trained on the held-out images (the same seed every time, so successive
    evaluations differ only by the model)."""
    model.eval()
    bound = evaluate_bound(
        objective.pipeline(model),
        images,
        objective.bound_options,
        batch_size=train_args.eval_batch_size,
        generator=torch.Generator().manual_seed(train_args.seed),
    )
    model.train()
    return bound


# ================================================================================================ main
def main(argv: list[str] | None = None) -> Path:
    flush_denormals()  # first: the threads torch starts later inherit it
    model_args, data_args, train_args = parse_arguments(argv)
    output_dir = Path(train_args.output_dir)
    arguments = resolved_arguments(model_args, data_args, train_args)
    mixed_precision = resolve_mixed_precision(train_args.mixed_precision)
    accelerator = Accelerator(
        cpu=not has_accelerator_device(),  # with no GPU, several launched processes form a gloo group on the CPU
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=None if train_args.logger == "none" else train_args.logger,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / train_args.logging_dir)
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    threads = use_all_cores()
    try:
        resume_path, removed = prepare_output_dir(
            accelerator,
            output_dir,
            arguments,
            model_keys(),
            train_args.overwrite_output_dir,
            train_args.logging_dir,
            train_args.resume_from_checkpoint,
        )
    except ValueError as error:
        raise SystemExit(str(error)) from None
    if removed:
        logger.info(f"--overwrite_output_dir: removed the old run's {', '.join(removed)} from {output_dir}.")
    if resume_path is not None and finished_run(resume_path, output_dir, train_args.max_train_steps):
        message = (
            f"{resume_path.name} is at step {checkpoint_step(resume_path)} >= --max_train_steps "
            f"{train_args.max_train_steps} and its outputs are in {output_dir}: the run is finished, nothing to do "
            "(raise --max_train_steps to train further)."
        )
        if accelerator.is_main_process:
            print(message)
        accelerator.end_training()
        return output_dir
    if train_args.resume_from_checkpoint == "latest" and resume_path is None:
        logger.info(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}; starting a new run.")

    # ---- data
    train_data, held_out, held_out_description = load_data(data_args)
    dataset = IndexedImages(ImageTensorDataset(train_data.images, random_flip=data_args.random_flip))
    if len(dataset) < train_args.train_batch_size * accelerator.num_processes:
        raise SystemExit(
            f"{len(dataset)} training images are fewer than one global batch "
            f"({train_args.train_batch_size} x {accelerator.num_processes} processes): lower --train_batch_size."
        )
    held_out_images = ImageTensorDataset(held_out.images)[:]
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=train_args.train_batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=data_args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(train_args.seed),
    )

    # ---- model, objective, optimizer, EMA
    set_seed(train_args.seed)  # same initial weights in every process
    model, objective = build_model(model_args, data_args, train_args)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=train_args.learning_rate,
        betas=(train_args.adam_beta1, train_args.adam_beta2),
        weight_decay=train_args.adam_weight_decay,
        eps=train_args.adam_epsilon,
        fused=True,  # one kernel for all parameters (CPU and CUDA): 4.5x faster than the foreach step on CPU
    )
    updates_per_epoch = math.ceil(len(loader) / train_args.gradient_accumulation_steps)
    max_train_steps = train_args.max_train_steps or train_args.num_epochs * updates_per_epoch
    num_epochs = math.ceil(max_train_steps / updates_per_epoch)
    lr_scheduler = get_scheduler(
        train_args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=train_args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    unwrapped = accelerator.unwrap_model(model)
    ema = None
    if train_args.use_ema:
        ema = EMAModel(
            unwrapped.parameters(),
            decay=train_args.ema_max_decay,
            use_ema_warmup=True,
            inv_gamma=train_args.ema_inv_gamma,
            power=train_args.ema_power,
            foreach=True,
        )
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    accelerator.register_for_checkpointing(objective)
    finite_guard = FiniteGuard(output_dir)  # weights and EMA weights finite before every save

    global_batch = train_args.train_batch_size * accelerator.num_processes * train_args.gradient_accumulation_steps
    logger.info(
        f"{len(dataset)} training images ({train_data.source}); held out: {held_out_description}. "
        f"{accelerator.num_processes} process(es) on {accelerator.device} ({threads} threads each), mixed precision "
        f"{mixed_precision}; "
        f"batch {train_args.train_batch_size} per process, {global_batch} per optimizer step; {max_train_steps} steps "
        f"({num_epochs} epochs); {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{describe_network_layout(model_args, data_args)}."
    )

    # ---- resume
    global_step, first_epoch, skip_batches = 0, 0, 0
    if resume_path is not None:
        try:
            accelerator.load_state(str(resume_path))
        except (RuntimeError, KeyError, ValueError) as error:  # e.g. 145 "size mismatch" lines: keep the first
            first = str(error).strip().splitlines()[:2]
            raise SystemExit(
                f"--resume_from_checkpoint {resume_path} does not fit this model ({' '.join(first)[:300]}): resume "
                "with the arguments it was trained with (its training_args.json), or start a new run."
            ) from None
        global_step = checkpoint_step(resume_path)
        first_epoch = global_step // updates_per_epoch
        skip_batches = (global_step % updates_per_epoch) * train_args.gradient_accumulation_steps
        logger.info(f"Resumed from {resume_path} at step {global_step}.")
    else:
        set_seed(train_args.seed, device_specific=True)  # different noise and timesteps in every process
    if accelerator.is_main_process:
        (output_dir / "training_args.json").write_text(json.dumps(arguments, indent=2))
        tracker_config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in arguments.items()}
        accelerator.init_trackers("hf_ddpm", config=tracker_config)

    # ---- the loop
    seen_indices: list[int] = []
    progress = tqdm(
        total=max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process, desc="steps"
    )
    start_time, start_step = time.time(), global_step
    train_log = None
    if accelerator.is_main_process:  # appended and flushed step by step; a resume drops the steps after its checkpoint
        train_log = TrainLog(output_dir / "train_log.jsonl", resume_step=global_step if resume_path else None)
    last_epoch = num_epochs if global_step < max_train_steps else first_epoch  # a finished run trains no step
    for epoch in range(first_epoch, last_epoch):
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip_batches) if skip_batches else loader
        skip_batches = 0
        for indices, clean in batches:
            if train_args.record_seen_indices:
                seen_indices.extend(indices.tolist())
            with accelerator.accumulate(model):
                out = objective.loss(model, clean)
                loss = out.loss.mean()
                if not torch.isfinite(accelerator.gather(loss.detach())).all():
                    what = f"The loss became {loss.item()} at step {global_step} (epoch {epoch})"
                    raise SystemExit(nonfinite_stop_message(what, output_dir))
                accelerator.backward(loss)
                grad_norm = (
                    accelerator.clip_grad_norm_(model.parameters(), train_args.max_grad_norm)
                    if accelerator.sync_gradients
                    else None
                )
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            objective.observe(accelerator.gather(out.feedback))
            if not accelerator.sync_gradients:
                continue
            if ema is not None:
                ema.step(unwrapped.parameters())
            global_step += 1
            finite_guard.observe(unwrapped.parameters(), ema, global_step)
            progress.update(1)
            train_seconds = time.time() - start_time  # of this run (a resumed run starts again at 0)
            images_per_second = (global_step - start_step) * global_batch / train_seconds
            logs = {
                "loss": accelerator.reduce(loss.detach(), "mean").item(),  # the mean over processes
                "lr": lr_scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "images_per_second": images_per_second,
                "train_seconds": train_seconds,
            }
            if ema is not None:
                logs["ema_decay"] = ema.cur_decay_value
            logs.update(out.logs)
            progress.set_postfix(loss=f"{logs['loss']:.4f}", img_s=f"{images_per_second:.0f}")
            accelerator.log(logs, step=global_step)
            if train_log is not None:
                train_log.append({"step": global_step, **logs})
            if global_step % train_args.checkpointing_steps == 0 or global_step == max_train_steps:
                limit = train_args.checkpoints_total_limit
                finite_guard.check(global_step)
                saved = save_checkpoint(accelerator, output_dir, global_step, limit, arguments)
                logger.info(f"Saved checkpoint {saved}")
                if train_args.push_to_hub and train_args.push_checkpoints and accelerator.is_main_process:
                    with ema_weights(ema, unwrapped):
                        push_pipeline_to_hub(
                            objective.pipeline(unwrapped),
                            train_args.hub_model_id,
                            path_in_repo=f"checkpoints/step-{global_step}",
                            training_args=arguments,
                            token=train_args.hub_token,
                            private=train_args.hub_private_repo,
                        )
            if (
                train_args.save_pipeline_steps
                and global_step % train_args.save_pipeline_steps == 0
                and accelerator.is_main_process
            ):
                finite_guard.check(global_step)
                with ema_weights(ema, unwrapped):
                    objective.pipeline(unwrapped).save_pretrained(output_dir / f"{PIPELINE_PREFIX}{global_step}")
            if (
                global_step % train_args.eval_steps == 0
                and global_step < max_train_steps
                and accelerator.is_main_process
            ):
                with ema_weights(ema, unwrapped):
                    bound = evaluate(objective, unwrapped, held_out_images, train_args)
                    if accelerator.trackers:
                        grid = sample_grid(
                            objective.pipeline(unwrapped),
                            train_args.num_sample_images,
                            train_args.seed,
                            **objective.sampling_kwargs,
                        )
                        log_sample_grid(accelerator, grid, global_step)
                accelerator.log(
                    {"eval/bits_per_dim": bound.bits_per_dim, "eval/standard_error": bound.standard_error},
                    step=global_step,
                )
                logger.info(
                    f"step {global_step}: held-out NLL {bound.bits_per_dim:.4f} ± {bound.standard_error:.4f} "
                    f"bits/dim ({bound.estimator})"
                )
            if global_step >= max_train_steps:
                break
        if global_step >= max_train_steps:
            break
    progress.close()
    train_seconds = time.time() - start_time
    if train_args.record_seen_indices:
        (output_dir / f"seen_indices_rank{accelerator.process_index}.json").write_text(json.dumps(seen_indices))

    # ---- outputs: the EMA weights as a pipeline, the NLL, samples, plots, the card; then the Hub
    finite_guard.check(global_step)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with ema_weights(ema, unwrapped):
            pipeline = objective.pipeline(unwrapped)
            bound = evaluate(objective, unwrapped, held_out_images, train_args)
            require_finite_bound(bound, "no pipeline, model card or eval_results.json was written")
            grid = sample_grid(pipeline, train_args.num_sample_images, train_args.seed, **objective.sampling_kwargs)
            # the whole run's log (a resumed run's earlier steps too), and where the bound goes in time (diffusions)
            plots = {LOSS_CURVE_PATH: plot_loss_curve(read_train_log(output_dir / "train_log.jsonl"))}
            captions = {
                LOSS_CURVE_PATH: "Training loss against the optimizer step (the whole run, from train_log.jsonl)"
            }
            if has_time_axis(pipeline):  # DDPM and VDM; the VAE has none
                generator = torch.Generator().manual_seed(train_args.seed)
                plots[BOUND_BY_TIME_PATH] = plot_bound_by_time(*bound_by_time(pipeline, held_out_images, generator))
                captions[BOUND_BY_TIME_PATH] = "Where the bits of the bound go: its terms along the diffusion's time"
            results = {
                "held_out": held_out_description,
                "nll": bound.to_dict(),
                "steps": global_step,
                "images_seen": global_step * global_batch,
                "train_seconds_this_run": train_seconds,
                "mixed_precision": mixed_precision,
                "num_processes": accelerator.num_processes,
                "threads_per_process": threads,
                "hardware": hardware_description(accelerator),
            }
            report = TrainingReport.for_pipeline(
                pipeline,
                train_args.hub_model_id or output_dir.name,
                datasets=[d for d in [train_data.dataset_id] if d],
                train_data=train_data.source,
                training_args=arguments,
                steps=global_step,
                images_seen=results["images_seen"],
                wall_time_seconds=train_seconds,
                hardware=results["hardware"],
                sampling_kwargs=objective.sampling_kwargs,
                plots=captions,
                nll=NLLResult(
                    bound,
                    dataset_id=held_out.dataset_id or "local",
                    split=held_out.split or "held-out",
                    dataset_name="MNIST"
                    if held_out.dataset_id == "ylecun/mnist"
                    else held_out.dataset_id or "local images",
                ),
            )
            card = render_model_card(report)
            save_pipeline_repo(
                pipeline, output_dir, card=card, sample_grid=grid, training_args=arguments, images=plots
            )
        (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2))
        train_log.close()
        logger.info(
            f"Held-out NLL {bound.bits_per_dim:.4f} ± {bound.standard_error:.4f} bits/dim; pipeline saved to "
            f"{output_dir}"
        )
        log_sample_grid(accelerator, grid, global_step)
        if train_args.push_to_hub:
            push_pipeline_to_hub(
                pipeline,
                train_args.hub_model_id,
                card=card,
                sample_grid=grid,
                training_args=arguments,
                images=plots,
                token=train_args.hub_token,
                private=train_args.hub_private_repo,
            )
    accelerator.end_training()
    return output_dir


if __name__ == "__main__":
    sys.exit(run_cli(main))
