"""Realism for the sequence classifier's training exams (issue 18): the phantom is a cartoon (flat
compartments, smooth ellipsoids) and the classifier trained on it alone keys on that. Per exam, before any
series is rendered, so that every sequence of the exam sees the same anatomy and physics holds across them
(DWI S(b) = S0 exp(-b ADC) and the ADC map both use the same textured ADC):

* ``deform``: a smooth random elastic displacement of the label map (organic organ shapes);
* ``septa``: thin fat septa in muscle and thin strands (vessels, fascia) in fat, from the zero set of a
  random field;
* ``texture``: each soft tissue split into sub-classes by quantiles of a multi-scale correlated random field;
  a sub-class scales its tissue's T2, PD and ADC by correlated log-normal factors (prostate zones: lower T2
  with lower ADC, as in real glands). Rendered by the simulator's own per-class path (Phantom.texture_map).
* ``pelvis``: how a real pelvis looks where the phantom's does not (issue 18's systematic errors: real T2W read
  as ADC, real ADC maps read as low-b DWI, by every earlier recipe):
  - composition: a real pelvis at the gland is mostly fat between distinct muscles; the phantom's body is
    filled with muscle (about 70 % of it against about 20 % fat). Smooth random regions of that muscle become
    fat until fat makes 35-60 % of the body (``fatten``);
  - bright fat on turbo spin echo: fat's T2 lengthened 1.3-2.5x (the echo train breaks up J-coupling, so fat is
    nearly as bright as urine on real T2W, where a plain T2 of 135 ms leaves it mid-grey);
  - stronger gland and tissue texture (sub-class contrast up to 0.4 log units: real PZ striations and TZ
    nodules, where the plain texture left T2W's fine detail channels nearly flat);
  - ADC maps blanked only in air (``pelvis_artifacts``: the render's ``Artifacts.adc_mask_*``): many
    scanners fit the suppressed fat too, so it is speckled noise on real maps, where the simulator blanks it.
* ``constants_sd``: per exam and tissue, one more log-normal factor on T2, PD and ADC (wider tissue constants than
  the simulator's one table: patients, field strengths and sequences differ); urine keeps its free-water ADC.

``interpolate_epi``: some vendors (GE) reconstruct EPI at a 256 matrix (~0.7-1 mm pixels) from a 96-160
acquisition; real DWI/ADC then look smooth at fine pixel spacing. Applied to the rendered images.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from scanside.simulator.model import RenderedImage
from scanside.simulator.phantom import Phantom
from scanside.simulator.physics import Tissue

#: tissues given sub-tissue texture
TEXTURED = (Tissue.FAT, Tissue.MUSCLE, Tissue.BLADDER, Tissue.RECTUM, Tissue.BONE_MARROW, Tissue.PZ, Tissue.TZ,
            Tissue.SEMINAL_VESICLE)
N_BINS = 6


def _field(rng: np.random.Generator, shape: tuple, sigmas_vox: tuple, step: int = 2) -> np.ndarray:
    """Zero-mean unit-variance multi-scale Gaussian random field (float32), made at 1/step resolution."""
    small = tuple(int(np.ceil(s / step)) for s in shape)
    acc = np.zeros(small, np.float32)
    for s in sigmas_vox:
        f = ndimage.gaussian_filter(rng.standard_normal(small).astype(np.float32), max(s / step, 0.5))
        acc += f / max(float(f.std()), 1e-6) * np.float32(rng.uniform(0.5, 1.0))
    up = ndimage.zoom(acc, [a / b for a, b in zip(shape, small)], order=1)[:shape[0], :shape[1], :shape[2]]
    return ((up - up.mean()) / max(float(up.std()), 1e-6)).astype(np.float32)


def deform(labels: np.ndarray, masks: np.ndarray, rng: np.random.Generator, amp_vox: float, scale_vox: float
           ) -> tuple[np.ndarray, np.ndarray]:
    """Labels and lesion masks warped by a smooth displacement field (nearest neighbour: labels stay labels)."""
    coarse = tuple(max(2, int(np.ceil(n / scale_vox)) + 1) for n in labels.shape)
    coords = np.indices(labels.shape, dtype=np.float32)
    for ax in range(3):
        d = rng.standard_normal(coarse).astype(np.float32) * np.float32(amp_vox)
        coords[ax] += ndimage.zoom(d, [n / c for n, c in zip(labels.shape, coarse)], order=1)[
            :labels.shape[0], :labels.shape[1], :labels.shape[2]]
    warp = lambda a: ndimage.map_coordinates(a, coords, order=0, mode="nearest").astype(a.dtype)  # noqa: E731
    return warp(labels), (warp(masks) if masks.any() else masks)


def fatten(labels: np.ndarray, rng: np.random.Generator, voxel_mm: float, fat_fraction: float) -> np.ndarray:
    """``labels`` with smooth random regions of muscle turned to fat until fat is ``fat_fraction`` of the body
    (never below what it is)."""
    body = labels != Tissue.BACKGROUND
    muscle = labels == Tissue.MUSCLE
    need = fat_fraction * float(body.sum()) - float((labels == Tissue.FAT).sum())
    if need <= 0 or not muscle.any():
        return labels
    f = _field(rng, labels.shape, (float(rng.uniform(8, 20)) / voxel_mm, 4.0 / voxel_mm))
    cut = np.quantile(f[muscle], 1.0 - min(need / float(muscle.sum()), 0.95))
    out = labels.copy()
    out[muscle & (f >= cut)] = Tissue.FAT
    return out


#: with ``pelvis``: range of the sub-tissue texture's log-sd (the plain realism: 0.15)
PELVIS_TEXTURE_SD = (0.15, 0.4)


def pelvis_artifacts(rng: np.random.Generator) -> dict[str, dict]:
    """With ``pelvis``: render artifacts per series kind, drawn once per exam.

    * EPI (DWI, its ADC map, calculated b): more suppressed fat left than the simulator's 2 % (SPAIR in a
      large field of view), and the ADC map blanked only below 1.5-2.5 noise sigmas or 0.5-3 % of the
      lowest-b 99th percentile (the simulator: 3 sigmas, 6 %), so that the fat is fitted and speckled as on
      many real maps.
    * T2W: 1.5-3.5x the simulator's noise. Measured on the prepared input (the fine detail channels'
      mean gradient and high-frequency share), real 3 T T2W TSE at 0.6 mm is as noisy as the simulator's
      T2W at 2-3.5x its noise, where its DWI and ADC maps match real ones at 1x
      (bench/results/sequence_transfer.json, "noise"); too clean a T2W taught the model that fine
      pixel-level texture means ADC or high-b DWI, and every real T2W was read as ADC.
    """
    epi = dict(epi_fat_residual=float(rng.uniform(0.03, 0.1)), adc_mask_noise=float(rng.uniform(1.5, 2.5)),
               adc_mask_fraction=float(rng.uniform(0.005, 0.03)))
    t2 = {"noise_scale": float(rng.uniform(1.5, 3.5))}
    return {"dwi": epi, "adc": epi, "calc_bvalue": epi, "t2w": t2, "t2w_fs": t2}


def realistic_phantom(ph: Phantom, rng: np.random.Generator, *, texture_sd: float = 0.15,
                      constants_sd: float = 0.0, pelvis: bool = False) -> Phantom:
    """A copy of ``ph`` with deformed anatomy, septa and sub-tissue texture (see module doc); with ``pelvis``
    the real pelvis' fat, bright TSE fat and stronger texture (the caller renders its EPI series with
    ``pelvis_artifacts``)."""
    labels, masks = ph.labels, ph.lesion_masks
    fat_t2 = 1.0
    if pelvis:
        labels = fatten(labels, rng, ph.voxel_mm, float(rng.uniform(0.35, 0.6)))
        fat_t2 = float(np.exp(rng.uniform(np.log(1.3), np.log(2.5))))
        texture_sd = float(rng.uniform(*PELVIS_TEXTURE_SD))
    if rng.random() < 0.8:
        labels, masks = deform(labels, masks, rng, amp_vox=float(rng.uniform(1.5, 4.0)) / ph.voxel_mm,
                               scale_vox=float(rng.uniform(15, 30)) / ph.voxel_mm)
    labels = labels.copy()
    if rng.random() < 0.8:
        f = _field(rng, labels.shape, (float(rng.uniform(3, 8)) / ph.voxel_mm,))
        thin = np.abs(f) < np.float32(rng.uniform(0.03, 0.08))
        g = _field(rng, labels.shape, (float(rng.uniform(3, 8)) / ph.voxel_mm,))
        strand = np.abs(g) < np.float32(rng.uniform(0.02, 0.05))
        labels[thin & (labels == Tissue.MUSCLE)] = Tissue.FAT
        labels[strand & (labels == Tissue.FAT)] = Tissue.MUSCLE
    tex = _field(rng, labels.shape, tuple(float(s) / ph.voxel_mm for s in (1.0, 2.5, 6.0)))
    tmap = np.zeros(labels.shape, np.uint8)
    props: list[dict] = []
    for t in TEXTURED:
        m = labels == t
        if not m.any():
            continue
        v = tex[m]
        edges = np.quantile(v, np.linspace(0, 1, N_BINS + 1)[1:-1])
        b = np.digitize(v, edges)
        sd = float(rng.uniform(0.3, 1.0)) * texture_sd
        # ADC follows T2 in glandular tissue (cellularity lowers both); elsewhere independent sign
        rho = float(rng.uniform(0.5, 1.0)) if t in (Tissue.PZ, Tissue.TZ) else float(rng.uniform(-0.5, 0.5))
        c_t2, c_pd, c_adc = (np.exp(constants_sd * f * float(rng.standard_normal()))
                             for f in (1.0, 0.6, 0.15 if t == Tissue.BLADDER else 0.8))
        c_t2 = c_t2 * fat_t2 if t == Tissue.FAT else c_t2
        codes = np.zeros(N_BINS, np.uint8)
        for k in range(N_BINS):
            z = (k - (N_BINS - 1) / 2) / ((N_BINS - 1) / 2) * 1.5  # bin position in standard deviations
            za = rho * z + np.sqrt(1 - rho * rho) * float(rng.standard_normal())
            props.append({"tissue": int(t), "t2": float(c_t2 * np.exp(sd * z)), "pd": float(c_pd * np.exp(0.4 * sd * z)),
                          "adc": float(c_adc * np.exp(sd * za))})
            codes[k] = len(props)
        tmap[m] = codes[b]
    from dataclasses import replace

    return replace(ph, labels=labels, lesion_masks=masks, texture_map=tmap, texture_props=props, _classes=None)


def interpolate_epi(images: list[RenderedImage], matrix: int) -> list[RenderedImage]:
    """EPI images reconstructed onto a ``matrix``-square grid (cubic interpolation, as zero-filled
    reconstruction smooths them), the pixel spacing scaled to keep the field of view."""
    out = []
    for im in images:
        r, c = im.pixels.shape
        z = ndimage.zoom(im.pixels.astype(np.float32), (matrix / r, matrix / c), order=3)
        z = np.clip(z, 0, None)  # cubic overshoot; magnitudes and ADC are non-negative
        sp = (im.pixel_spacing[0] * r / z.shape[0], im.pixel_spacing[1] * c / z.shape[1])
        # the position is the centre of the top-left pixel: move it by half the spacing change
        o = np.asarray(im.orientation, float)
        pos = (np.asarray(im.position) - 0.5 * (im.pixel_spacing[1] - sp[1]) * o[:3]
               - 0.5 * (im.pixel_spacing[0] - sp[0]) * o[3:])
        out.append(im.model_copy(update=dict(pixels=z, pixel_spacing=sp, position=tuple(float(t) for t in pos))))
    return out
