# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""The recipe of the demo weights: from the phantom generator to ``models/`` in one command.

``python -m scripts.tools.demo_weights --work_dir runs/demo_weights`` (from the bundle root) runs, in order:

1. ``data``: 300 phantoms of seed 1000 (configs/demo_data.yaml);
2. ``autoencoder``: stage 1 on the model grid (common.yaml's 5 x 5 x 4 mm), the plain autoencoder;
3. ``label_guided``: its label-guided (SPADE) decoder, the encoder frozen (every latent unchanged), on crops; then
   ``label_guided_whole``: one epoch on whole volumes (GroupNorm statistics depend on the extent a network sees:
   after crops alone, whole volumes decoded 1.5 dB worse and darker, measured on stage 1 at 2.5 mm);
4. ``diffusion``: stage 2 on the plain encoder's latents, keeping an earlier epoch as the autoguidance guide;
5. ``controlnet``: stage 3 beside the exported stage-2 UNet;
6. ``refining``: the label-guided decoder given one more level (``decoder_upsampling`` 1), trained on the 2x finer
   grid (2.5 x 2.5 x 2 mm, about the phantoms' own resolution) over the same frozen encoder: generation samples on
   the model grid and decodes at the data's resolution, with the mask read there;
7. ``clean_data``: the same 300 phantoms without their Rician noise (``phantom#noise_sigma_range`` [0, 0]: same
   anatomy, bias field and grids), and ``refining_clean``: the refining decoder fine-tuned on them. The decoder then
   renders the anatomy and the main job's acquisition-noise step the noise; trained on noisy targets, the
   adversarial term made it paint a low-frequency mottle in the liver that lowered vessel and HCC contrast;
8. ``export``: the shipped files (``--models_dir``, ``models/`` by default) from the runs' last checkpoints
   (``label_guided_autoencoder.pt`` from ``label_guided_whole``, ``refining_autoencoder.pt`` from
   ``refining_clean``),
   the UNets and the ControlNet in float16; their sha256 are printed for ``large_files.yml``.

Every step is an ordinary bundle command (printed before it runs) with the settings below; a step whose result
exists is skipped, and an interrupted training resumes from its last checkpoint, so re-running the command after
any interruption continues where it stopped. ``--steps`` runs a subset; ``--dry_run`` prints the commands;
``--set key=value`` adds a setting to every training step (e.g. ``--set max_epochs=1`` for a smoke run).
Each command runs with ``OMP_NUM_THREADS`` from ``--threads`` (1 by default: one core per recipe).
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from scripts.core.errors import BundleInputError, install_error_hook
from scripts.core.settings import layered_config_files

__all__ = ["Step", "STEP_NAMES", "recipe", "command", "main"]

#: The finer grid the refining decoder is trained on: common.yaml's model grid (5 x 5 x 4 mm, 64^3) split 2x per
#: axis, the same field of view. (An autoencoder trained from scratch at 2.5 mm with 8x compression still decoded a
#: smeared body after 450 iterations, and stages 2 and 3 would have started again: docs/experiments.md.)
FINE_GRID: dict[str, Any] = {"spacing": [2.5, 2.5, 2.0], "spatial_size": [128, 128, 128]}
#: Class weights of the reconstruction and ControlNet losses: the thin dark structures are ~1 % of the voxels.
DARK_CLASSES = {"hcc": 4, "portal_vein": 4, "hepatic_vein": 4}
#: Epochs of the refining decoder on the noise-free phantoms, after its 12 on the noisy ones.
CLEAN_EPOCHS = 5
#: Epoch of stage 2 whose UNet guides the final one (autoguidance: an earlier checkpoint of the same training).
GUIDE_EPOCH = 20
#: The stage-2 UNet that stage 3 trains beside, exported (float16) as it ships, before stage 3.
SHIPPED_UNET = "diffusion_unet.pt"


@dataclass
class Step:
    """One bundle command of the recipe: its configs, entry point, settings and the file that shows it is done."""

    name: str
    configs: Sequence[str]
    entry: str  # "" for the config's default entry point
    settings: dict[str, Any] = field(default_factory=dict)
    result: str = ""  # relative to the work folder
    training: bool = True


def recipe(work_dir: str, guide_epoch: int = GUIDE_EPOCH) -> list[Step]:
    """The steps, with paths inside ``work_dir``; stage 2 keeps its ``guide_epoch`` for autoguidance."""

    def at(*parts: str) -> str:
        return os.path.join(work_dir, *parts)

    data = {"dataset_dir": at("data")}
    autoencoder = at("autoencoder", "autoencoder", "autoencoder_last.pt")
    stage1 = {"batch_size": 2, "val_interval": 3, "key_metric": "val_recon_contrast"}
    clean = {"dataset_dir": at("clean_data")}
    phantoms = {"num_cases": 300, "seed": 1000, "save_figure": False}  # the same cases in both datasets
    refining = {  # the refining decoder's steps, on the finer grid over the frozen encoder
        **FINE_GRID,
        "patch_size": [64, 64, 64],
        "batch_size": 2,
        "val_interval": 6,  # a validation on the fine grid takes about as long as a training epoch
        "label_guided_decoder": True,
        "decoder_upsampling": 1,
        "freeze_encoder": True,
        "lr": 1e-4,
        "d_lr": 1e-4,
        "adv_weight": 0.05,
        "adversarial_warmup_epochs": 0,
        "recon_class_weights": DARK_CLASSES,
    }
    return [
        Step(
            "data",
            ["configs/demo_data.yaml"],
            "",  # its default entry point
            {**data, **phantoms},
            "data/datalist.json",
            training=False,
        ),
        Step(
            "autoencoder",
            ["configs/train_autoencoder.yaml"],
            "training",
            {
                **data,
                **stage1,
                "output_dir": at("autoencoder"),
                "max_epochs": 12,
                "lr": 2e-4,
                "d_lr": 2e-4,
                "adv_weight": 0.05,
                "adversarial_warmup_epochs": 2,
                "recon_class_weights": DARK_CLASSES,
            },
            "autoencoder/autoencoder/autoencoder_last.pt",
        ),
        Step(
            "label_guided",
            ["configs/train_autoencoder.yaml"],
            "training",
            {
                **data,
                **stage1,
                "output_dir": at("label_guided"),
                "label_guided_decoder": True,
                "freeze_encoder": True,
                "init_autoencoder_path": autoencoder,
                "max_epochs": 6,
                "lr": 1e-4,
                "d_lr": 1e-4,
                "adv_weight": 0.1,
                "adversarial_warmup_epochs": 0,
                "recon_class_weights": DARK_CLASSES,
            },
            "label_guided/autoencoder/autoencoder_last.pt",
        ),
        Step(
            "label_guided_whole",
            ["configs/train_autoencoder.yaml"],
            "training",
            {
                **data,
                **stage1,
                "output_dir": at("label_guided_whole"),
                "patch_size": [64, 64, 64],  # the whole model grid
                "batch_size": 1,
                "val_interval": 1,
                "label_guided_decoder": True,
                "freeze_encoder": True,
                "init_autoencoder_path": at("label_guided", "autoencoder", "autoencoder_last.pt"),
                "max_epochs": 1,
                "lr": 5e-5,
                "d_lr": 5e-5,
                "adv_weight": 0.1,
                "adversarial_warmup_epochs": 0,
                "recon_class_weights": DARK_CLASSES,
            },
            "label_guided_whole/autoencoder/autoencoder_last.pt",
        ),
        Step(
            "diffusion",
            ["configs/train_diffusion.yaml"],
            "training",
            {
                **data,
                "output_dir": at("diffusion"),
                "autoencoder_path": autoencoder,
                "max_epochs": 60,
                "val_interval": 10,
                "lr": 2e-4,
                "ema_decay": 0.999,
                "ema_warmup_iterations": 100,
                "num_inference_steps": 25,
                "keep_epochs": [guide_epoch],
            },
            "diffusion/diffusion_unet/diffusion_unet_last.pt",
        ),
        Step(
            "controlnet",
            ["configs/train_controlnet.yaml"],
            "training",
            {
                **data,
                "output_dir": at("controlnet"),
                "autoencoder_path": autoencoder,
                "diffusion_unet_path": at("export", SHIPPED_UNET),
                "max_epochs": 20,
                "val_interval": 5,
                "lr": 1e-4,
                "ema_decay": 0.995,
                "ema_warmup_iterations": 100,
                "class_loss_weights": DARK_CLASSES,
            },
            "controlnet/controlnet/controlnet_last.pt",
        ),
        Step(
            "refining",
            ["configs/train_autoencoder.yaml"],
            "training",
            {
                **data,
                **refining,
                "output_dir": at("refining"),
                "init_autoencoder_path": at("label_guided_whole", "autoencoder", "autoencoder_last.pt"),
                "max_epochs": 12,
            },
            "refining/autoencoder/autoencoder_last.pt",
        ),
        Step(
            "clean_data",
            ["configs/demo_data.yaml"],
            "",
            {**clean, **phantoms, "phantom#noise_sigma_range": [0.0, 0.0]},
            "clean_data/datalist.json",
            training=False,
        ),
        Step(
            "refining_clean",
            ["configs/train_autoencoder.yaml"],
            "training",
            {
                **refining,
                **clean,
                "output_dir": at("refining_clean"),
                "init_autoencoder_path": at("refining", "autoencoder", "autoencoder_last.pt"),
                "max_epochs": CLEAN_EPOCHS,
            },
            "refining_clean/autoencoder/autoencoder_last.pt",
        ),
    ]


def exports(guide_epoch: int = GUIDE_EPOCH) -> dict[str, tuple[str, str, str | None]]:
    """What the export step writes: shipped file -> (checkpoint in the work folder, weights key, dtype)."""
    return {
        "autoencoder.pt": ("autoencoder/autoencoder/autoencoder_last.pt", "autoencoder", None),
        "label_guided_autoencoder.pt": ("label_guided_whole/autoencoder/autoencoder_last.pt", "autoencoder", None),
        "refining_autoencoder.pt": ("refining_clean/autoencoder/autoencoder_last.pt", "autoencoder", None),
        SHIPPED_UNET: ("diffusion/diffusion_unet/diffusion_unet_last.pt", "diffusion_unet", "float16"),
        "diffusion_unet_guide.pt": (
            f"diffusion/diffusion_unet/diffusion_unet_epoch{guide_epoch}.pt",
            "diffusion_unet",
            "float16",
        ),
        "controlnet.pt": ("controlnet/controlnet/controlnet_last.pt", "controlnet", "float16"),
    }


def declared(step: Step) -> set[str]:
    """The top-level settings the configs of ``step`` declare."""
    from monai.bundle import ConfigParser

    return set(ConfigParser.load_config_files(layered_config_files(*step.configs)))


def command(step: Step, extra: dict[str, Any]) -> list[str]:
    """The ``python -m monai.bundle run`` command line of ``step``; ``extra`` goes to every training step that
    declares the setting (``--set num_inference_steps=2`` reaches stages 2 and 3, not stage 1)."""
    files = layered_config_files(*step.configs)
    names = declared(step)
    extra = {k: v for k, v in extra.items() if k.split("#")[0] in names}
    settings = {**step.settings, **extra} if step.training else dict(step.settings)
    line = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        *([step.entry] if step.entry else []),
        "--config_file",
        str(files),
    ]
    for key, value in settings.items():
        line += [f"--{key}", str(value)]
    return line


def _shown(line: Sequence[str]) -> str:
    """``line`` as one shell command a reader can paste (values hold no double quotes)."""
    return " ".join(a if re.fullmatch(r"[\w./:=#,-]+", a) else '"' + a + '"' for a in line)


def _export(work_dir: str, models_dir: str, guide_epoch: int, names: Sequence[str] | None = None) -> None:
    """The shipped files ``names`` (all by default) into ``models_dir``; a missing checkpoint is one error line."""
    from scripts.core.checkpoints import export_weights, file_hash

    for name, (checkpoint, key, dtype) in exports(guide_epoch).items():
        if names is not None and name not in names:
            continue
        source = os.path.join(work_dir, checkpoint)
        if not os.path.isfile(source):
            raise BundleInputError(f"{source}: not found, so {name} cannot be exported; run the step that trains it")
        target = os.path.join(models_dir, name)
        export_weights(source, target, key, overwrite=True, dtype=dtype)
        print(f"{target}: sha256 {file_hash(target)} (from {source})")


def run(
    work_dir: str,
    steps: Sequence[str],
    extra: dict[str, Any],
    threads: int = 1,
    dry_run: bool = False,
    models_dir: str = "models",
    guide_epoch: int = GUIDE_EPOCH,
) -> None:
    """Run the ``steps`` of the recipe in order; see the module docstring."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    training = [s for s in recipe(work_dir, guide_epoch) if s.training]
    for key in extra:  # a misspelt --set would otherwise reach no step, silently
        if not any(key.split("#")[0] in declared(s) for s in training):
            raise BundleInputError(f"--set {key}: not a setting of any training step of the recipe")
    for step in recipe(work_dir, guide_epoch):
        if step.name not in steps:
            continue
        if step.name == "controlnet" and not dry_run:  # stage 3 trains beside the UNet as it ships
            _export(work_dir, os.path.join(work_dir, "export"), guide_epoch, [SHIPPED_UNET])
        line = command(step, extra)
        print(f"[{step.name}] python {_shown(line[1:])}", flush=True)
        if dry_run:
            continue
        if os.path.isfile(os.path.join(work_dir, step.result)) and not step.training:
            print(f"[{step.name}] done already ({step.result})", flush=True)
            continue
        start = time.perf_counter()
        done = subprocess.run(line, env=env)
        if done.returncode != 0:
            raise BundleInputError(f"recipe step {step.name!r} failed (exit {done.returncode}); re-run to resume it")
        print(f"[{step.name}] {time.perf_counter() - start:.0f} s", flush=True)
    if "export" in steps and not dry_run:
        _export(work_dir, models_dir, guide_epoch)


STEP_NAMES = (
    "data",
    "autoencoder",
    "label_guided",
    "label_guided_whole",
    "diffusion",
    "controlnet",
    "refining",
    "clean_data",
    "refining_clean",
    "export",
)


def _setting(text: str) -> tuple[str, Any]:
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def main(argv: Sequence[str] | None = None) -> None:
    install_error_hook()
    parser = argparse.ArgumentParser(prog="python -m scripts.tools.demo_weights", description=__doc__.split("\n")[0])
    parser.add_argument("--work_dir", required=True, help="runs, checkpoints and the dataset go here")
    parser.add_argument("--steps", default=",".join(STEP_NAMES), help=f"comma-separated subset of {STEP_NAMES}")
    parser.add_argument("--set", action="append", type=_setting, default=[], help="key=value for every training step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per command")
    parser.add_argument("--guide_epoch", type=int, default=GUIDE_EPOCH, help="stage-2 epoch kept as the guide")
    parser.add_argument("--models_dir", default="models", help="where the export step writes the shipped files")
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEP_NAMES]
    if unknown:
        raise BundleInputError(f"--steps: unknown step {unknown[0]!r}; use some of {', '.join(STEP_NAMES)}")
    run(
        os.path.abspath(args.work_dir),
        steps,
        dict(args.set),
        args.threads,
        args.dry_run,
        args.models_dir,
        args.guide_epoch,
    )


if __name__ == "__main__":
    main()
