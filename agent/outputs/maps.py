"""Model output maps kept beside the event that reports them.

An event carries numbers, not volumes: the triage runtime stores the lesion-likelihood map it computed
here, under the key of the TriageResult event it is about to append, and the DICOM output reads it
back (after a restart too) to write the SEG. One compressed .npz per map: the array and the 4x4 grid
affine ((d0, d1, d2, 1) -> LPS mm, as scanside.engines.preprocess.Grid). Written atomically.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import numpy as np

from scanside.agent.outputs.atomic import atomic_path
from scanside.agent.dicom.volume import int3
from scanside.engines.preprocess import Grid


class MapStore:
    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path_for(self, event_key: str) -> Path:
        return self.folder / (hashlib.sha256(event_key.encode()).hexdigest()[:32] + ".npz")

    def put(self, event_key: str, array: np.ndarray, grid: Grid) -> Path:
        array = np.asarray(array, dtype=np.float32)
        if tuple(array.shape) != tuple(grid.shape):
            raise ValueError(f"map shape {array.shape} != grid shape {grid.shape}")
        dest = self.path_for(event_key)
        with atomic_path(dest) as tmp, open(tmp, "wb") as fp:
            np.savez_compressed(fp, array=array, affine=np.asarray(grid.affine, dtype=np.float64))
        return dest

    def get(self, event_key: str) -> Optional[tuple[np.ndarray, Grid]]:
        path = self.path_for(event_key)
        try:
            with np.load(path) as npz:
                array = np.asarray(npz["array"], dtype=np.float32)
                affine = np.asarray(npz["affine"], dtype=np.float64)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError):
            return None  # unreadable map: the SR is still written, without the SEG
        if array.ndim != 3 or affine.shape != (4, 4):
            return None
        return array, Grid(shape=int3(array.shape), affine=affine)
