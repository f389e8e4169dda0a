# Copyright (c) 3D-LLDM bundle contributors
# SPDX-License-Identifier: Apache-2.0
"""The stage-1 autoencoder's latent space: which weights define it, its identity, decoder-only training.

The diffusion UNet, the ControlNet and the latent cache depend on the latents, which MONAI's
``AutoencoderKL`` computes from its encoder and its two quantization convolutions only; the decoder
just turns latents back into images. So a decoder fine-tuned with the encoder frozen (the way image
latent-diffusion models sharpen their decoders after the fact) keeps every later stage valid, and
their checkpoints record the identity of the encoder side rather than of the whole autoencoder.
MONAI has no notion of this split, hence this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from scripts.core.checkpoints import load_checkpoint, load_network_weights, unwrap, weights_sha256
from scripts.core.distributed import data_parallel
from scripts.core.errors import BundleInputError
from scripts.core.settings import as_bool
from scripts.networks.label_guided import is_label_guided

__all__ = [
    "LATENT_SPACE_MODULES",
    "check_latent_space",
    "freeze_latent_space",
    "latent_space_sha256",
    "load_autoencoder_weights",
    "load_initial_autoencoder",
    "trainable_autoencoder",
    "warm_start_label_guided",
    "warm_start_refining_decoder",
]

# submodules of monai.networks.nets.AutoencoderKL that map an image to its latent mean and spread
LATENT_SPACE_MODULES = ("encoder", "quant_conv_mu", "quant_conv_log_sigma")


def _in_latent_space(name: str) -> bool:
    return name.split(".", 1)[0] in LATENT_SPACE_MODULES


def latent_space_sha256(checkpoint: Mapping[str, Any], key: str | None = "autoencoder") -> str:
    """SHA-256 of the weights that define the latents (see :func:`scripts.core.checkpoints.weights_sha256`).

    Equal for two autoencoders that encode every image to the same latents, whatever their decoders.
    """
    state = checkpoint.get(key, checkpoint) if key is not None else checkpoint
    encoder_side = {name: value for name, value in state.items() if _in_latent_space(name)}
    if not encoder_side:
        raise ValueError(f"no {'/'.join(LATENT_SPACE_MODULES)} weights among the autoencoder's {len(state)} entries")
    return weights_sha256(encoder_side)


def freeze_latent_space(autoencoder: torch.nn.Module, freeze: bool, init_path: str | None) -> torch.nn.Module:
    """With ``freeze``, stop gradients to the weights that define the latents; returns the network.

    ``init_path`` is where the kept encoder comes from (``init_autoencoder_path``): freezing a
    randomly initialised encoder would train a decoder for latents nobody else uses, so it is refused.

    Call it before any ``DistributedDataParallel`` wrapping (DDP records which parameters need
    gradients when it is built) and give the optimizer only the parameters that still require them.
    The frozen part keeps its train/eval mode: AutoencoderKL uses GroupNorm and no dropout, so the
    mode does not change what the encoder computes.
    """
    if freeze and init_path is None:
        raise BundleInputError(
            "config 'freeze_encoder': true needs --init_autoencoder_path, the autoencoder whose encoder "
            "(and latents) to keep; without it the frozen encoder would stay random"
        )
    if freeze:
        for name, module in unwrap(autoencoder).named_children():
            if name in LATENT_SPACE_MODULES:
                module.requires_grad_(False)
    return autoencoder


def trainable_autoencoder(
    network: torch.nn.Module, device: torch.device | str, freeze_encoder: Any, init_path: str | None, distributed: Any
) -> torch.nn.Module:
    """Stage 1's network as training needs it: on ``device``, the latent space frozen when asked
    (:func:`freeze_latent_space`), started from ``init_path`` (:func:`load_initial_autoencoder`), then
    wrapped in DDP under configs/multi_gpu.yaml (after freezing: DDP records which weights train)."""
    autoencoder = freeze_latent_space(network.to(device), as_bool(freeze_encoder, "freeze_encoder"), init_path)
    if init_path is not None:
        load_initial_autoencoder(autoencoder, init_path)
    return data_parallel(autoencoder, distributed, device)


def check_latent_space(
    checkpoint: Mapping[str, Any], autoencoder: Mapping[str, Any] | None, path: str, what: str
) -> None:
    """Refuse ``checkpoint`` (trained on latents) in one line when ``autoencoder`` encodes differently.

    ``autoencoder`` is the loaded stage-1 checkpoint (``None`` skips the check: the starting point of
    fine-tuning on new latents). Checkpoints record ``latent_space_sha256``; older ones recorded
    ``autoencoder_sha256``, the whole autoencoder's identity, which is still honoured.
    """
    if autoencoder is None:
        return
    if "latent_space_sha256" in checkpoint:
        recorded, current = checkpoint["latent_space_sha256"], latent_space_sha256(autoencoder)
    elif "autoencoder_sha256" in checkpoint:
        recorded, current = checkpoint["autoencoder_sha256"], weights_sha256(autoencoder, "autoencoder")
    else:
        return
    if recorded != current:
        raise BundleInputError(
            f"{path}: {what} was trained on the latents of another autoencoder's encoder "
            f"(sha256 {recorded[:12]}..., --autoencoder_path gives {current[:12]}...); "
            "pass the autoencoder it was trained with, or retrain on these latents"
        )


# ---------------------------------------------------------------------- label-guided decoding
# The network is scripts.networks.label_guided; here: starting it from a plain autoencoder, loading it.


def _holds_label_guided_weights(state: Mapping[str, Any]) -> bool:
    """True for the state dict of a label-guided autoencoder (it has label-map scale heads)."""
    return any(".mlp_gamma." in name for name in state)


def warm_start_label_guided(autoencoder: torch.nn.Module, plain_state: Mapping[str, torch.Tensor], path: str) -> None:
    """Load a plain ``AutoencoderKL`` state into a ``SPADEAutoencoderKL`` so that it decodes exactly as before.

    Every weight with the same name and shape is copied. Each SPADE layer normalises without an
    affine and then applies ``x * (1 + gamma) + beta``, gamma and beta being convolutions of the
    label map: zero kernels with biases ``weight - 1`` and ``bias`` of the replaced GroupNorm give
    back that GroupNorm, whatever the labels. Training then learns how the labels should change it,
    starting from the trained decoder instead of from noise. MONAI has no such conversion.
    """
    net = unwrap(autoencoder)
    state = net.state_dict()
    copied = {name: value for name, value in plain_state.items() if name in state and state[name].shape == value.shape}
    missing_encoder = [n for n in state if _in_latent_space(n) and n not in copied]
    if missing_encoder:
        raise BundleInputError(
            f"{path}: the autoencoder does not fit the label-guided autoencoder's encoder "
            f"({len(missing_encoder)} entries missing or of another shape, e.g. {missing_encoder[0]})"
        )
    for name in state:
        if name.endswith(".mlp_gamma.conv.weight") or name.endswith(".mlp_beta.conv.weight"):
            copied[name] = torch.zeros_like(state[name])
        elif name.endswith(".mlp_gamma.conv.bias") or name.endswith(".mlp_beta.conv.bias"):
            norm = name.rsplit(".", 3)[0]  # decoder.blocks.K.normN
            affine = "weight" if ".mlp_gamma." in name else "bias"
            source = plain_state.get(f"{norm}.{affine}")
            if source is None or source.shape != state[name].shape:
                raise BundleInputError(f"{path}: no GroupNorm {norm}.{affine} of the right size to start {name} from")
            copied[name] = source - 1.0 if affine == "weight" else source.clone()
    net.load_state_dict({**state, **copied}, strict=True)


def _decoder_blocks(state: Mapping[str, Any]) -> int:
    """Number of ``decoder.blocks`` entries a state dict holds."""
    found = [int(name.split(".")[2]) for name in state if name.startswith("decoder.blocks.")]
    return 1 + max(found) if found else 0


def warm_start_refining_decoder(
    autoencoder: torch.nn.Module, guided_state: Mapping[str, torch.Tensor], path: str
) -> None:
    """Load a label-guided autoencoder into one whose decoder has more upsampling levels
    (``decoder_upsampling``), so that it starts as that decoder followed by a nearest 2x upsampling per level.

    The encoder, the quantisation convolutions and every decoder block below the new levels are copied; the
    final norm and output convolution come from the source's; each new level starts as an identity: its
    upsampling convolution a Dirac kernel (nearest interpolation passes through), its residual blocks with a zero
    last convolution (the block returns its input). Only the output convolution then sees a finer grid than it
    was trained on. MONAI has no such conversion.
    """
    net = unwrap(autoencoder)
    state = net.state_dict()
    source_blocks, target_blocks = _decoder_blocks(guided_state), _decoder_blocks(state)
    if not 0 < source_blocks < target_blocks:
        raise BundleInputError(f"{path}: not a label-guided autoencoder with fewer decoder levels to start from")
    shift = target_blocks - source_blocks
    tail = source_blocks - 2  # the final GroupNorm and output convolution keep their place at the end
    copied = {}
    for name, value in guided_state.items():
        target = name
        if name.startswith("decoder.blocks."):
            index = int(name.split(".")[2])
            target = (
                name
                if index < tail
                else name.replace(f"decoder.blocks.{index}.", f"decoder.blocks.{index + shift}.", 1)
            )
        if target not in state or state[target].shape != value.shape:
            raise BundleInputError(f"{path}: {name} does not fit the refining decoder ({target}); same channels needed")
        copied[target] = value
    blocks = net.decoder.blocks
    with torch.no_grad():
        for index in range(tail, tail + shift):
            block = blocks[index]
            if hasattr(block, "postconv"):  # the upsampling: nearest interpolation, then this convolution
                torch.nn.init.dirac_(block.postconv.conv.weight)
                block.postconv.conv.bias.zero_()
            elif hasattr(block, "conv2"):  # a residual block: zero residual
                block.conv2.conv.weight.zero_()
                block.conv2.conv.bias.zero_()
    new = {name: value for name, value in net.state_dict().items() if name not in copied}
    net.load_state_dict({**new, **copied}, strict=True)


def load_initial_autoencoder(autoencoder: torch.nn.Module, path: str) -> dict[str, Any]:
    """Load stage-1 weights to start training from; returns the checkpoint.

    A label-guided autoencoder may start from a plain one (:func:`warm_start_label_guided`), a refining
    decoder from a label-guided one (:func:`warm_start_refining_decoder`); everything else loads strictly,
    with a one-line error on a mismatch.
    """
    what = "initial autoencoder weights"
    checkpoint = load_checkpoint(path, what)
    state = checkpoint.get("autoencoder", checkpoint)
    refining = is_label_guided(autoencoder) and _decoder_blocks(state) < _decoder_blocks(
        unwrap(autoencoder).state_dict()
    )
    if is_label_guided(autoencoder) and not _holds_label_guided_weights(state):
        if refining:
            raise BundleInputError(
                f"{path}: a plain autoencoder; a decoder with decoder_upsampling starts from a label-guided one "
                "(train that first with --label_guided_decoder true)"
            )
        warm_start_label_guided(autoencoder, state, path)
        return checkpoint
    if refining:
        warm_start_refining_decoder(autoencoder, state, path)
        return checkpoint
    return load_network_weights(autoencoder, path, "autoencoder", what)


def load_autoencoder_weights(autoencoder: torch.nn.Module, path: str, hint: str = "") -> dict[str, Any]:
    """Load trained stage-1 weights strictly; returns the checkpoint.

    A label-guided file for a plain network, or the reverse, is one line saying which setting to
    change, rather than a list of mismatched weight names.
    """
    what = "autoencoder weights"
    checkpoint = load_checkpoint(path, what, hint)
    file_guided = _holds_label_guided_weights(checkpoint.get("autoencoder", checkpoint))
    if file_guided and not is_label_guided(autoencoder):
        raise BundleInputError(f"{path}: a label-guided autoencoder; pass --label_guided_decoder true to use it")
    if is_label_guided(autoencoder) and not file_guided:
        raise BundleInputError(
            f"{path}: a plain autoencoder, but --label_guided_decoder is true; pass false, or a label-guided "
            "autoencoder trained with configs/train_autoencoder.yaml --label_guided_decoder true"
        )
    if file_guided:  # a refining decoder has more decoder levels than one on the model grid
        stored, built = _decoder_blocks(checkpoint.get("autoencoder", checkpoint)), _decoder_blocks(
            unwrap(autoencoder).state_dict()
        )
        upsampling = int(getattr(unwrap(autoencoder), "decoder_upsampling", 0))
        if stored > built:
            raise BundleInputError(
                f"{path}: a refining decoder (a finer output grid), but --decoder_upsampling is {upsampling}; "
                "pass the decoder_upsampling it was trained with (1 for models/refining_autoencoder.pt)"
            )
        if stored < built:
            raise BundleInputError(
                f"{path}: a decoder on the model grid, but --decoder_upsampling is {upsampling}; pass 0 to use it"
            )
    return load_network_weights(autoencoder, path, "autoencoder", what, hint)
