#!/usr/bin/env python
"""Train hf_ddpm's diffusion model (--model ddpm, vdm or vae) with Accelerate, from one CPU process to many GPUs.

    accelerate launch training/train.py                      # the 60,000 MNIST digits: 15 minutes on a CPU
                                                             # (--train_minutes), 2,000 steps on a GPU
    accelerate launch training/train.py --config run.yaml    # any flag below, from a YAML or JSON file
    accelerate launch --config_file training/configs/cpu_2proc.yaml training/train.py --max_train_steps 100

Read it top to bottom: arguments -> data -> model + objective -> how long (--max_train_steps, or the steps that fit in
--train_minutes, measured by hf_ddpm.training_budget) -> the accelerate loop (checkpoints, EMA, logging) ->
outputs (pipeline, sample grid, NLL, model card) -> push to the Hub. The flags, and every check made of them before
work starts, are hf_ddpm.training_args (``python training/train.py --help`` lists them); what a model kind does (its
loss, pipeline and bound) comes from hf_ddpm.objectives; what any run needs (checkpoints, grids, precision, the
output folder) from hf_ddpm.training_utils.

Batch sizes: ``--train_batch_size`` is per process; one optimizer step sees
``train_batch_size * num_processes * gradient_accumulation_steps`` images (logged at start). Only the main process
writes files, logs and pushes.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import sys
import time
from pathlib import Path

import PIL.Image
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import AutocastKwargs, ProjectConfiguration, set_seed
from diffusers import DiffusionPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from hf_ddpm.data import ImageTensorDataset, ShuffledBatches, load_training_data
from hf_ddpm.evaluation import BoundResult, evaluate_bound, has_time_axis
from hf_ddpm.guide_snapshot import GuideSnapshot
from hf_ddpm.hub.card import NLLResult, TrainingReport, render_model_card
from hf_ddpm.hub.push import push_pipeline_to_hub, save_pipeline_repo
from hf_ddpm.objectives import ObjectiveOutput, build_model_and_objective, read_logs
from hf_ddpm.plots import BOUND_BY_TIME_PATH, LOSS_CURVE_PATH, plot_bound_by_time, plot_loss_curve
from hf_ddpm.posthoc_ema import PostHocEMA, loaded_weights, reconstruct_posthoc_ema, remove_snapshots_after
from hf_ddpm.sampling_speedup import fast_sampling
from hf_ddpm.training_args import (
    describe_network_layout,
    model_keys,
    parse_arguments,
    resolved_arguments,
    run_cli,
)
from hf_ddpm.training_budget import (
    WARMUP_STABLE_DECAY,
    LateDecidedSteps,
    budgeted_run,
    compile_refusal,
    measure_step_budget,
    warmup_stable_decay_schedule,
)
from hf_ddpm.training_utils import (
    FINITE_CHECK_STEPS,
    PIPELINE_PREFIX,
    POSTHOC_EMA_FOLDER,
    FiniteGuard,
    SkippedUpdates,
    StartupTimes,
    TrainLog,
    checkpoint_step,
    ema_weights,
    finished_run,
    flush_denormals,
    hardware_description,
    has_accelerator_device,
    log_sample_grid,
    prepare_output_dir,
    read_train_log,
    require_finite_bound,
    resolve_mixed_precision,
    sample_grid,
    save_checkpoint,
    training_forward,
    use_all_cores,
)

logger = get_logger(__name__, log_level="INFO")


# ================================================================================================ main
def main(argv: list[str] | None = None) -> Path:
    startup = StartupTimes.of_this_process()  # where the seconds before the first step go, logged
    startup.mark("Python and imports")
    flush_denormals()  # first: the threads torch starts later inherit it
    model_args, data_args, train_args = parse_arguments(argv)
    output_dir = Path(train_args.output_dir)
    arguments = resolved_arguments(model_args, data_args, train_args)
    mixed_precision = resolve_mixed_precision(train_args.mixed_precision)
    accelerator = Accelerator(
        cpu=not has_accelerator_device(),  # with no GPU, several launched processes form a gloo group on the CPU
        kwargs_handlers=[AutocastKwargs(cache_enabled=False)] if train_args.cuda_graphs else None,  # graphs need it
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=None if train_args.logger == "none" else train_args.logger,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / train_args.logging_dir)
        ),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    threads = use_all_cores()
    try:
        resume_path, removed = prepare_output_dir(
            accelerator,
            output_dir,
            arguments,
            [*model_keys(), "use_ema", "posthoc_ema", "guidance_scale", "guide_fraction"],  # what checkpoints hold
            train_args.overwrite_output_dir,
            train_args.logging_dir,
            train_args.resume_from_checkpoint,
        )
    except ValueError as error:
        raise SystemExit(str(error)) from None
    if removed:
        logger.info(f"--overwrite_output_dir: removed the old run's {', '.join(removed)} from {output_dir}.")
    if resume_path is not None and not (train_args.max_train_steps or train_args.num_epochs):
        # the steps the budgeted run chose, and whether it compiled, kept
        train_args.max_train_steps, train_args.compile = budgeted_run(resume_path, train_args.compile)
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
    startup.mark("arguments, accelerator and output folder")

    # ---- data: the training images on the training device, shuffled there (no DataLoader); each process its share
    train_data, held_out, held_out_description = load_training_data(data_args)
    try:
        batches = ShuffledBatches(
            train_data.images,
            train_args.train_batch_size,
            accelerator.device,
            train_args.seed,
            accelerator.process_index,
            accelerator.num_processes,
            random_flip=data_args.random_flip,
        )
    except ValueError as error:
        raise SystemExit(str(error)) from None
    held_out_images = ImageTensorDataset(held_out.images)[:]
    startup.mark("data")

    # ---- model, objective, optimizer, EMA
    set_seed(train_args.seed)  # same initial weights in every process
    model, objective = build_model_and_objective(model_args, data_args, train_args)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=train_args.learning_rate,
        betas=(train_args.adam_beta1, train_args.adam_beta2),
        weight_decay=train_args.adam_weight_decay,
        eps=train_args.adam_epsilon,
        fused=True,  # one kernel for all parameters (CPU and CUDA): 4.5x faster than the foreach step on CPU
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)  # evaluated, sampled and saved eagerly
    size = (train_args.train_batch_size, data_args.channels, data_args.resolution, data_args.resolution)
    train_model, step_kind = training_forward(model, train_args, model_args.model, accelerator, size)
    budgeted = not (train_args.max_train_steps or train_args.num_epochs)
    device, precision, processes = accelerator.device.type, accelerator.mixed_precision, accelerator.num_processes
    refusal = compile_refusal(device, precision, model_args.model, processes, budgeted)
    if train_args.compile is None and refusal and not train_args.cuda_graphs:
        step_kind += f" (--compile unset: {refusal})"

    def use_compiled(compiled: bool) -> None:  # --compile unset: the budget compiles where it pays
        nonlocal train_model, step_kind
        train_model, step_kind = (torch.compile(model), "torch.compile") if compiled else (model, "eager")
        if compiled:
            logger.info("--compile unset: compiling the training step, which pays within the budget (a minute or so).")
        optimizer.zero_grad(set_to_none=True)  # a failed compiled backward leaves nothing behind

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
    startup.mark(f"network, optimizer, EMA and training step ({step_kind.split(' (')[0]})")
    logger.info(startup.describe())
    finite_guard = FiniteGuard(output_dir)  # weights and EMA weights finite before every save
    skipped = SkippedUpdates(output_dir, accelerator.device)  # updates with NaN or inf gradients: not applied
    posthoc: PostHocEMA | None = None  # --posthoc_ema's EMAs: made once the run's length is known (below)

    def train_step(clean: torch.Tensor) -> tuple[ObjectiveOutput, torch.Tensor, torch.Tensor | None]:
        """One forward and backward; every --gradient_accumulation_steps, the clipped update and the EMA's."""
        with accelerator.accumulate(model):
            out = objective.loss(train_model, clean)
            loss = out.loss.mean()
            accelerator.backward(loss)
            grad_norm = None
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), train_args.max_grad_norm)
                skipped.before_step(optimizer, grad_norm, scaled=accelerator.scaler is not None)
            optimizer.step()
            optimizer.zero_grad()
        objective.observe(accelerator.gather(out.feedback))
        if accelerator.sync_gradients and ema is not None:
            ema.step(unwrapped.parameters())
        if accelerator.sync_gradients and posthoc is not None:
            posthoc.step(unwrapped.parameters())  # and every snapshot_every updates, its snapshots
        return out, loss, grad_norm

    def held_out_bound() -> BoundResult:
        """The bound of the weights in ``unwrapped`` on the held-out images (the same seed each time)."""
        unwrapped.eval()
        generator = torch.Generator().manual_seed(train_args.seed)
        pipeline, options, batch_size = (
            objective.pipeline(unwrapped),
            objective.bound_options,
            train_args.eval_batch_size,
        )
        bound = evaluate_bound(pipeline, held_out_images, options, batch_size=batch_size, generator=generator)
        unwrapped.train()
        return bound

    def samples_of(pipeline: DiffusionPipeline) -> PIL.Image.Image:
        """The sample grid of ``pipeline`` as it is (mid-run: a grid drawn in fast_sampling left the training step
        34% slower after it, 0.229 against 0.171 s on a 2-core Zen 4 in bf16)."""
        return sample_grid(pipeline, train_args.num_sample_images, train_args.seed, **objective.sampling_kwargs)

    def best_posthoc_weights() -> tuple[contextlib.AbstractContextManager, BoundResult, dict]:
        """--posthoc_ema: of the EMAs of every --posthoc_ema_candidates length (reconstructed from the snapshots)
        and --use_ema's, the one with the best held-out bound (the same images, timesteps and noise for each): a
        context holding its weights in ``unwrapped``, its bound, and every candidate's, for eval_results.json."""
        bounds: dict[str, BoundResult] = {}
        best, best_weights = "", None  # the best so far, and its reconstructed weights (the others are dropped)
        for sigma_rel in train_args.posthoc_ema_candidates:
            label, weights = f"sigma_rel {sigma_rel:g}", reconstruct_posthoc_ema(posthoc.folder, sigma_rel)
            with loaded_weights(unwrapped, weights):
                bounds[label] = held_out_bound()
            if not best or bounds[label].bits_per_dim < bounds[best].bits_per_dim:
                best, best_weights = label, weights
        if ema is not None:
            with ema_weights(ema, unwrapped):
                bounds["use_ema"] = held_out_bound()
            if bounds["use_ema"].bits_per_dim < bounds[best].bits_per_dim:
                best = "use_ema"
        scores = {label: bound.bits_per_dim for label, bound in bounds.items()}
        logger.info(
            f"--posthoc_ema: held-out bound {', '.join(f'{k} {v:.4f}' for k, v in scores.items())} bits/dim; "
            f"the pipeline gets {best}."
        )
        context = ema_weights(ema, unwrapped) if best == "use_ema" else loaded_weights(unwrapped, best_weights)
        return context, bounds[best], {"chosen": best, "held_out_bits_per_dim": scores}

    def evaluate_mid_run() -> tuple[BoundResult, PIL.Image.Image | None]:
        """The held-out bound of the EMA weights, and a sample grid where a tracker shows it."""
        with ema_weights(ema, unwrapped):
            bound = held_out_bound()
            grid = None
            if train_args.logger != "none":  # what a tracker shows
                grid = samples_of(objective.pipeline(unwrapped))
        return bound, grid

    # ---- how long: --max_train_steps, else --num_epochs, else the steps that fit in --train_minutes (measured here)
    start_time = time.time()  # the budget's clock
    updates_per_epoch = math.ceil(len(batches) / train_args.gradient_accumulation_steps)
    max_train_steps = train_args.max_train_steps or (train_args.num_epochs or 0) * updates_per_epoch
    budget = None  # the StepBudget of a run of --train_minutes, measured here

    def agree(seconds: float) -> float:  # the processes' largest estimate: every process decides the same steps
        return accelerator.gather(torch.tensor([seconds], device=accelerator.device)).max().item()

    if not max_train_steps:
        cycle = itertools.chain.from_iterable(batches.epoch(e) for e in itertools.count())
        budget = measure_step_budget(
            train_args.train_minutes,
            lambda _: [train_step(next(cycle)) for _ in range(train_args.gradient_accumulation_steps)],
            [s for s in (model, optimizer, ema, objective, skipped) if s is not None],
            start_time,
            evaluation=evaluate_mid_run if accelerator.is_main_process else (lambda: None),
            eval_steps=train_args.eval_steps,
            agree=agree,
            synchronize=torch.cuda.synchronize if accelerator.device.type == "cuda" else (lambda: None),
            rng_devices=[accelerator.device] if accelerator.device.type == "cuda" else [],
            use_compiled=use_compiled if train_args.compile is None and not refusal else None,
        )
        max_train_steps = budget.steps
        arguments["compile"] = budget.compiled if train_args.compile is None else train_args.compile
        logger.info(budget.describe())
    late = None  # under warmup_stable_decay, the budget's steps re-estimated from the loop's pace until the decay
    if budget is not None and train_args.lr_scheduler == WARMUP_STABLE_DECAY:
        late = LateDecidedSteps(budget, train_args.lr_decay_fraction, start_time, train_args.eval_steps, agree)
    arguments["max_train_steps"] = max_train_steps  # in training_args.json and every checkpoint's: resumable
    num_epochs = math.ceil(max_train_steps / updates_per_epoch)
    if train_args.lr_scheduler == WARMUP_STABLE_DECAY:  # N read at every step: the loop may change it (late)
        lr_scheduler = warmup_stable_decay_schedule(
            optimizer.optimizer,
            train_args.lr_warmup_steps,
            lambda: max_train_steps,
            train_args.lr_decay_fraction,
            calls_per_step=accelerator.num_processes,
        )
    else:
        lr_scheduler = get_scheduler(
            train_args.lr_scheduler,
            optimizer=optimizer.optimizer,
            num_warmup_steps=train_args.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=max_train_steps * accelerator.num_processes,
        )
    lr_scheduler = accelerator.prepare(lr_scheduler)

    def snapshot_every(steps: int) -> int:  # --posthoc_ema_snapshots spread over the run's steps, the last at its end
        return math.ceil(steps / train_args.posthoc_ema_snapshots)

    if train_args.posthoc_ema:  # over the steps the run has (or plans: a late decision spreads them again)
        posthoc = PostHocEMA(
            unwrapped.parameters(),
            [name for name, _ in unwrapped.named_parameters()],
            output_dir / POSTHOC_EMA_FOLDER,
            snapshot_every=snapshot_every(max_train_steps),
            save=accelerator.is_main_process,
        )
        accelerator.register_for_checkpointing(posthoc)
    guide = None  # autoguidance (DDPM): the EMA weights at guide_step(N, --guide_fraction), saved as the guide_unet
    if model_args.model == "ddpm" and train_args.guidance_scale != 1:
        guide = GuideSnapshot(train_args.guide_fraction, train_args.guide_step)
        accelerator.register_for_checkpointing(guide)

    global_batch = train_args.train_batch_size * accelerator.num_processes * train_args.gradient_accumulation_steps
    logger.info(
        f"{len(train_data.images)} training images ({train_data.source}); held out: {held_out_description}. "
        f"{accelerator.num_processes} process(es) on {accelerator.device} ({threads} threads each), mixed precision "
        f"{mixed_precision}; recipe {train_args.recipe} (--recipe; flags override it): "
        f"batch {train_args.train_batch_size} per process, {global_batch} per optimizer step; {max_train_steps} steps "
        f"({num_epochs} epochs); training step {step_kind}; loss read back every "
        f"{train_args.logging_steps} step(s); {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{describe_network_layout(model_args, data_args, train_args.recipe)}."
    )

    # ---- resume
    global_step, first_epoch, skip_batches = 0, 0, 0
    if resume_path is not None:
        try:
            accelerator.load_state(str(resume_path))
        except (RuntimeError, KeyError, ValueError, OSError) as error:  # 145 "size mismatch" lines: keep the first
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
    if posthoc is not None and accelerator.is_main_process:  # snapshots of steps this run trains: an earlier run's
        remove_snapshots_after(posthoc.folder, global_step)
    if accelerator.is_main_process:
        (output_dir / "training_args.json").write_text(json.dumps(arguments, indent=2))
        tracker_config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in arguments.items()}
        accelerator.init_trackers("hf_ddpm", config=tracker_config)

    # ---- the loop
    progress = tqdm(
        total=max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process, desc="steps"
    )
    start_step, loop_start = global_step, time.time()  # images/s: of the loop (the budget's clock started earlier)
    train_log = None
    if accelerator.is_main_process:  # appended and flushed step by step; a resume drops the steps after its checkpoint
        train_log = TrainLog(output_dir / "train_log.jsonl", resume_step=global_step if resume_path else None)
    if late is not None:
        late.start(loop_start)
    epochs = itertools.count(first_epoch) if global_step < max_train_steps else ()  # a finished run trains no step
    for epoch in epochs:
        epoch_batches = batches.epoch(epoch, start=skip_batches)
        skip_batches = 0
        for clean in epoch_batches:
            step = global_step + 1  # the optimizer step this batch belongs to
            # the host reads the device back only where it logs or writes something: no wait per step elsewhere
            every = (train_args.checkpointing_steps, train_args.eval_steps, train_args.save_pipeline_steps or 0)
            saves = step >= max_train_steps or any(n and step % n == 0 for n in every)
            out, loss, grad_norm = train_step(clean)
            lr_scheduler.step()
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            if saves or global_step % train_args.logging_steps == 0:
                skipped_updates = skipped.check(global_step)  # stops after 10 skipped in a row
            if saves or global_step % FINITE_CHECK_STEPS == 0:  # non-finite weights stay so: no need for every step
                finite_guard.observe(unwrapped.parameters(), ema, global_step)
            progress.update(1)
            if global_step % train_args.logging_steps == 0 or global_step == max_train_steps:
                train_seconds = time.time() - start_time  # of this run, calibration included (a resume: from 0)
                images_per_second = (global_step - start_step) * global_batch / (time.time() - loop_start)
                # the mean over processes, the gradient norm and the objective's numbers in one read-back
                values = read_logs({"loss": accelerator.reduce(loss.detach(), "mean"), "grad_norm": grad_norm})
                logs = {
                    "loss": values.get("loss"),  # None where NaN: a skipped update
                    "lr": lr_scheduler.get_last_lr()[0],
                    "grad_norm": values.get("grad_norm"),
                    "images_per_second": images_per_second,
                    "train_seconds": train_seconds,
                    "skipped_updates": skipped_updates,
                }
                if ema is not None:
                    logs["ema_decay"] = ema.cur_decay_value
                logs.update(read_logs(out.logs))
                progress.set_postfix(loss=logs["loss"], img_s=round(images_per_second))
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
            if global_step % train_args.eval_steps == 0 and global_step < max_train_steps:
                evaluation_start = time.time()
                if accelerator.is_main_process:
                    bound, grid = evaluate_mid_run()
                    finite_guard.check_bound(bound, global_step)  # a NaN or inf held-out bound stops the run
                    if grid is not None:
                        log_sample_grid(accelerator, grid, global_step)
                    eval_logs = {"eval/bits_per_dim": bound.bits_per_dim, "eval/standard_error": bound.standard_error}
                    accelerator.log(eval_logs, step=global_step)
                    logger.info(
                        f"step {global_step}: held-out NLL {bound.bits_per_dim:.4f} ± {bound.standard_error:.4f} "
                        f"bits/dim ({bound.estimator})"
                    )
                if late is not None and late.decided_at is None:  # kept out of every process's pace (the others
                    late.evaluated(agree(time.time() - evaluation_start))  # wait for the main one) until decided
            if late is not None and late.decided_at is None:  # the steps re-estimated until the decay starts
                max_train_steps = late.observe(global_step, time.time())
                arguments["max_train_steps"] = progress.total = max_train_steps
                if late.decided_at is not None:
                    logger.info(late.describe())
                    if posthoc is not None:  # the snapshots after the decision spread over the steps decided
                        posthoc.snapshot_every = snapshot_every(max_train_steps)
            if guide is not None and guide.due(global_step, max_train_steps):  # of the steps planned so far
                with ema_weights(ema, unwrapped):
                    guide.take(unwrapped, global_step)
                logger.info(f"Kept the EMA weights of step {global_step} as the autoguidance guide (--guide_step).")
            if global_step >= max_train_steps:
                break
        if global_step >= max_train_steps:
            break
    progress.close()
    train_seconds = time.time() - start_time
    if budget is not None:  # a budgeted run (a resumed one has its steps from its checkpoint, no budget)
        decided_late = late is not None and bool(late.decided_at)  # not at step 0: a run too short to decide late
        logger.info(budget.outcome(train_seconds, global_step, decided_late=decided_late))
    if guide is not None and guide.weights is None:  # a --guide_step past the steps a budget decided
        logger.warning(f"The run ended at step {global_step}, before --guide_step: its pipeline samples unguided.")
        guide = None
    if guide is not None:  # the guide's step, as --guide_step gives it (a budgeted run's depends on its pace)
        arguments["guide_step"] = guide.step
    if (budget is not None and late is not None) or guide is not None:  # what repeats the run: steps decided, guide
        if accelerator.is_main_process:
            (output_dir / "training_args.json").write_text(json.dumps(arguments, indent=2))
    if posthoc is not None:
        posthoc.snapshot()  # the run's last step (a no-op where it was just saved)

    # ---- outputs: the EMA weights as a pipeline, the NLL, samples, plots, the card; then the Hub
    finite_guard.check(global_step)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final_weights, bound, posthoc_results = ema_weights(ema, unwrapped), None, None
        if posthoc is not None:  # the candidates' bounds are computed there: the chosen one's is not redone
            final_weights, bound, posthoc_results = best_posthoc_weights()
        with final_weights:
            pipeline = objective.pipeline(unwrapped)
            if guide is not None:
                pipeline = guide.guided_pipeline(pipeline, train_args.guidance_scale)
            bound = bound if bound is not None else held_out_bound()
            require_finite_bound(bound, "no pipeline, model card or eval_results.json was written")
            with fast_sampling(pipeline, train_args.num_sample_images * train_args.sample_steps):  # training is over
                grid = samples_of(pipeline)
            # the whole run's log (a resumed run's earlier steps too), and where the bound goes in time (diffusions)
            plots = {LOSS_CURVE_PATH: plot_loss_curve(read_train_log(output_dir / "train_log.jsonl"))}
            captions = {
                LOSS_CURVE_PATH: "Training loss against the optimizer step (the whole run, from train_log.jsonl)"
            }
            if has_time_axis(pipeline):  # DDPM and VDM; the VAE has none
                generator = torch.Generator().manual_seed(train_args.seed)
                plots[BOUND_BY_TIME_PATH] = plot_bound_by_time(
                    *pipeline.bound_by_time(held_out_images, generator=generator)
                )
                captions[BOUND_BY_TIME_PATH] = "Where the bits of the bound go: its terms along the diffusion's time"
            results = {
                "held_out": held_out_description,
                "nll": bound.to_dict(),
                "steps": global_step,
                "images_seen": global_step * global_batch,
                "train_seconds_this_run": train_seconds,
                "skipped_updates": int(skipped.total),
                "mixed_precision": mixed_precision,
                "num_processes": accelerator.num_processes,
                "threads_per_process": threads,
                "hardware": hardware_description(accelerator),
            }
            if posthoc_results is not None:
                results["posthoc_ema"] = posthoc_results
            limitations = []
            if guide is not None:
                results["autoguidance"] = {"guidance_scale": train_args.guidance_scale, "guide_step": guide.step}
                limitations.append(
                    f"Samples are autoguided by default (`guidance_scale={train_args.guidance_scale:g}`; "
                    f"`guide_unet`: the EMA weights of step {guide.step} of {global_step}); the likelihood bound is "
                    "the model's own (`unet`), not the guided sampler's. `guidance_scale=1` samples from the model "
                    "alone."
                )
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
                limitations=limitations,
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
