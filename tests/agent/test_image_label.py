"""scanside.engines.tasks.image_label: the shipped sequence classifier on real simulated DICOM (the runtime path:
header -> split_parts -> select_frames -> load_volume -> preprocess -> ONNX Runtime), frame
selection for dynamic / multi-plane / directional series, and bad input."""
from __future__ import annotations

import numpy as np
import pytest

from scanside.agent.dicom.header import FrameInfo, FrameRef
from scanside.engines.tasks.image_label import ImageClassifier, ImageLabelError, select_frames
from scanside.agent.schema.taxonomy import LABELS
from scanside.engines.store import ModelNotFound, ModelStore
from tests.agent.realdata import DCM_QA_NIH, need


@pytest.fixture(scope="module")
def classifier():
    store = ModelStore()
    try:
        store.resolve("sequence-classifier")
    except ModelNotFound:
        pytest.skip("sequence-classifier not in the model store")
    return ImageClassifier(store)


def test_each_class_on_simulated_dicom(classifier):
    from tests.training._exams import exam
    from scanside.training.sequence.evaluate import exam_parts

    seen: dict[str, list[str]] = {}
    withheld = 0
    for vendor, seed in (("siemens", 700_101), ("philips", 700_102)):
        for p in exam_parts(exam(vendor, seed)):
            lab = classifier.classify(p["part"])
            assert set(lab.probabilities) == set(LABELS)
            assert abs(sum(lab.probabilities.values()) - 1.0) < 1e-3
            # the store's default choice: OpenVINO on x86 where the model's OpenVINO parity passes, else ONNX Runtime
            assert lab.backend == classifier._store.explain("sequence-classifier").backend
            assert lab.backend in ("onnxruntime", "openvino") and lab.model.startswith("sequence-classifier/")
            seen.setdefault(p["label"], []).append(lab.predicted)
            withheld += lab.uncertain
    assert set(seen) == set(LABELS), f"test exams lack classes: {set(LABELS) - set(seen)}"
    assert withheld <= 1, f"the uncertainty gate withheld {withheld} in-distribution labels"
    for truth, preds in seen.items():
        right = sum(pr == truth for pr in preds)
        assert right >= max(1, len(preds) - 1), f"{truth}: predicted {preds}"
    total = sum(len(v) for v in seen.values())
    wrong = sum(sum(pr != t for pr in v) for t, v in seen.items())
    assert wrong <= 1, f"{wrong}/{total} wrong: {seen}"


def test_volume_input_and_refs_input_agree(classifier):
    from scanside.agent.dicom.volume import load_volume
    from tests.training._exams import exam
    from scanside.training.sequence.evaluate import exam_parts

    p = next(q for q in exam_parts(exam("siemens", 700_101)) if q["label"] == "ADC")
    part = p["part"]
    by_part = classifier.classify(part)
    by_refs = classifier.classify(part.refs)  # headers re-read
    by_vol = classifier.classify(load_volume(select_frames(part.refs, part.frames)))
    assert by_part.label == by_refs.label == by_vol.label == "ADC"
    assert by_part.probabilities == by_vol.probabilities


def _f(i, pos, orient=(1, 0, 0, 0, 1, 0), t=None, direction=None, iso=False):
    return FrameInfo(frame_index=i, position=pos, orientation=orient, temporal_index=t, direction=direction,
                     isotropic=iso)


def test_select_frames_dynamic_takes_middle_phase():
    refs, infos = [], []
    for t in (1, 2, 3, 4, 5):
        for z in range(3):
            refs.append(FrameRef(path=f"f{t}_{z}", frame_index=0))
            infos.append(_f(0, (0.0, 0.0, float(z)), t=t))
    sel = select_frames(refs, infos)
    assert [r.path for r in sel] == ["f3_0", "f3_1", "f3_2"]


def test_select_frames_localizer_one_plane_and_trace_over_directions():
    sag, ax = (0, 1, 0, 0, 0, -1), (1, 0, 0, 0, 1, 0)
    refs = [FrameRef(path=f"p{i}") for i in range(5)]
    infos = [_f(0, (float(i), 0, 0), orient=sag) for i in range(3)] + [_f(0, (0, 0, float(i)), orient=ax) for i in range(2)]
    assert [r.path for r in select_frames(refs, infos)] == ["p0", "p1", "p2"]
    # directional + trace images at the same positions: the trace wins
    refs = [FrameRef(path=f"d{i}") for i in range(4)]
    infos = [_f(0, (0, 0, 0.0), direction=(1.0, 0, 0)), _f(0, (0, 0, 0.0), iso=True),
             _f(0, (0, 0, 1.0), direction=(0, 1.0, 0)), _f(0, (0, 0, 1.0), iso=True)]
    assert [r.path for r in select_frames(refs, infos)] == ["d1", "d3"]


def test_select_frames_one_mosaic_per_position():
    """A mosaic holds a whole volume: several at one position (fMRI volumes, diffusion directions) are repeats,
    one of them is the volume (the trace where there is one); mosaics at other positions are other slabs."""
    refs = [FrameRef(path=f"m{i}") for i in range(4)]
    infos = [FrameInfo(frame_index=0, position=(0, 0, 0.0), orientation=(1, 0, 0, 0, 1, 0), n_slices=5,
                       direction=(1.0, 0, 0) if i < 2 else None, isotropic=i == 2) for i in range(3)]
    infos.append(FrameInfo(frame_index=0, position=(0, 0, 40.0), orientation=(1, 0, 0, 0, 1, 0), n_slices=5))
    assert [r.path for r in select_frames(refs, infos)] == ["m2", "m3"]


def test_real_siemens_fmri_mosaics_make_one_volume():
    """dcm_qa_nih's Siemens EPI series: two mosaic volumes of 5 slices each (10 slices at 5 positions, which
    load_volume refused as duplicate positions before select_frames kept one mosaic per position)."""
    from scanside.agent.dicom.volume import load_volume

    folder = need(DCM_QA_NIH) / "In" / "20180918Si" / "mr_0003"
    refs = [FrameRef(path=str(p)) for p in sorted(folder.glob("*.dcm"))]
    assert len(refs) == 2
    chosen = select_frames(refs)
    assert len(chosen) == 1
    assert load_volume(chosen).shape == (5, 72, 72)


def test_bad_input_raises_typed_error(classifier, tmp_path):
    with pytest.raises(ImageLabelError) as e:
        classifier.classify([])
    assert e.value.reason == "no_frames"
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a dicom file at all" * 10)
    with pytest.raises(ImageLabelError) as e:
        classifier.classify([FrameRef(path=str(junk))])
    assert e.value.reason == "unreadable_header"
    from scanside.agent.dicom.volume import Volume
    v = Volume.from_array_affine(np.full((4, 32, 32), np.nan, np.float32), np.eye(4))
    lab = classifier.classify(v)  # NaN pixels do not crash; a label (or `uncertain`, with the most probable) comes back
    assert (lab.label in LABELS or lab.uncertain) and lab.predicted in LABELS
