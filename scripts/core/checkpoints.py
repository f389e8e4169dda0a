# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""Checkpoints: atomic writes, ``weights_only`` loads, and resume-on-rerun for every stage.

MONAI's ``CheckpointSaver`` writes in place (``atomic=False``), so a run killed while saving can
leave a truncated file behind that the next run would try to resume from. Here every write goes
to a temporary file in the same folder and is renamed over the target, which the OS does
atomically. Loading for resume reuses MONAI's ``CheckpointLoader`` (``weights_only=True``).
"""

from __future__ import annotations

import atexit
import glob
import hashlib
import logging
import math
import os
import pickle
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.handlers import CheckpointLoader

from scripts.core.errors import BundleInputError, EngineErrorsAsOneLine
from scripts.core.outputs import BUNDLE_ROOT, atomic_path, check_folder_path, pid_alive

__all__ = [
    "unwrap",
    "save_atomic",
    "file_hash",
    "listed_sha256",
    "weights_match",
    "load_checkpoint",
    "load_network_weights",
    "training_folder",
    "FolderBusyError",
    "TrainingLock",
    "StageCheckpointer",
    "split_key_metric",
    "export_weights",
]

#: The bundle's list of weight files with their sha256 (model-zoo ``large_files.yml``).
LARGE_FILES = os.path.join(BUNDLE_ROOT, "large_files.yml")

logger = logging.getLogger(__name__)


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The bare network inside a ``DistributedDataParallel`` wrapper (or the network itself)."""
    return network.module if hasattr(network, "module") else network


def save_atomic(obj: Any, path: str) -> str:
    """``torch.save`` to ``path`` through a temporary sibling file and an atomic rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint to resume from
    return path


def file_hash(path: str, hash_type: str = "sha256") -> str:
    """Hex digest of a file's bytes (``hash_type``: a ``hashlib`` name, e.g. sha256, md5); the one
    place the bundle hashes a file (weights against ``large_files.yml``, the release, FID weights)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, hash_type).hexdigest()


def listed_sha256(path: str, large_files: str | None = None) -> str | None:
    """The sha256 that ``large_files`` (default: the bundle's ``large_files.yml``) lists for ``path``.

    None when the file is not listed.
    """
    large_files = LARGE_FILES if large_files is None else large_files
    if not os.path.isfile(large_files):
        return None
    import yaml  # a MONAI bundle dependency; imported here as only this check needs it

    with open(large_files) as f:
        entries = (yaml.safe_load(f) or {}).get("large_files") or []
    root = os.path.dirname(os.path.abspath(large_files))
    target = os.path.realpath(path)
    for entry in entries:
        if (
            os.path.realpath(os.path.join(root, entry["path"])) == target
            and entry.get("hash_type", "sha256") == "sha256"
        ):
            return str(entry["hash_val"]).lower()
    return None


