"""The retrieval methods by name: OPQN and its ablations, DPQ-style learned PQ, DCDH hashing.

Every network has the same interface, so training, evaluation and checkpoint loading never
ask which one they hold:

- ``features(images)``: the D-dim backbone feature x (its cosine is the float upper bound);
- ``codes_from_features(x)``: the compact database codes;
- ``scores(xq, codes)``: query features against database codes, (nq, N), higher is better;
- ``forward(images)`` and ``training_loss(out, labels)``: a dict with ``loss`` and ``acc``.

A method names its network and config class, the module a trainer steps (``loss_wrapper``:
the network with its loss inside ``forward``) and, for reports, how a query ranks the database.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model.dcdh import DCDH, DCDHConfig
from model.dpq import DPQ, DPQConfig
from model.losses import WithLoss
from model.opqn import OPQN, VARIANTS, OPQNConfig


@dataclass(frozen=True)
class Method:
    name: str
    family: str  # "opqn", "dpq" or "dcdh": which network
    label: str  # name in tables and plots
    ranking: str  # how a query scores the database, for reports
    model_class: type
    config_class: type
    loss_wrapper: type = WithLoss
    variant: str = "opqn"  # the config's ``variant`` field


_PQ_RANKING = "score(q, i) = sum_m P_q[m, b_im] (LUT, codes argmax p_m)"
METHODS: dict[str, Method] = {
    **{v: Method(v, "opqn", "OPQN" if v == "opqn" else f"OPQN-{v}", _PQ_RANKING, OPQN, OPQNConfig, variant=v)
       for v in VARIANTS},
    "dpq": Method("dpq", "dpq", "DPQ", "score(q, i) = -sum_m ||soft_qm - C_m[b_im]||^2 (asymmetric, learned codewords)",
                  DPQ, DPQConfig, variant="dpq"),
    "dcdh": Method("dcdh", "dcdh", "DCDH", "score(q, i) = -Hamming(sign codes)", DCDH, DCDHConfig, variant="dcdh"),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    return METHODS[name]


def method_of(model: torch.nn.Module) -> Method:
    """The method a built network belongs to (by its config's variant)."""
    variant = model.cfg.variant
    if isinstance(model, OPQN) and variant not in VARIANTS:
        variant = "opqn"
    return get_method(variant)


def build_network(name: str, config: dict) -> torch.nn.Module:
    """A fresh network of method ``name`` from its config as a dict (a checkpoint's ``config``)."""
    method = get_method(name)
    return method.model_class(method.config_class.from_dict(config))


def with_loss(model: torch.nn.Module) -> torch.nn.Module:
    """What a trainer steps: the network with its loss inside ``forward``."""
    return method_of(model).loss_wrapper(model)
