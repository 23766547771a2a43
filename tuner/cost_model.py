"""A cost model learned online from measured trials: gradient-boosted trees (LightGBM) over
named features of (workload, choice), shared by all workloads of a tuning run.

Entry points: CostModel.fit(rows) / .predict(feature_dicts) / .fitted.
The target is log(time / the workload's untuned time), so that workloads of very different
sizes teach one model which knob values pay. LightGBM earns its place over a hand-written
model by handling categorical-ish, interacting knobs (register tile x block sizes) with no
feature engineering; the tuner keeps random search as a measured baseline (--search=random).
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np


class CostModel:
    """Fit on [(features, log relative time)], predict for candidate features (lower is
    faster). Until min_samples trials exist, predict() returns zeros (no opinion)."""

    def __init__(self, min_samples: int = 12, seed: int = 0):
        self.min_samples = min_samples
        self.seed = seed
        self._columns: list = []
        self._model = None

    @property
    def fitted(self) -> bool:
        return self._model is not None

    def _matrix(self, feature_dicts: Sequence[dict]) -> np.ndarray:
        index = {name: i for i, name in enumerate(self._columns)}
        x = np.full((len(feature_dicts), len(self._columns)), np.nan, np.float64)
        for r, feats in enumerate(feature_dicts):
            for name, v in feats.items():
                i = index.get(name)
                if i is not None:
                    x[r, i] = v
        return x

    def fit(self, rows: Sequence[tuple]) -> None:
        """rows: (feature dict, target) pairs of every ok trial so far."""
        if len(rows) < self.min_samples:
            return
        import lightgbm

        self._columns = sorted({name for feats, _ in rows for name in feats})
        x = self._matrix([feats for feats, _ in rows])
        y = np.array([t for _, t in rows], np.float64)
        params = dict(objective="regression", learning_rate=0.1, num_leaves=15,
                      min_data_in_leaf=3, min_data_in_bin=1, bagging_fraction=0.9,
                      bagging_freq=1, feature_fraction=0.9, seed=self.seed, verbose=-1,
                      num_threads=1)  # measurements own the cores; fitting is small
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = lightgbm.Dataset(x, y, params={"verbose": -1, "min_data_in_bin": 1})
            self._model = lightgbm.train(params, data, num_boost_round=80)

    def predict(self, feature_dicts: Sequence[dict]) -> np.ndarray:
        if not feature_dicts:
            return np.zeros(0)
        if self._model is None:
            return np.zeros(len(feature_dicts))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(self._model.predict(self._matrix(feature_dicts)), np.float64)


def relative_log_time(time_s: float, untuned_s: float) -> float:
    return math.log(time_s / untuned_s)