def load_checkpoint(path: str, what: str = "checkpoint", hint: str = "") -> dict[str, Any]:
    """Load a checkpoint dict with ``weights_only=True``; one-line errors name the file.

    A file listed in the bundle's ``large_files.yml`` (the shipped weights) must have the listed
    sha256: a truncated download or a replaced file stops here instead of producing wrong images.
    """
    if not os.path.isfile(path):
        raise BundleInputError(f"{path}: {what} not found" + (f"; {hint}" if hint else ""))
    expected = listed_sha256(path)
    if expected is not None and file_hash(path) != expected:
        raise BundleInputError(
            f"{path}: {what} do not match the sha256 listed in large_files.yml (damaged or replaced file); "
            "restore it, e.g. with git checkout or python -m monai.bundle download_large_files --bundle_path ."
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's advice to load it with weights_only=False is not taken here
        raise BundleInputError(
            f"{path}: {what} holds Python objects besides tensors and plain values; the bundle refuses to "
            "unpickle such a file (unpickling can run code)"
        ) from e
    except Exception as e:  # zip and format errors mean "not a usable checkpoint"
        raise BundleInputError(f"{path}: cannot load {what} ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    if not isinstance(checkpoint, dict):
        raise BundleInputError(f"{path}: {what} is not a dict of state dicts")
    return checkpoint


def load_network_weights(network: torch.nn.Module, path: str, key: str, what: str, hint: str = "") -> dict[str, Any]:
    """Load ``checkpoint[key]`` into ``network`` strictly; a mismatch is one line naming the file.

    Returns the whole checkpoint so callers can read extra entries (``scale_factor``, ...).
    """
    checkpoint = load_checkpoint(path, what, hint)
    state = checkpoint.get(key, checkpoint)
    target = unwrap(network)
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise BundleInputError(
            f"{path}: {what} does not fit the configured network ({detail[:300]}{'...' if len(detail) > 300 else ''})"
        ) from e
    return checkpoint


def weights_sha256(checkpoint: Mapping[str, Any], key: str | None = None) -> str:
    """SHA-256 of network weights (names, dtypes, shapes, values): the identity later stages record.

    ``checkpoint[key]`` is hashed, or ``checkpoint`` itself when it has no ``key`` (a bare state
    dict, as :func:`load_network_weights` accepts). The weights are hashed, not the file: the same
    weights re-saved with other entries (``export_weights``, a later epoch's optimizer state) keep
    their identity, while any changed value changes it.
    """
    state = checkpoint.get(key, checkpoint) if key is not None else checkpoint
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = torch.as_tensor(state[name]).detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def weights_match(recorded_sha256: str, checkpoint: Mapping[str, Any], key: str | None = None) -> bool:
    """Whether ``checkpoint[key]`` are the weights ``recorded_sha256`` identifies, in their precision or
    cast to float16 or float32: the shipped float16 files converted to float32 are still the same weights."""
    if weights_sha256(checkpoint, key) == recorded_sha256:
        return True
    state = checkpoint.get(key, checkpoint) if key is not None else checkpoint
    for dtype in (torch.float16, torch.float32):
        cast = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in state.items()}
        if weights_sha256(cast) == recorded_sha256:
            return True
    return False


def resume_value(path: str, key: str, default: Any) -> Any:
    """``checkpoint[key]`` of the checkpoint a re-run will resume from (``path``), else ``default``.

    For values fixed when a run starts that must survive a resume, such as the latent
    ``scale_factor``: the networks were trained with the stored value, not with a recomputed one.
    """
    if not os.path.isfile(path):
        return default
    checkpoint = load_checkpoint(path, "checkpoint")
    value = checkpoint.get(key, default)
    if value != default:
        logger.info(f"{key} {value!r} restored from {path} (this run alone would use {default!r})")
    return value


def _reapply_lambda(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set the optimizer's rates from the schedule as configured now, at the restored epoch.

    The optimizer state restores the rate of the epoch the run stopped at; when a re-run stretches
    the schedule (a larger ``max_epochs`` in the lambda), the next epoch must use the new curve,
    not that rate (0 at the end of a finished run). For an interrupted run the two agree.
    """
    for group, base_lr, factor in zip(
        scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
    ):
        group["lr"] = base_lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def training_folder(save_dir: str) -> str:
    """``save_dir`` made ready for a training's checkpoints; one line when it cannot be one."""
    if str(save_dir).startswith("~"):
        raise BundleInputError(
            f"{save_dir}: '~' is not expanded here and would become a folder named '~'; give the full --output_dir"
        )
    check_folder_path(save_dir)  # the folder, or one above it, being a file is one line
    os.makedirs(save_dir, exist_ok=True)
    return save_dir


class FolderBusyError(BundleInputError):
    """Another live process holds the folder's lock (:class:`TrainingLock`)."""


class TrainingLock:
    """One training per checkpoint folder: ``.training.lock`` in it holds the writing process's id.

    A second process that would write the same checkpoints is refused with one line
    (:class:`FolderBusyError`); a lock whose process has ended (killed, power loss) is taken over,
    and so is one of this very process (the training configs take it first in ``initialize``,
    before any cache is built, and the checkpointer takes it again; runs started one after another
    in one Python session). ``lock_name`` and ``busy`` (with ``{pid}``) let other owners of a
    folder use the same mechanism, e.g. one augmentation-study process per grid cell.
    """

    def __init__(
        self,
        save_dir: str,
        lock_name: str = ".training.lock",
        busy: str = "another training (process {pid}) is writing checkpoints here now; "
        "wait for it to end or pass another --output_dir",
    ) -> None:
        self.created = not os.path.isdir(save_dir)  # removed again at release if nothing was written into it
        training_folder(save_dir)
        self.path = os.path.join(save_dir, lock_name)
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and holder != os.getpid() and pid_alive(holder):
                    raise FolderBusyError(f"{save_dir}: {busy.format(pid=holder)}") from None
                self._remove()  # left by an ended run, or by this process
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            atexit.register(self.release)  # also when the command fails: the next run need not check the pid
            return

    def _holder(self) -> int | None:
        try:
            with open(self.path) as f:
                return int(f.read().strip() or -1)
        except (OSError, ValueError):
            return None

    def _remove(self) -> None:
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass

    def release(self, *_: Any) -> None:
        """Remove the lock if this process still holds it, and the folder if the lock made it and it stayed empty."""
        if self._holder() == os.getpid():
            self._remove()
            folder = os.path.dirname(self.path)
            if self.created and os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)


class StageCheckpointer:
    """Ignite handler keeping ``<stage>_last.pt`` (every epoch) and ``<stage>_best.pt`` (on improvement).

    Attach it to the trainer. When ``<stage>_last.pt`` exists as training starts, every object of
    ``save_dict`` (trainer included: epoch and iteration counters) is restored from it, so
    re-running an interrupted command continues where it stopped; a larger ``max_epochs`` on the
    command line extends a finished run. ``evaluator`` (optional) supplies the key metric. A kill
    mid-epoch loses at most that epoch: attach this handler after the validation handler so
    ``last`` holds the epoch's validation result too.

    As the one owner of a training's output folder it also refuses what would lose or mix up
    checkpoints, each with one line before training starts: a folder that is a file or spelled
    with ``~``, a second training writing the same checkpoints at once (:class:`TrainingLock`), a
    file in the checkpoint slot that is not this stage's checkpoint or does not fit the configured
    networks; it removes temporary files of saves that were killed midway. While training it stops
    at the first non-finite loss (nothing of that epoch is saved, so no NaN weights become ``last``
    or ``best``), and a failure inside the engines is reported as one line, without the engine's
    traceback.

    Args:
        save_dir: folder of the checkpoints.
        stage: file prefix, e.g. ``"autoencoder"``.
        save_dict: name -> object with ``state_dict``/``load_state_dict`` (networks, optimizers,
            schedulers); the trainer it is attached to is added as ``trainer``.
        evaluator: the validation engine whose ``state.best_metric`` decides ``best``.
        extra: plain values stored alongside (``scale_factor``, the network config, ...).
        is_main_process: only the main process writes (distributed training).
        must_match: keys of ``extra`` that a checkpoint being resumed must hold with the same value
            (the noise schedule, the identity of frozen weights, ...); a difference stops the command
            before training with one line, instead of silently mixing two incompatible runs.
        keep_epochs: after these epochs also keep ``<stage>_epoch<N>.pt``, a copy of ``last`` that later
            epochs do not replace (e.g. the earlier stage-2 UNet that guides sampling, autoguidance).
    """

    def __init__(
        self,
        save_dir: str,
        stage: str,
        save_dict: Mapping[str, Any],
        evaluator: Any | None = None,
        extra: Mapping[str, Any] | None = None,
        is_main_process: bool = True,
        must_match: Sequence[str] = (),
        keep_epochs: Sequence[int] = (),
    ) -> None:
        self.save_dir = training_folder(save_dir)
        self.keep_epochs = {int(e) for e in keep_epochs}
        self.stage = stage
        self.save_dict = dict(save_dict)
        self.evaluator = evaluator
        self.extra = dict(extra or {})
        self.is_main_process = is_main_process
        self.last_path = os.path.join(save_dir, f"{stage}_last.pt")
        self.best_path = os.path.join(save_dir, f"{stage}_best.pt")
        self.lock = TrainingLock(save_dir) if is_main_process else None
        if is_main_process:  # saves killed midway (atomic_path's temporaries); no other writer holds them now
            for path in (self.last_path, self.best_path):
                pattern = os.path.join(glob.escape(save_dir), f".{glob.escape(os.path.basename(path))}.*.tmp")
                for leftover in glob.glob(pattern):
                    os.remove(leftover)
                    logger.warning(f"removed {leftover}, left by a checkpoint save that was killed")
        # read a leftover checkpoint now, so a damaged or foreign one stops the command before training starts
        self._resume_from = (
            load_checkpoint(self.last_path, f"{stage} checkpoint") if os.path.isfile(self.last_path) else None
        )
        if self._resume_from is not None:
            self._check_resumable(must_match)
            self._check_holds_this_stage()

    def _check_holds_this_stage(self) -> None:
        """The checkpoint being resumed has an entry for every saved object, and the networks' weights fit."""
        restart = "move it away or pass another --output_dir to start afresh"
        missing = [name for name in self.save_dict if name not in self._resume_from]
        if missing:
            raise BundleInputError(
                f"{self.last_path}: not a checkpoint of this {self.stage} configuration (no {missing[0]!r} entry); "
                + restart
            )
        for name, obj in self.save_dict.items():
            if not isinstance(obj, torch.nn.Module):
                continue
            expected = {k: tuple(v.shape) for k, v in unwrap(obj).state_dict().items()}
            saved = self._resume_from[name]
            found = {k: tuple(v.shape) for k, v in saved.items()} if isinstance(saved, Mapping) else {}
            if found != expected:
                differ = sorted(set(found) ^ set(expected)) or [k for k in expected if found[k] != expected[k]]
                raise BundleInputError(
                    f"{self.last_path}: cannot resume, its {name} weights do not fit the configured network "
                    f"(other sizes or kind, e.g. label_guided_decoder changed; first difference: {differ[0]}); "
                    + restart
                )

    def _check_resumable(self, must_match: Sequence[str]) -> None:
        for key in must_match:
            if key not in self.extra or key not in self._resume_from:  # older checkpoints may lack a key
                continue
            old, new = self._resume_from[key], self.extra[key]
            if old != new:
                raise BundleInputError(
                    f"{self.last_path}: cannot resume, it was saved with {key} {old!r} but this run has {new!r}; "
                    "pass another --output_dir to start afresh (or restore the original setting)"
                )

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        self.save_dict["trainer"] = engine
        for watched in (engine, self.evaluator):
            if watched is not None:  # before the loggers attach theirs
                EngineErrorsAsOneLine().attach(watched)
        engine.add_event_handler(Events.STARTED, self.resume)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.check_finite_loss)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save_last)
        if self.lock is not None:
            engine.add_event_handler(Events.COMPLETED, self.lock.release)
        if self.evaluator is not None:
            self.evaluator.add_event_handler(Events.COMPLETED, lambda _: self.save_best(engine))

    def check_finite_loss(self, engine: Any) -> None:
        """Stop at the first non-finite training loss, before the epoch ends and anything is saved."""
        output = engine.state.output
        output = output[0] if isinstance(output, Sequence) and output and isinstance(output[0], Mapping) else output
        loss = output.get("loss") if isinstance(output, Mapping) else output
        if loss is None:
            return
        value = float(torch.as_tensor(loss).detach().float().sum())
        if not math.isfinite(value):
            kept = f"{self.last_path} keeps the previous epoch" if os.path.isfile(self.last_path) else "nothing saved"
            raise BundleInputError(
                f"{self.stage} training: the loss became {value} at epoch {engine.state.epoch}, iteration "
                f"{engine.state.iteration} ({kept}); lower the learning rate (--lr) or check the data"
            )

    def _payload(self, engine: Any) -> dict[str, Any]:
        # bare weights, loadable without DDP
        payload = {name: unwrap(obj).state_dict() for name, obj in self.save_dict.items()}
        payload.update(self.extra)
        payload["epoch"] = int(engine.state.epoch)
        payload["iteration"] = int(engine.state.iteration)
        if self.evaluator is not None:
            payload["best_metric"] = float(self.evaluator.state.best_metric)
            payload["best_metric_epoch"] = int(self.evaluator.state.best_metric_epoch)
            payload["best_metric_name"] = self.evaluator.state.key_metric_name
        return payload

    def resume(self, engine: Any) -> None:
        checkpoint = self._resume_from
        if checkpoint is None:
            return
        max_epochs = engine.state.max_epochs
        loadable = {k: unwrap(v) for k, v in self.save_dict.items()}
        # MONAI's loader restores every object, trainer counters included, with weights_only=True.
        try:
            CheckpointLoader(load_path=self.last_path, load_dict=loadable, map_location="cpu")(engine)
        except (RuntimeError, ValueError, KeyError) as e:  # e.g. an optimizer state of other parameter groups
            detail = " ".join(str(e).split())[:200]
            raise BundleInputError(
                f"{self.last_path}: cannot resume from it ({detail}); move it away or pass another --output_dir"
            ) from e
        engine.state.max_epochs = max(max_epochs, engine.state.epoch)
        for obj in loadable.values():
            if isinstance(obj, torch.optim.lr_scheduler.LambdaLR):
                _reapply_lambda(obj)
        if self.evaluator is not None and "best_metric" in checkpoint:
            key_metric = self.evaluator.state.key_metric_name
            # a best chosen by another metric is not comparable: the next validation starts a new best
            if checkpoint.get("best_metric_name", key_metric) == key_metric:
                self.evaluator.state.best_metric = checkpoint["best_metric"]
                self.evaluator.state.best_metric_epoch = checkpoint["best_metric_epoch"]
            else:
                logger.info(
                    f"{self.best_path} was chosen by {checkpoint['best_metric_name']}; this run chooses by "
                    f"{key_metric}, so the next validation replaces it"
                )
        logger.info(
            f"resumed {self.stage} from {self.last_path} at epoch {engine.state.epoch}, "
            f"iteration {engine.state.iteration}"
        )

    def epoch_path(self, epoch: int) -> str:
        """Where the copy kept after ``epoch`` (``keep_epochs``) goes."""
        return os.path.join(self.save_dir, f"{self.stage}_epoch{int(epoch)}.pt")

    def save_last(self, engine: Any) -> None:
        if self.is_main_process:
            payload = self._payload(engine)
            save_atomic(payload, self.last_path)
            if engine.state.epoch in self.keep_epochs:
                save_atomic(payload, self.epoch_path(engine.state.epoch))
                logger.info(f"kept {self.epoch_path(engine.state.epoch)}")

    def save_best(self, engine: Any) -> None:
        state = self.evaluator.state
        if self.is_main_process and state.best_metric_epoch == engine.state.epoch:
            save_atomic(self._payload(engine), self.best_path)
            logger.info(f"new best {self.stage} ({state.best_metric:.4f}) saved to {self.best_path}")


