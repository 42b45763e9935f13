"""Every hyper-parameter of a training run, with the MixNN paper's values as defaults.

A run is fully described by one :class:`TrainConfig`; it is saved next to the run's metrics
(``config.yaml``) and can be loaded back with :meth:`TrainConfig.from_yaml`, overridden field
by field from the command line (``mixnn train --config run.yaml --epochs 40``).
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METHODS = ("ce", "mixup", "gce", "sce", "mixnn", "mixnn_plus")
PLUS_LOSSES = ("gce", "sce", "ce")
PLUS_CORRECTIONS = ("selective", "graded", "all", "none")
PLUS_FINAL_CORRECTIONS = ("off", "always", "class_pair", "class_pair_confident")
AVERAGE_BN_MODES = ("averaged", "recomputed", "symmetric")
WEIGHT_MODES = ("gmm", "trust", "avg", "rdm")
PARTNER_MODES = ("neighbours", "random", "in_batch")
PLAN_MODES = ("coherent", "naive")
GMM_LOSS_TARGETS = ("soft_targets", "argmax_targets", "given")
DATASETS = ("fashion_mnist", "digits", "cifar10", "cifar100", "clothing1m", "webvision", "image_folder", "file_list")
NEIGHBOUR_BACKENDS = ("auto", "hnsw", "exact", "faiss")
NOISE_KINDS = ("none", "symmetric_uniform", "symmetric_flip", "asymmetric_cifar10", "asymmetric_cifar100",
               "pairflip", "asymmetric_fashion_mnist")  # mixnn_fast.data.noise.KINDS minus "custom" (needs a matrix)
MODELS = ("small_cnn", "preact_resnet18", "resnet34", "resnet50")  # or torchvision:<name> / timm:<name>
ON_ERROR = ("raise", "skip")
TARGET_STORAGES = ("auto", "float32", "float16", "bfloat16", "topk")
FEATURE_DTYPES = ("auto", "float32", "float16")
AMP_DTYPES = ("auto", "bfloat16", "float16")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

#: Fields that change how a run is watched or where it stops, never what an epoch computes: a
#: resumed run may change them (``mixnn train --out-dir X --resume --epochs 80``).  Every other
#: field defines the experiment and must match the run being resumed.  ``num_threads`` changes
#: only the order of float reductions (results equal to rounding, not bit for bit);
#: the last corrections' settings (``REPORT_ONLY_FIELDS``) only the labels reported after the last
#: epoch.
RESUMABLE_FIELDS = ("epochs", "out_dir", "progress", "tensorboard", "eval_every", "checkpoint_every",
                    "checkpoint_every_steps", "num_threads", "extra", "plus_final_correction",
                    "plus_final_correction_symmetric", "plus_final_clean_confidence")

#: Fields added after run folders were written, with the value that reproduces what those runs
#: did: settings saved without the key (config.yaml, a checkpoint) are read with it
#: (:meth:`TrainConfig.from_saved`), whatever the field's default is now.
ADDED_AFTER_SAVED_RUNS = {"plus_freeze": 0, "plus_vote": 0, "plus_split_check": False, "trust_min_agreement": 0.0,
                          "trust_min_spread": 0.0,
                          "plus_elr": 0.0, "elr_beta": 0.7, "plus_warmup_max": 0,
                          "plus_consistent": 0, "plus_consistent_min_agreement": 0.0,
                          "plus_split_check_min_agreement": 0.0, "plus_gmm_per_class": False,
                          "plus_min_confidence": 0.0, "plus_average_last": 0.0, "plus_symmetric_confidence": 0.0,
                          "plus_symmetric_trust": False, "plus_neighbour_guard": 0, "plus_prior": 0.0,
                          "plus_final_correction": "off", "plus_final_correction_symmetric": False,
                          "plus_final_clean_confidence": 0.0, "plus_average_bn": "averaged"}

#: MixNN+'s settings that are on by default, with the settings they act under.  Where one cannot
#: act (another method, another correction), its default is accepted as well as "off" (runs saved
#: before it existed are read with it off), and runs that differ only in it are one experiment
#: (:func:`acting_settings`).
ON_BY_DEFAULT_ACTS_UNDER = {
    "plus_consistent": dict(method="mixnn_plus", plus_correction="selective"),
    "plus_consistent_min_agreement": dict(method="mixnn_plus", plus_correction="selective"),
    "plus_min_confidence": dict(method="mixnn_plus", plus_correction="selective"),
    "plus_symmetric_confidence": dict(method="mixnn_plus", plus_correction="selective"),
    "plus_average_last": dict(method="mixnn_plus"),
    "plus_average_bn": dict(method="mixnn_plus"),  # and plus_average_last > 0 (acting_settings)
    "plus_symmetric_trust": dict(method="mixnn_plus", weights="gmm", partners="neighbours"),
    "plus_prior": dict(method="mixnn_plus"),
    "plus_final_correction": dict(method="mixnn_plus", plus_correction="selective"),
    "plus_final_correction_symmetric": dict(method="mixnn_plus", plus_correction="selective"),
    "plus_final_clean_confidence": dict(method="mixnn_plus", plus_correction="selective"),
}

#: Settings that change only what a finished run reports, never what it trains: a finished run
#: whose saved value differs is reported again with the new one (``mixnn table``), not retrained.
REPORT_ONLY_FIELDS = ("plus_final_correction", "plus_final_correction_symmetric", "plus_final_clean_confidence")

#: Settings that refine MixNN+'s stability gate, with what each does: they cannot act while the
#: gate is off (plus_consistent 0).
REFINES_STABILITY_GATE = {"plus_consistent_min_agreement": "says when MixNN+'s stability gate applies",
                          "plus_min_confidence": "adds a confidence condition to MixNN+'s stability gate",
                          "plus_symmetric_confidence": "sets MixNN+'s confidence condition where the noise looks "
                                                       "symmetric"}


@dataclass
class TrainConfig:
    # ---- data ------------------------------------------------------------------------------
    dataset: str = "fashion_mnist"
    data_root: str | None = None          # None: the dataset's default location (Fashion-MNIST: Debian's)
    test_root: str | None = None          # image_folder / file_list: the test set
    train_subset: int | None = None       # a class-stratified subset of this many training samples
    validation_split: float = 0.0         # hold out this share of the (noisy) training set to choose settings on
    noise: str = "symmetric_uniform"      # a mixnn_fast.data.noise kind, or "none" to train on the given labels
    noise_rate: float = 0.4
    noise_seed: int = 0
    num_batches: int | None = None        # Clothing1M: class-balanced batches per epoch (paper: 2000)
    allow_outside_root: bool = False      # list files may name images outside the dataset root
    augment: bool = True                  # in-memory images: random pad-and-crop + flip; False: none (the
                                          # MNIST protocol of Co-teaching/GCE); image files are always augmented
    # ---- method ----------------------------------------------------------------------------
    method: str = "mixnn"                 # ce | mixup | gce | sce | mixnn | mixnn_plus (docs/mixnn_plus.md)
    model: str = "small_cnn"
    model_widths: list[int] | None = None  # small_cnn only
    weights_path: str | None = None       # local pretrained weights (never downloaded)
    epochs: int = 300
    batch_size: int = 128
    lr: float = 0.02
    lr_min: float = 0.001
    restart_period: int = 10              # cosine annealing with warm restarts, in epochs
    momentum: float = 0.9
    weight_decay: float = 1e-3
    warmup_epochs: int = 10               # E_w: plain cross-entropy first (30 for CIFAR-100-like data)
    correction_start: int = 60            # E_s: soft targets follow the predictions from this epoch
    correction_momentum: float = 0.9      # α in t ← α t + (1 − α) p
    correction_every: int = 1             # update the soft targets every n-th epoch (authors' code: 10)
    label_correction: bool = True
    num_neighbours: int = 1               # K
    weights: str = "gmm"                  # gmm (eq. 10-11) | trust (clean anchors kept whole) | avg | rdm
    trust_min_agreement: float = 0.0      # weights trust: only at refreshes where this share of the predictions
                                          # equals the given labels (a label-free sign of little noise); else gmm
    trust_min_spread: float = 0.0         # weights trust: only at refreshes whose disagreement spread reached this
                                          # (a label-free sign of symmetric noise); else gmm
    rdm_alpha: float = 1.0
    partners: str = "neighbours"          # neighbours (dataset-wide) | random | in_batch (authors' code)
    plan: str = "coherent"                # coherent (partners in the anchor's batch) | naive (decode again)
    mix_given_labels: bool = False        # eq. 5 literally: neighbours contribute their given labels
    authors_schedule: bool = False        # plain mixup with random partners until E_s, as the authors' code
    gmm_loss: str = "argmax_targets"      # GMM losses against: the soft targets' argmax (authors' code) | the soft
                                          # targets (floored by their entropy once corrected) | the given labels
    gmm_history: int = 1                  # average each sample's loss over its last m refreshes
    gmm_max_iter: int = 10
    gmm_tol: float = 1e-2
    gmm_reg_covar: float = 5e-4
    neighbour_backend: str = "auto"       # auto (exact on a CUDA device when the pool fits, else hnsw) | hnsw | exact | faiss
    targets_storage: str = "auto"         # soft targets: auto (by N x C) | float32 | float16 | bfloat16 | topk
    features_dtype: str = "auto"          # the refresh's pool features: auto (float16 for large pools) | float32 | float16
    plus_loss: str = "ce"                 # mixnn_plus: CE, GCE (q = gce_q) or SCE (sce_alpha, sce_beta) on the mixed targets
    plus_correction: str = "selective"    # mixnn_plus: correct only samples the last GMM called noisy | graded (each
                                          # sample's EMA step times 1 - its clean probability) | all | none
    plus_freeze: int = 0                  # mixnn_plus: a target stops being corrected once the model has predicted its
                                          # label at this many consecutive refreshes since correction began (0: never)
    plus_consistent: int = 2              # mixnn_plus, selective correction: a target is corrected only once the model
                                          # has predicted the same class at this many consecutive refreshes (0: off)
    plus_consistent_min_agreement: float = 0.5  # mixnn_plus: that gate only after refreshes where at least this
                                          # share of predictions agree with the given labels (0: always)
    plus_min_confidence: float = 0.5      # mixnn_plus: where the stability gate applies, a target is corrected only
                                          # if the model gives its prediction at least this probability (0: off)
    plus_symmetric_confidence: float = 0.8  # mixnn_plus: that probability instead, after refreshes whose disagreements
                                          # with the given labels spread like symmetric noise's (0: off; methods.py)
    plus_symmetric_trust: bool = True     # mixnn_plus with gmm weights and neighbour partners: anchors kept whole with
                                          # their clean probability (trust weights) at refreshes where most
                                          # predictions agree with the given labels and their disagreements spread
                                          # like symmetric noise's (methods.py)
    plus_neighbour_guard: int = 0         # mixnn_plus: where the symmetric confidence would act, a sample is not
                                          # corrected while its given label is the commonest among this many nearest
                                          # neighbours', and the others need plus_min_confidence (0: off; methods.py)
    plus_final_correction: str = "class_pair"  # mixnn_plus, selective correction: after the last epoch, the samples the next
                                          # refresh could correct take the final pass's prediction as their reported
                                          # label where it is confident enough: off | always | class_pair (only
                                          # where the noise has not looked symmetric) | class_pair_confident (there,
                                          # every sample predicted with plus_min_confidence; correction_gates.py;
                                          # nothing trained changes)
    plus_final_correction_symmetric: bool = True  # mixnn_plus, selective correction: after the last epoch, where
                                          # the noise has looked symmetric, the samples the last refresh's GMM
                                          # called noisy take the tested model's prediction as their reported label
                                          # where it reaches plus_min_confidence (correction_gates.py)
    plus_final_clean_confidence: float = 0.7  # mixnn_plus, plus_final_correction always or class_pair: where it acts,
                                          # a sample the last refresh's GMM called clean also takes the final pass's
                                          # prediction where its probability reaches this (0: off)
    plus_vote: int = 0                    # mixnn_plus: a sample's clean probability is at least the share of its this many
                                          # nearest neighbours that carry its current label (0: off)
    plus_split_check: bool = False        # mixnn_plus: no sample is called noisy while the GMM's components overlap
                                          # (Ashman's D < 2)
    plus_split_check_min_agreement: float = 0.0  # mixnn_plus: that check only at refreshes where at least this share
                                          # of predictions agree with the given labels (0: always)
    plus_gmm_per_class: bool = False      # mixnn_plus: clean probabilities from one GMM per class of the labels the
                                          # losses were measured against, instead of one over all samples
    plus_average_last: float = 0.25       # mixnn_plus: test the average of the weights (and BatchNorm statistics) at
                                          # the warm restarts within this last share of the epochs (SWA; 0: off)
    plus_average_bn: str = "symmetric"    # mixnn_plus, plus_average_last > 0: the average's BatchNorm statistics are the
                                          # mean of the snapshots' ("averaged") or recomputed by one pass over the
                                          # training images, unmixed, after each snapshot joins ("recomputed": SWA's
                                          # torch.optim.swa_utils.update_bn), or recomputed only where the noise
                                          # looked symmetric so far ("symmetric": symmetric_share >= 1/2)
    plus_elr: float = 0.0                 # mixnn_plus: weight λ of the early-learning penalty (ELR) added to the loss (0: off)
    elr_beta: float = 0.7                 # ELR: the weight each sample's running average of predictions keeps per refresh
    plus_prior: float = 1.0               # mixnn_plus: weight λ of the class-balance penalty KL(π ‖ the batch's mean
                                          # prediction), π the given labels' class shares, on the epochs that mix
                                          # with the refresh's partners (Tanaka et al. 2018, DivideMix; 0: off)
    plus_warmup_max: int = 0              # mixnn_plus: warm-up runs from warmup_epochs until a refresh's GMM separates
                                          # (Ashman's D >= 2), at most until this epoch (0: warmup_epochs, fixed)
    mixup_alpha: float = 1.0
    gce_q: float = 0.7
    sce_alpha: float = 0.1
    sce_beta: float = 1.0
    # ---- engine ----------------------------------------------------------------------------
    device: str = "auto"                  # auto | cpu | cuda | cuda:N
    amp: bool = True                      # mixed precision (autocast) on CUDA devices
    amp_dtype: str = "auto"               # auto (bfloat16 where supported) | bfloat16 | float16 (with loss scaling)
    channels_last: bool = True            # NHWC activations: ~1.4x faster training, 2x faster refresh on CPU (oneDNN)
    num_threads: int | None = None        # torch / DALI / mixer threads (None: torch's default)
    seed: int = 0
    out_dir: str = "runs/mixnn"
    eval_every: int = 1
    checkpoint_every: int = 1
    checkpoint_every_steps: int | None = None  # also save every N training steps (long epochs lose at most N)
    on_error: str = "raise"               # an unreadable image: raise (naming the file) | skip it and count it
    progress: bool = True
    tensorboard: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError (or TypeError for a value of the wrong type) naming the first field
        that is out of range.  Called on construction, so no run starts from a bad setting."""
        self._check_types()
        choices = {"method": METHODS, "weights": WEIGHT_MODES, "partners": PARTNER_MODES, "plan": PLAN_MODES,
                   "gmm_loss": GMM_LOSS_TARGETS, "dataset": DATASETS, "neighbour_backend": NEIGHBOUR_BACKENDS,
                   "noise": NOISE_KINDS, "on_error": ON_ERROR, "targets_storage": TARGET_STORAGES,
                   "features_dtype": FEATURE_DTYPES, "amp_dtype": AMP_DTYPES, "plus_loss": PLUS_LOSSES,
                   "plus_correction": PLUS_CORRECTIONS, "plus_final_correction": PLUS_FINAL_CORRECTIONS,
                   "plus_average_bn": AVERAGE_BN_MODES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.model not in MODELS and not re.match(r"^(torchvision|timm):\w+$", self.model):
            raise ValueError(f"model: must be one of {', '.join(MODELS)}, torchvision:<name> or timm:<name>; "
                             f"got {self.model!r}")
        if not _DEVICE.match(self.device):
            raise ValueError(f"device: must be auto, cpu, cuda or cuda:<index>; got {self.device!r}")
        positive = ["epochs", "batch_size", "restart_period", "num_neighbours", "gmm_history", "gmm_max_iter",
                    "eval_every", "checkpoint_every", "correction_every"]
        optional_positive = ["num_batches", "num_threads", "checkpoint_every_steps"]
        for name in positive + [n for n in optional_positive if getattr(self, n) is not None]:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_epochs", "correction_start", "seed", "noise_seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("plus_vote", "plus_warmup_max", "plus_neighbour_guard"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("trust_min_agreement", "trust_min_spread", "plus_consistent_min_agreement",
                     "plus_split_check_min_agreement", "plus_min_confidence", "plus_symmetric_confidence"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}: must lie in [0, 1], got {getattr(self, name)}")
        for name in ("plus_freeze", "plus_consistent"):  # the counts are int16
            if not 0 <= getattr(self, name) <= 32767:
                raise ValueError(f"{name}: must lie in [0, 32767], got {getattr(self, name)}")
        # settings that act only together with others: refused rather than silently doing nothing
        self._needs("plus_vote", "votes among MixNN+'s nearest neighbours", method="mixnn_plus", partners="neighbours")
        if self.plus_neighbour_guard:
            self._needs_stability_gate("plus_neighbour_guard", "spares labels MixNN+'s neighbours support from its "
                                       "gated correction", method="mixnn_plus", plus_correction="selective",
                                       partners="neighbours")
        self._needs("trust_min_agreement", "gates the trust weights of neighbour partners", weights="trust",
                    partners="neighbours")
        self._needs("trust_min_spread", "gates the trust weights of neighbour partners", weights="trust",
                    partners="neighbours")
        self._needs("plus_elr", "adds early-learning regularisation to MixNN+'s loss", method="mixnn_plus")
        # (plus_final_correction_symmetric, a switch on by default, is accepted either way: off
        # needs nothing, and its default is accepted where it cannot act)
        self._needs_when_set("plus_final_correction", "corrects MixNN+'s reported labels once more from the final "
                             "pass", off="off")
        if not 0 <= self.plus_final_clean_confidence <= 1:
            raise ValueError(f"plus_final_clean_confidence: must lie in [0, 1] (a probability; 0: off), got "
                             f"{self.plus_final_clean_confidence}")
        if (self.plus_final_clean_confidence not in (0.0, _default("plus_final_clean_confidence"))
                and self.plus_final_correction not in ("always", "class_pair")):
            raise ValueError("plus_final_clean_confidence: extends MixNN+'s last correction, so it needs "
                             "plus_final_correction always or class_pair; got plus_final_correction "
                             f"{self.plus_final_correction!r}")
        self._needs_when_set("plus_final_clean_confidence", "extends MixNN+'s last correction to labels its GMM "
                             "called clean", off=0.0)
        self._needs_when_set("plus_prior", "adds a class-balance penalty to MixNN+'s loss", off=0.0)
        self._needs_when_set("plus_average_last", "averages MixNN+'s weights over its last warm restarts", off=0.0)
        if not 0 <= self.plus_average_last < 1:
            raise ValueError(f"plus_average_last: must lie in [0, 1) (a share of the epochs; 0: off), got "
                             f"{self.plus_average_last}")
        # (plus_average_bn: "averaged" needs nothing, and the others are accepted where they cannot act,
        # as the default is: there is nothing to check beyond its choices)
        if self.elr_beta != _default("elr_beta") and not self.plus_elr:
            raise ValueError(f"elr_beta: sets the running average of ELR, so it needs plus_elr > 0; got plus_elr "
                             f"{self.plus_elr!r}")
        self._needs("plus_split_check", "checks MixNN+'s GMM", method="mixnn_plus")
        self._needs("plus_gmm_per_class", "fits MixNN+'s GMM within each class", method="mixnn_plus")
        self._needs("plus_split_check_min_agreement", "says when MixNN+'s split check applies", plus_split_check=True)
        self._needs("plus_warmup_max", "bounds MixNN+'s warm-up chosen from the GMM's separation",
                    method="mixnn_plus", authors_schedule=False)
        if self.plus_warmup_max and not self.warmup_epochs <= self.plus_warmup_max <= self.correction_start:
            # past the correction's start, a plain epoch's refresh would correct labels no step trains on
            raise ValueError(f"plus_warmup_max: must lie in [warmup_epochs, correction_start] = "
                             f"[{self.warmup_epochs}, {self.correction_start}] (or 0: off), got {self.plus_warmup_max}")
        self._needs("plus_freeze", "freezes MixNN+'s selective correction", method="mixnn_plus",
                    plus_correction="selective")
        # MixNN+'s stability gate is on by default, and 0 is what runs saved before it are read with:
        # both are accepted with any method; any other value the user chose must be one that acts
        if self.plus_consistent not in (0, _default("plus_consistent")):
            self._needs("plus_consistent", "gates MixNN+'s selective correction",
                        **ON_BY_DEFAULT_ACTS_UNDER["plus_consistent"])
        for name, what in REFINES_STABILITY_GATE.items():
            if getattr(self, name) not in (0.0, _default(name)):
                self._needs_stability_gate(name, what, **ON_BY_DEFAULT_ACTS_UNDER[name])
        for name in ("lr", "lr_min", "momentum", "weight_decay", "noise_rate", "correction_momentum", "rdm_alpha",
                     "gmm_tol", "gmm_reg_covar", "mixup_alpha", "gce_q", "sce_alpha", "sce_beta", "validation_split",
                     "trust_min_agreement", "trust_min_spread", "plus_elr", "elr_beta", "plus_prior",
                     "plus_consistent_min_agreement", "plus_split_check_min_agreement", "plus_min_confidence",
                     "plus_average_last", "plus_symmetric_confidence"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name}: must be a finite number, got {getattr(self, name)}")
        if self.plus_elr < 0:
            raise ValueError(f"plus_elr: must be >= 0, got {self.plus_elr}")
        if self.plus_prior < 0:
            raise ValueError(f"plus_prior: must be >= 0, got {self.plus_prior}")
        if not 0 <= self.elr_beta < 1:
            raise ValueError(f"elr_beta: must lie in [0, 1), got {self.elr_beta}")
        if not 0 <= self.validation_split < 1:
            raise ValueError(f"validation_split: must lie in [0, 1), got {self.validation_split}")
        if not 0 <= self.noise_rate <= 1:
            raise ValueError(f"noise_rate: must lie in [0, 1], got {self.noise_rate}")
        if not 0 <= self.correction_momentum <= 1:
            raise ValueError(f"correction_momentum: must lie in [0, 1], got {self.correction_momentum}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum: must lie in [0, 1), got {self.momentum}")
        if self.lr <= 0 or self.lr_min < 0 or self.lr_min > self.lr:
            raise ValueError(f"lr / lr_min: need 0 <= lr_min <= lr and lr > 0, got {self.lr_min} / {self.lr}")
        for name in ("weight_decay", "gmm_tol"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("rdm_alpha", "gmm_reg_covar", "mixup_alpha"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if not 0 < self.gce_q <= 1:
            raise ValueError(f"gce_q: must lie in (0, 1], got {self.gce_q}")
        if self.sce_alpha < 0 or self.sce_beta < 0 or self.sce_alpha + self.sce_beta == 0:
            raise ValueError(f"sce_alpha / sce_beta: need both >= 0, not both 0; got {self.sce_alpha} / {self.sce_beta}")
        if self.model_widths is not None:
            if self.model != "small_cnn":
                raise ValueError(f"model_widths: only small_cnn takes widths; got model {self.model!r}")
            if not self.model_widths or any(w < 1 for w in self.model_widths):
                raise ValueError(f"model_widths: expected positive channel counts, got {self.model_widths}")
        if not self.augment and self.dataset in ("clothing1m", "webvision", "image_folder", "file_list"):
            raise ValueError(f"augment: False is only supported for in-memory datasets (fashion_mnist, cifar10, "
                             f"cifar100, digits); {self.dataset} is decoded from files with a random-resized crop")
        if self.train_subset is not None and self.train_subset < 2:
            raise ValueError(f"train_subset: must be >= 2, got {self.train_subset}")
        if not self.out_dir:
            raise ValueError("out_dir: must not be empty")

    def _needs(self, name: str, what: str, **required: str) -> None:
        """ValueError when setting ``name`` is on (truthy) but a field of ``required`` differs from
        its required value, naming the setting, what it does and every required field."""
        if getattr(self, name) and any(getattr(self, k) != v for k, v in required.items()):
            needs = " and ".join(f"{k} {v}" for k, v in required.items())
            got = ", ".join(f"{k} {getattr(self, k)!r}" for k in required)
            raise ValueError(f"{name}: {what}, so it needs {needs}; got {got}")

    def _needs_when_set(self, name: str, what: str, *, off: Any) -> None:
        """:meth:`_needs` with :data:`ON_BY_DEFAULT_ACTS_UNDER`'s requirements for a setting that is
        on by default: only when it is set to neither ``off`` nor its default (the default is
        accepted where it cannot act, as runs saved before it are read with it off)."""
        if getattr(self, name) not in (off, _default(name)):
            self._needs(name, what, **ON_BY_DEFAULT_ACTS_UNDER[name])

    def _needs_stability_gate(self, name: str, what: str, **required: str) -> None:
        """:meth:`_needs` for a setting that refines MixNN+'s stability gate: also ValueError
        when the gate is off (``plus_consistent`` 0), where the setting could not act."""
        if not self.plus_consistent:
            raise ValueError(f"{name}: {what}, so it needs plus_consistent > 0; got plus_consistent "
                             f"{self.plus_consistent!r}")
        self._needs(name, what, **required)

    def _check_types(self) -> None:
        """Each field holds a value of its annotated type (YAML and hand-written dicts can hold
        anything): TypeError naming the field otherwise.  ints are accepted for floats; bools are
        not accepted for numbers (YAML's ``yes`` is a bool)."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kinds = typing.get_args(hints[f.name]) or (hints[f.name],)
            if value is None and type(None) in kinds:
                continue
            if not any(_is_instance(value, kind) for kind in kinds if kind is not type(None)):
                expected = " or ".join(_type_name(k) for k in kinds)
                raise TypeError(f"{f.name}: expected {expected}, got {value!r} ({type(value).__name__})")

    @property
    def refreshes(self) -> bool:
        """Whether the method runs MixNN's refresh (mixnn, mixnn_plus)."""
        return self.method in ("mixnn", "mixnn_plus")

    def experiment_differences(self, other: "TrainConfig") -> list[str]:
        """Names of the fields outside :data:`RESUMABLE_FIELDS` whose values differ from ``other``'s."""
        return sorted(f for f in self.field_names() if f not in RESUMABLE_FIELDS
                      and getattr(self, f) != getattr(other, f))

    # ---- (de)serialisation -----------------------------------------------------------------

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict, *, source: str = "config") -> "TrainConfig":
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)}")
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{source}: {exc}") from None

    @classmethod
    def from_saved(cls, values: dict, *, source: str = "saved settings") -> "TrainConfig":
        """The settings a run saved (its config.yaml or checkpoint), read as the run used them:
        fields it predates take their value of :data:`ADDED_AFTER_SAVED_RUNS`, not today's default."""
        return cls.from_dict(saved_settings(values), source=source)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        """Load a YAML mapping of fields, then apply ``overrides`` (None values are ignored)."""
        values = read_yaml_settings(path)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values, source=str(path))

    def save_yaml(self, path: str | Path) -> None:
        """Write the settings as YAML (atomically: a reader never sees half a file)."""
        import yaml  # imported where used: the package loads without PyYAML (config files need it)

        from mixnn_fast.train.atomic import write_atomic

        write_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False).encode())


