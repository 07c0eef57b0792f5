"""`LanguageModelCrosscoderTrainingRunner(cfg).run()`: dataset -> hooks -> store -> trainer -> model -> hub.

Also the seed's command line: `python -m hf_crosscoder.llm_crosscoder_training_runner --model_name ...`
(and `accelerate launch scripts/train.py ...`, the same code path on one or many processes).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast, set_seed
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .activations import ActivationsStore
from .checkpoints import (
    checkpoint_steps,
    load_checkpoint,
    read_checkpoint_meta,
    resolve_checkpoint,
    resume_request,
    save_checkpoint,
)
from .cli import print_metrics_table, reproduce_command, run_cli
from .config import LanguageModelCrosscoderRunnerConfig
from .dashboard import make_dashboard
from .diffing import LatentScaling, classify_latents, draw_diffing_plots, latent_scaling
from .evals import evaluate, feature_stats, json_metrics, scalar_metrics
from .hub import push_folder_to_hub, save_for_hub
from .metrics import FEATURE_STATS_FILE, density_log10
from .modeling import Crosscoder
from .naming import public_model_names, public_path, public_provenance
from .plots import draw_all
from .trainer import CrosscoderTrainer, StopTraining, install_signal_handlers

LOG_FILES = ("training_log.jsonl", "eval_log.jsonl")

__all__ = ["LanguageModelCrosscoderRunnerConfig", "LanguageModelCrosscoderTrainingRunner", "main"]


def make_accelerator(cfg: LanguageModelCrosscoderRunnerConfig) -> Accelerator:
    # the scheduler counts global steps, so it steps once per optimizer step on every process
    kwargs = dict(step_scheduler_with_optimizer=False, log_with="wandb" if cfg.log_to_wandb else None,
                  mixed_precision="bf16" if cfg.autocast else None)
    on_cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    if on_cpu and os.environ.get("ACCELERATE_USE_FSDP", "false") == "true":
        raise ValueError("FSDP needs GPUs: on CPU accelerate silently falls back to plain DDP. Launch with "
                         "accelerate_configs/cpu_2proc.yaml (DDP) or cpu_deepspeed_zero2.yaml instead.")
    if on_cpu:
        # cpu=True would turn a DeepSpeed launch into plain MULTI_CPU; DeepSpeed picks its CPU backend itself
        kwargs["cpu"] = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") != "true"
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched with several processes: gloo on CPU
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    if cfg.device is not None and cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device!r} but torch sees no CUDA device (torch.cuda.is_available() is "
                         "False); drop --device to train on CPU, or install a CUDA build of torch.")
    acc = Accelerator(**kwargs)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if acc.num_processes != launched:  # else every process would train alone and write the same output
        raise ValueError(f"{launched} processes were launched but accelerate set up {acc.num_processes} "
                         f"({acc.distributed_type.value}); use a config from accelerate_configs/ that matches "
                         "the machine (cpu_2proc.yaml on CPU, multi_gpu.yaml on GPUs).")
    return acc


class LanguageModelCrosscoderTrainingRunner:
    """Train a crosscoder on a transformers model's activations; `run()` returns the trained model with
    the activation normalization folded in (it works on raw activations, as saved in output_path)."""

    def __init__(self, cfg: LanguageModelCrosscoderRunnerConfig, override_model=None,
                 override_tokenizer=None) -> None:
        self.cfg = cfg
        self.override_model = override_model
        self.override_tokenizer = override_tokenizer
        self.output_path = Path(cfg.output_path)
        self.checkpoint_root = Path(cfg.checkpoint_path or self.output_path / "checkpoints")

    # ------------------------------------------------------------------ checks before expensive work
    def _check_output_path(self) -> None:
        cfg = self.cfg
        resuming = resume_request(cfg.resume_from_checkpoint) is not None
        if self.output_path.exists() and not self.output_path.is_dir():
            raise ValueError(f"output_path {self.output_path} is a file; choose a directory.")
        existing = [p.name for p in self.output_path.iterdir()] if self.output_path.is_dir() else []
        if existing and existing != ["checkpoints"] and not (resuming or cfg.overwrite_output):
            raise ValueError(f"output_path {self.output_path} is not empty ({', '.join(sorted(existing)[:5])}); "
                             "choose a new output_path, pass --overwrite_output, or --resume_from_checkpoint latest.")
        # writable, checked without creating anything: a run that fails its checks leaves no empty folder
        ancestor = next(p for p in (self.output_path.absolute(), *self.output_path.absolute().parents) if p.exists())
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise ValueError(f"output_path {self.output_path} is not writable (no write permission in "
                             f"{ancestor}); choose another.")

    def _prepare_logs(self, meta: dict | None) -> None:
        """Create output_path (only now that the model, data and checkpoint passed their checks). A resumed
        run drops the interrupted run's rows after its checkpoint; a fresh run over an old output
        (overwrite_output) starts new logs and plots."""
        self.output_path.mkdir(parents=True, exist_ok=True)
        if meta is not None:
            _drop_logged_steps_after(self.output_path, meta["step"])
        elif self.cfg.overwrite_output:
            for path in [*self.output_path.glob("*.png"), *(self.output_path / n for n in LOG_FILES)]:
                path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ run
    def run(self) -> Crosscoder:
        cfg = self.cfg
        self._started = time.perf_counter()
        resume = resolve_checkpoint(cfg.resume_from_checkpoint, self.checkpoint_root)
        acc = make_accelerator(cfg)
        # refused here, before the language model loads, if written by another number of processes
        meta = read_checkpoint_meta(resume, acc.num_processes, cfg) if resume is not None else None
        if acc.is_main_process:
            self._check_output_path()
        acc.wait_for_everyone()
        set_seed(cfg.seed)
        with _phase(acc, "loading the model and opening the dataset"):
            store = ActivationsStore(cfg, self.override_model, self.override_tokenizer, device=acc.device)
        crosscoder = Crosscoder(cfg.crosscoder_config(**self._provenance(store)))
        if resume is None:  # (a checkpoint's store holds its scales and buffer)
            with _phase(acc, "estimating activation norms and filling the shuffle buffer"):
                store.estimate_norm_scaling()
        if resume is None and cfg.b_dec_init_method == "mean":  # (a checkpoint holds b_dec and the buffer)
            with torch.no_grad():
                crosscoder.b_dec.copy_(store.mean_out())
        trainer = CrosscoderTrainer(cfg.trainer_args(), crosscoder, acc, total_steps=cfg.total_training_steps)
        if resume is not None:  # before touching the scales: the checkpoint's store holds them
            load_checkpoint(resume, trainer, store, meta)
        if acc.is_main_process:  # only now that the model, data and checkpoint passed their checks
            self._prepare_logs(meta)
        # provenance of the training-space model in checkpoints (estimates the scales if not resumed)
        crosscoder.config.activation_scale_in = store.scale_in.tolist()
        crosscoder.config.activation_scale_out = store.scale_out.tolist()
        self._init_logging(acc)
        steps = checkpoint_steps(trainer.total_steps, cfg.n_checkpoints)
        restore_signals = install_signal_handlers(trainer)
        # smoothing=0: rate and ETA averaged over the whole run, so a buffer refill does not make them jump
        bar = tqdm(total=trainer.total_steps * cfg.train_batch_size_tokens, initial=trainer.state.n_tokens,
                   unit="tok", unit_scale=True, disable=not acc.is_main_process, desc="training", smoothing=0)
        bar.harvest_start = (store.harvest_seconds, store.harvested_rows, time.perf_counter(), trainer.state.n_tokens)
        try:
            trainer.train(iter(store), log_fn=lambda s, m: self._log(acc, s, m, "training_log.jsonl"),
                          eval_fn=lambda s: self._eval(trainer, store, s),
                          checkpoint_fn=lambda s: self._checkpoint(trainer, store),
                          checkpoint_steps=steps, progress=lambda st, m: _progress(bar, store, st, m))
        except StopTraining as stop:
            path = save_checkpoint(self.checkpoint_root, trainer, store)
            acc.end_training()
            raise SystemExit(f"Stopped by {stop} at step {trainer.state.step}; checkpoint written to {path}. "
                             f"Resume with --resume_from_checkpoint {path} (same flags).") from None
        finally:
            restore_signals()
            bar.close()
        return self._finish(trainer, store)

    def _provenance(self, store) -> dict:
        """What config.json records the crosscoder was trained on: an activation cache's own model, data and
        context size when training from one, named publicly (Hub ids, never machine paths)."""
        cfg, cached = self.cfg, store.provenance
        source = {"model_name": cfg.model_name, "dataset_path": cfg.dataset_path, **cached}
        names = {"model_names": public_model_names(cfg.model_names, cfg.base_model_id)}
        return {**cached, **public_provenance(source["model_name"], source["dataset_path"], cfg.base_model_id),
                **names}

    def _public_config(self, crosscoder: Crosscoder) -> LanguageModelCrosscoderRunnerConfig:
        """The run's config as the model card shows it (reproduce command, full configuration): the model
        and data by their public names, the run's own folders by their names, no resume."""
        c, cfg = crosscoder.config, self.cfg
        model_name = c.model_names[0] if c.model_names else c.model_name  # (model_name reads as model_names[0])
        return dataclasses.replace(cfg, model_name=model_name, model_names=c.model_names, dataset_path=c.dataset_path,
                                   output_path=public_path(cfg.output_path),
                                   checkpoint_path=public_path(cfg.checkpoint_path),
                                   cached_activations_path=public_path(cfg.cached_activations_path),
                                   resume_from_checkpoint=None, overwrite_output=False)

    def _checkpoint(self, trainer: CrosscoderTrainer, store) -> None:
        path = save_checkpoint(self.checkpoint_root, trainer, store)
        if self.cfg.push_to_hub and self.cfg.hub_strategy == "checkpoint" and trainer.accelerator.is_main_process:
            push_folder_to_hub(path, self.cfg.hf_repo_id, private=self.cfg.hub_private,
                               subfolder=f"checkpoints/{path.name}")

    # ------------------------------------------------------------------ logging and evals
    def _init_logging(self, acc: Accelerator) -> None:
        cfg = self.cfg
        if cfg.log_to_wandb:
            name = cfg.run_name or f"{cfg.architecture}-{cfg.d_sae}-{'+'.join(cfg.hook_names_in)}"
            acc.init_trackers(cfg.wandb_project, config=dataclasses.asdict(cfg),
                              init_kwargs={"wandb": {"entity": cfg.wandb_entity, "name": name,
                                                     "dir": str(self.output_path)}})

    def _log(self, acc: Accelerator, step: int, metrics: dict, filename: str) -> None:
        if acc.is_main_process:
            with open(self.output_path / filename, "a") as f:
                # wall time lets throughput be read off the log (since this process's run() began)
                elapsed = round(time.perf_counter() - self._started, 3)
                f.write(json.dumps({"step": step, "elapsed_s": elapsed, **scalar_metrics(metrics)}) + "\n")
        if self.cfg.log_to_wandb:
            acc.log(_for_wandb(metrics), step=step)

    def _eval(self, trainer: CrosscoderTrainer, store, step: int, final: bool = False) -> dict:
        # the weight-based max-cosine searches (O(d_sae^2 d)) only in the final evaluation
        metrics = evaluate(trainer.crosscoder, store, self.cfg.n_eval_batches, trainer.accelerator,
                           weight_metrics=final)
        self._log(trainer.accelerator, step, {f"eval/{k}": v for k, v in metrics.items()}, "eval_log.jsonl")
        return metrics

    # ------------------------------------------------------------------ final output
    def _finish(self, trainer: CrosscoderTrainer, store) -> Crosscoder:
        acc = trainer.accelerator
        metrics = self._eval(trainer, store, trainer.state.step, final=True)
        metrics["num_processes"] = acc.num_processes
        metrics["distributed_type"] = acc.distributed_type.value
        final = consolidated_crosscoder(trainer)
        final.fold_activation_norm_scaling(store.scale_in, store.scale_out)
        scaling = None
        if self.cfg.model_names:  # model diffing: latent classes, and Latent Scaling on fresh tokens
            metrics.update({f"diff_latents/{k}": v for k, v in classify_latents(final).counts.items()})
            scaling = latent_scaling(final, _raw_eval_batches(store, self.cfg.n_eval_batches))
        if acc.is_main_process:
            self._write_outputs(final, metrics, store, scaling)
        acc.wait_for_everyone()
        acc.end_training()
        return final

    def _write_outputs(self, final: Crosscoder, metrics: dict, store, scaling: LatentScaling | None = None) -> None:
        cfg, out = self.cfg, self.output_path
        (out / "runner_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        # numbers or null in metrics.json; the per-latent statistics in feature_stats.safetensors
        (out / "metrics.json").write_text(json.dumps(json_metrics(metrics), indent=1))
        save_file(feature_stats(metrics), str(out / FEATURE_STATS_FILE))
        _draw_plots(out, final, scaling)
        public = self._public_config(final)
        save_for_hub(final, out, metrics=scalar_metrics(metrics), run_config=dataclasses.asdict(public),
                     command=reproduce_command(public))
        if cfg.dashboard:  # the saved (folded) crosscoder on the frozen model already loaded
            make_dashboard(out, crosscoder=final, model=store.model, tokenizer=store.tokenizer,
                           n_tokens=cfg.dashboard_tokens, device=str(final.W_dec.device))
        if cfg.push_to_hub:
            push_folder_to_hub(out, cfg.hf_repo_id, private=cfg.hub_private)


def consolidated_crosscoder(trainer: CrosscoderTrainer) -> Crosscoder:
    """A plain copy of the trained crosscoder with full tensors, also when FSDP or ZeRO-3 shard them
    (every process must call this: gathering the state dict is collective)."""
    acc = trainer.accelerator
    state = acc.get_state_dict(trainer.model)
    final = Crosscoder(copy.deepcopy(trainer.crosscoder.config)).to(acc.device)
    if state:  # ZeRO-3 gathers onto the main process only; the others get it by broadcast below
        final.load_state_dict(state)
    if acc.num_processes > 1:  # every process runs the final eval on the same weights
        broadcast(list(final.state_dict().values()), from_process=0)
    return final.eval()


def _drop_logged_steps_after(out: Path, step: int) -> None:
    """A resumed run logs the steps after its checkpoint again: drop the interrupted run's rows for them,
    so each log holds every step once."""
    for path in (out / name for name in LOG_FILES):
        if path.is_file():
            rows = path.read_text().splitlines()
            kept = [row for row in rows if json.loads(row)["step"] <= step]
            if len(kept) < len(rows):
                path.write_text("".join(row + "\n" for row in kept))


def _draw_plots(out: Path, crosscoder: Crosscoder, scaling: LatentScaling | None = None) -> None:
    try:
        import matplotlib  # noqa: F401  (an extra: training output is complete without plots)
    except ImportError:
        return
    draw_all(out, crosscoder)
    draw_diffing_plots(out, crosscoder, scaling)


def _raw_eval_batches(store, n_batches: int):
    """(acts_in, acts_out) of the held-out eval tokens in raw scale (what a folded crosscoder takes), the
    positions training uses; from an activation cache (no model, no tokens), the next rows of its stream."""
    store.reset_eval_tokens()
    for _ in range(n_batches):
        if store.serves_tokens:
            acts_in, acts_out, keep = store.activations_from_tokens(store.next_eval_tokens())
            acts_in, acts_out = acts_in[keep], acts_out[keep]
        else:
            acts_in, acts_out = store.next_batch()
        yield acts_in / store.scale_in[:, None], acts_out / store.scale_out[:, None]


@contextmanager
def _phase(acc: Accelerator, what: str) -> Iterator[None]:
    """A setup phase on the main process's stderr: what it does while it runs (on a terminal; erased if it
    fails, so that a user error stays one line), then how long it took."""
    t0, live = time.perf_counter(), acc.is_main_process and sys.stderr.isatty()
    if live:
        print(f"{what} ...", end="", file=sys.stderr, flush=True)
    try:
        yield
    except BaseException:
        if live:
            print("\r\033[K", end="", file=sys.stderr, flush=True)
        raise
    if acc.is_main_process:
        back = "\r" if live else ""  # over the live line
        print(f"{back}{what}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def _progress(bar, store, st, metrics: dict | None) -> None:
    bar.update(st.n_tokens - bar.n)
    if metrics is not None:
        fvu = [v for k, v in metrics.items() if k.startswith("fvu/")]
        # since the bar started: harvest = rows harvested per second of harvesting (all processes), train =
        # tokens trained per second of everything else (the step, evals, checkpoints)
        h0, rows0, t0, n0 = bar.harvest_start
        harvest_s = store.harvest_seconds - h0
        rows = (store.harvested_rows - rows0) * store.num_processes
        train_s = max(time.perf_counter() - t0 - harvest_s, 1e-9)
        bar.set_postfix(loss=f"{metrics['loss']:.4g}", l0=f"{metrics['l0']:.1f}",
                        fvu=f"{sum(fvu) / max(len(fvu), 1):.3f}",
                        harvest=f"{rows / harvest_s:.3g} tok/s" if harvest_s > 0 else "-",
                        train=f"{(st.n_tokens - n0) / train_s:.3g} tok/s", refresh=False)


def _for_wandb(metrics: dict) -> dict:
    out = scalar_metrics(metrics)
    for key, value in metrics.items():
        if key.endswith("feature_density"):
            import wandb

            out[key + "_log10"] = wandb.Histogram(density_log10(value).tolist())
    return out


def main(argv: list[str] | None = None) -> Crosscoder:
    """The seed's command line. A user error (any ValueError or OSError of the checks, e.g. a wrong
    --d_model or a missing dataset) prints one line `error: ...` and exits with status 2; `--debug` shows
    the traceback instead."""
    def train(cfg: LanguageModelCrosscoderRunnerConfig) -> Crosscoder:
        crosscoder = LanguageModelCrosscoderTrainingRunner(cfg).run()
        metrics_file = Path(cfg.output_path) / "metrics.json"
        if metrics_file.exists():
            print_metrics_table(json.loads(metrics_file.read_text()))
        return crosscoder

    return run_cli(LanguageModelCrosscoderRunnerConfig, train, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