def split_key_metric(metrics: Mapping[str, Any], key_metric: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split validation metric handlers into the one that picks the best checkpoint and the rest.

    ``SupervisedEvaluator`` takes the two as ``key_val_metric`` and ``additional_metrics``; a
    config that declares its metrics once and names the deciding one in a setting (``key_metric``)
    passes them through this. Every metric is computed and logged either way.
    """
    if key_metric not in metrics:
        raise BundleInputError(f"config 'key_metric': {key_metric!r} is not a validation metric ({sorted(metrics)})")
    return {key_metric: metrics[key_metric]}, {k: v for k, v in metrics.items() if k != key_metric}


def export_weights(
    checkpoint_path: str, output_path: str, key: str, overwrite: bool = False, dtype: str | None = None, **info: Any
) -> str:
    """Write the bare ``key`` weights of a training checkpoint (no optimizer state) for shipping.

    The result is ``{key: state_dict, "source_epoch": ..., <recorded entries>, **info}``, loadable
    by :func:`load_network_weights` exactly like the training checkpoint it came from; ``info``
    overrides recorded entries. ``dtype="float16"`` halves the file (floating tensors only; they
    are cast back to the network's type when loaded). Its weights then have a new identity
    (:func:`weights_sha256`): record that one in what is trained on top of them.
    """
    checkpoint = load_checkpoint(checkpoint_path, "checkpoint")
    if key not in checkpoint:
        raise BundleInputError(f"{checkpoint_path}: has no {key!r} weights (keys: {sorted(checkpoint)})")
    if os.path.exists(output_path) and not overwrite:
        raise BundleInputError(f"{output_path}: exists; pass overwrite=True to replace it")
    state = checkpoint[key]
    if dtype is not None:
        cast = getattr(torch, dtype)
        state = {name: t.to(cast) if t.is_floating_point() else t for name, t in state.items()}
    exported = {key: state, "source_epoch": checkpoint.get("epoch")}
    for extra in (
        "best_metric",
        "best_metric_epoch",
        "best_metric_name",
        "scale_factor",
        "latent_shift",
        "noise_schedule",
        "prediction_type",
        "latent_channel_std",
        "latent_channels",
        "latent_space_sha256",
        "autoencoder_sha256",
        "diffusion_unet_sha256",
        "labels",
    ):  # what later stages check
        if extra in checkpoint:
            exported[extra] = checkpoint[extra]
    exported.update(info)
    return save_atomic(exported, output_path)