def _default(name: str) -> Any:
    """The default value of TrainConfig's field ``name``."""
    return TrainConfig.__dataclass_fields__[name].default


def acting_settings(values: dict) -> dict:
    """``values`` (settings by name, e.g. ``TrainConfig.to_dict()``) less the on-by-default
    settings that cannot act under them (:data:`ON_BY_DEFAULT_ACTS_UNDER`), and less the
    refinements of MixNN+'s stability gate wherever the gate cannot act (another method or
    correction, or ``plus_consistent`` 0): what two runs must share to be the same experiment."""
    def acts(name: str) -> bool:  # (dicts, not TrainConfig: a saved run's settings need not be valid today)
        return all(values.get(f) == required for f, required in ON_BY_DEFAULT_ACTS_UNDER.get(name, {}).items())

    gate_acts = values.get("plus_consistent") != 0 and acts("plus_consistent")
    # the average's BatchNorm statistics, only where there is an average (not a condition of equality)
    averaging = bool(values.get("plus_average_last"))
    return {k: v for k, v in values.items() if acts(k) and (gate_acts or k not in REFINES_STABILITY_GATE)
            and (averaging or k != "plus_average_bn")}


def saved_settings(values: dict) -> dict:
    """A run's saved settings completed with the values of the fields it predates."""
    if not isinstance(values, dict):
        return values
    return {**ADDED_AFTER_SAVED_RUNS, **values}


def read_yaml_settings(path: str | Path) -> dict:
    """The mapping of settings in a YAML file, as written (not yet checked against the fields).
    FileNotFoundError / ValueError naming the file when it is missing, not YAML or not a mapping."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config: {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"config: {path} is not valid YAML: {exc}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"config: {path} must hold a mapping of settings, got {type(values).__name__}")
    bad_keys = [k for k in values if not isinstance(k, str)]
    if bad_keys:
        raise ValueError(f"config: {path}: setting names must be strings, got {bad_keys[0]!r}")
    return values


def _is_instance(value: Any, kind: Any) -> bool:
    origin = typing.get_origin(kind)
    if origin is list:
        (item,) = typing.get_args(kind)
        return isinstance(value, list) and all(_is_instance(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is Any:
        return True
    return isinstance(value, kind)


def _type_name(kind: Any) -> str:
    return "None" if kind is type(None) else getattr(kind, "__name__", str(kind))
