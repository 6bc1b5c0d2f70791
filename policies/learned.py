"""Learned (PreScope-style) and pre-gated hidden-state predictors. (Work in progress.)"""
from __future__ import annotations

import os
import re

PREDICTOR_FILE = "predictor.safetensors"
PREDICTOR_META = "predictor.json"
_PRE_GATE = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?:block_sparse_moe|mlp)\.pre_gate\.weight$")


def has_trained_predictor(store_dir) -> bool:
    return os.path.isfile(os.path.join(store_dir, PREDICTOR_FILE)) and \
        os.path.isfile(os.path.join(store_dir, PREDICTOR_META))


def has_pre_gates(dense) -> bool:
    return any(_PRE_GATE.match(k) for k in dense)


class LearnedPredictor:
    @classmethod
    def load(cls, store_dir, **kw):
        raise NotImplementedError("learned predictor: in progress")


class PreGated:
    @classmethod
    def from_dense(cls, dense, top_k, **kw):
        raise NotImplementedError("pre-gated predictor: in progress")
