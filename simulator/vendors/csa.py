"""Siemens CSA header writer (the binary "SV10" / CSA2 format of (0029,1010) and (0029,1020)).

Layout (little endian), as read by nibabel.nicom.csareader and dcm2niix:
  b"SV10" + b"\\x04\\x03\\x02\\x01" + uint32 n_tags + uint32 77
  per tag: char[64] name, int32 vm, char[4] vr, int32 syngodt, int32 n_items, int32 77|205
  per item: int32 len, int32 len, int32 77, int32 len, then len bytes (NUL terminated text),
            padded to a multiple of 4.
Siemens writes a fixed number of items per tag (6 for scalars); the ones past the value
multiplicity are empty. We do the same.
"""
from __future__ import annotations

import struct
from typing import Iterable, Sequence, Union

Value = Union[str, int, float]

# syngo data type codes Siemens uses for each VR (as seen in real headers)
_SYNGODT = {"IS": 6, "DS": 3, "FD": 4, "FL": 5, "SL": 7, "SS": 8, "UL": 9, "US": 10, "LO": 19, "SH": 22, "CS": 16, "ST": 25, "UT": 27}


def _fmt(value: Value, vr: str) -> bytes:
    if vr in ("DS", "FD", "FL"):
        text = f"{float(value):.8f}"
    elif vr in ("IS", "SL", "SS", "UL", "US"):
        text = str(int(round(float(value))))
    else:
        text = str(value)
    return text.encode("latin-1") + b"\x00"


def _tag(name: str, vr: str, values: Sequence[Value], n_items: int | None = None) -> bytes:
    vm = len(values)
    n_items = max(n_items if n_items is not None else (6 if vm <= 1 else vm), vm)
    out = bytearray(struct.pack("<64si4siii", name.encode("latin-1"), vm, vr.encode("latin-1"), _SYNGODT.get(vr, 19), n_items, 77 if vm else 205))
    for i in range(n_items):
        data = _fmt(values[i], vr) if i < vm else b""
        n = len(data)
        out += struct.pack("<4i", n, n, 77, n)
        out += data
        if n % 4:
            out += b"\x00" * (4 - n % 4)
    return bytes(out)


def build_csa(tags: Iterable[tuple[str, str, Sequence[Value]]]) -> bytes:
    """Encode (name, vr, values) triples into an SV10 CSA header (values may be empty)."""
    tags = list(tags)
    out = bytearray(b"SV10" + b"\x04\x03\x02\x01" + struct.pack("<II", len(tags), 77))
    for name, vr, values in tags:
        out += _tag(name, vr, list(values))
    out += b"\x00" * ((-len(out)) % 4)
    return bytes(out)


def image_header(*, b_value: float | None, direction: Sequence[float] | None, slice_normal: Sequence[float],
                 n_mosaic: int | None = None, mosaic_ref_acq_times: Sequence[float] | None = None,
                 phase_direction_positive: int = 1, bandwidth_per_pixel_phase: float = 20.0,
                 slice_duration_ms: float = 100.0, image_type_4mf: str = "M", protocol_slice_number: int = 0,
                 b_matrix: Sequence[float] | None = None) -> bytes:
    tags: list[tuple[str, str, Sequence[Value]]] = [
        ("EchoLinePosition", "IS", [64]),
        ("EchoColumnPosition", "IS", [64]),
        ("EchoPartitionPosition", "IS", [32]),
        ("UsedChannelMask", "UL", [255]),
        ("Actual3DImaPartNumber", "IS", []),
        ("ICE_Dims", "LO", ["X_1_1_1_1_1_1_1_1_1_1_1_1"]),
        ("B_value", "IS", [] if b_value is None else [b_value]),
        ("Filter1", "IS", []),
        ("Filter2", "IS", []),
        ("ProtocolSliceNumber", "IS", [protocol_slice_number]),
        ("RealDwellTime", "IS", [2700]),
        ("PixelFile", "UN", []),
        ("PixelFileName", "UN", []),
        ("SliceMeasurementDuration", "DS", [slice_duration_ms]),
        ("SequenceMask", "UL", [134217728]),
        ("AcquisitionMatrixText", "SH", []),
        ("MeasuredFourierLines", "IS", [0]),
        ("FlowEncodingDirection", "IS", []),
        ("FlowVenc", "FD", []),
        ("PhaseEncodingDirectionPositive", "IS", [phase_direction_positive]),
        ("NumberOfImagesInMosaic", "US", [] if not n_mosaic else [n_mosaic]),
        ("DiffusionGradientDirection", "FD", [] if direction is None else list(direction)),
        ("ImageGroup", "US", []),
        ("SliceNormalVector", "FD", list(slice_normal)),
        ("DiffusionDirectionality", "CS", [] if b_value is None else (["DIRECTIONAL"] if direction is not None else ["NONE"])),
        ("TimeAfterStart", "DS", [0.0]),
        ("FlipAngle", "DS", []),
        ("SequenceName", "SH", []),
        ("RepetitionTime", "DS", []),
        ("EchoTime", "DS", []),
        ("NumberOfAverages", "DS", []),
        ("VoxelThickness", "DS", []),
        ("VoxelPhaseFOV", "DS", []),
        ("VoxelReadoutFOV", "DS", []),
        ("VoxelPositionSag", "DS", []),
        ("VoxelPositionCor", "DS", []),
        ("VoxelPositionTra", "DS", []),
        ("VoxelNormalSag", "DS", []),
        ("VoxelNormalCor", "DS", []),
        ("VoxelNormalTra", "DS", []),
        ("VoxelInPlaneRot", "DS", []),
        ("ImagePositionPatient", "DS", []),
        ("ImageOrientationPatient", "DS", []),
        ("PixelSpacing", "DS", []),
        ("SliceLocation", "DS", []),
        ("SliceThickness", "DS", []),
        ("SpectrumTextRegionLabel", "SH", []),
        ("Comp_Algorithm", "IS", []),
        ("Comp_Blended", "IS", []),
        ("Comp_ManualAdjusted", "IS", []),
        ("Comp_AutoParam", "LT", []),
        ("Comp_AdjustedParam", "LT", []),
        ("Comp_JobID", "LT", []),
        ("FMRIStimulInfo", "IS", []),
        ("FlowEncodingDirectionString", "SH", []),
        ("RepetitionTimeEffective", "DS", []),
        ("CsiImagePositionPatient", "DS", []),
        ("CsiImageOrientationPatient", "DS", []),
        ("CsiPixelSpacing", "DS", []),
        ("CsiSliceLocation", "DS", []),
        ("CsiSliceThickness", "DS", []),
        ("OriginalSeriesNumber", "IS", []),
        ("OriginalImageNumber", "IS", []),
        ("ImaAbsTablePosition", "SL", [0, 0, -1260]),
        ("NonPlanarImage", "US", [0]),
        ("MoCoQMeasure", "US", []),
        ("LQAlgorithm", "SH", []),
        ("SlicePosition_PCS", "FD", []),
        ("RBMoCoTrans", "FD", []),
        ("RBMoCoRot", "FD", []),
        ("MultistepIndex", "IS", [0]),
        ("ImaRelTablePosition", "IS", [0, 0, 0]),
        ("ImaCoilString", "LO", ["BO1,2;SP3,4"]),
        ("RFSWDDataType", "SH", ["predicted"]),
        ("GSWDDataType", "SH", ["predicted"]),
        ("NormalizeManipulated", "IS", []),
        ("ImaPATModeText", "LO", ["p2"]),
        ("B_matrix", "FD", [] if b_matrix is None else list(b_matrix)),
        ("BandwidthPerPixelPhaseEncode", "FD", [bandwidth_per_pixel_phase]),
        ("FMRIStimulLevel", "FD", []),
        ("MosaicRefAcqTimes", "FD", [] if mosaic_ref_acq_times is None else list(mosaic_ref_acq_times)),
        ("AutoInlineImageFilterEnabled", "IS", []),
        ("QCData", "FD", []),
        ("ExamLandmarks", "LO", []),
        ("ExamDataRole", "ST", []),
        ("MRDiffusion", "ST", []),
        ("RealWorldValueMapping", "ST", []),
        ("DataSetInfo", "ST", []),
        ("UsedChannelString", "UT", ["XXXXXXXXXXXXXXXXXXXXXXXX"]),
        ("PhaseContrastN4", "ST", []),
        ("MRVelocityEncoding", "ST", []),
        ("VelocityEncodingDirectionN4", "FD", []),
        ("ImageType4MF", "CS", [image_type_4mf]),
        ("ImageHistory", "ST", []),
        ("SequenceInfo", "ST", []),
        ("ImageTypeVisible", "CS", []),
        ("DistortionCorrectionType", "CS", ["ND"]),
        ("ImageFilterType", "CS", []),
    ]
    return build_csa(tags)


def series_header(*, protocol_text: str = "", coil: str = "Body_18") -> bytes:
    """The CSA series header (0029,1020) with an ASCCONV MrPhoenixProtocol block."""
    tags: list[tuple[str, str, Sequence[Value]]] = [
        ("UsedPatientWeight", "IS", [80]),
        ("NumberOfPrescans", "IS", [0]),
        ("TransmitterCalibration", "DS", [300.0]),
        ("PhaseGradientAmplitude", "DS", [0.0]),
        ("ReadoutGradientAmplitude", "DS", [0.0]),
        ("SelectionGradientAmplitude", "DS", [0.0]),
        ("GradientDelayTime", "DS", [36.0, 35.0, 31.0]),
        ("RfWatchdogMask", "IS", [0]),
        ("RfPowerErrorIndicator", "DS", []),
        ("SarWholeBody", "DS", []),
        ("Sed", "DS", [1e6, 100.0, 100.0]),
        ("SequenceFileOwner", "SH", ["SIEMENS"]),
        ("Stim_mon_mode", "IS", [2]),
        ("Operation_mode_flag", "IS", [2]),
        ("dBdt_max", "DS", [0.0]),
        ("t_puls_max", "DS", [0.0]),
        ("dBdt_thresh", "DS", [0.0]),
        ("dBdt_limit", "DS", [0.0]),
        ("SW_korr_faktor", "DS", [1.0]),
        ("Stim_max_online", "DS", [0.0, 0.0, 0.0]),
        ("Stim_max_ges_norm_online", "DS", [0.0]),
        ("Stim_lim", "DS", [45.0, 27.0, 40.0]),
        ("Stim_faktor", "DS", [1.0]),
        ("CoilForGradient", "SH", ["void"]),
        ("CoilForGradient2", "SH", ["AS82"]),
        ("CoilTuningReflection", "DS", []),
        ("CoilId", "IS", [255, 83, 238, 255, 255, 255, 255, 255, 255, 255, 255]),
        ("MiscSequenceParam", "IS", [0] * 6),
        ("MrProtocolVersion", "IS", [51130001]),
        ("DataFileName", "LO", []),
        ("RepresentativeImage", "UI", []),
        ("PositivePCSDirections", "SH", ["+LPH"]),
        ("RelTablePosition", "IS", [0, 0, 0]),
        ("ReadoutOS", "FD", [2.0]),
        ("LongModelName", "LO", ["NUMARIS/4"]),
        ("SliceArrayConcatenations", "IS", [1]),
        ("SliceResolution", "DS", [1.0]),
        ("AbsTablePosition", "IS", [-1260]),
        ("AutoAlignMatrix", "FL", []),
        ("MeasurementIndex", "FL", []),
        ("CoilString", "LO", [coil]),
        ("PATModeText", "LO", ["p2"]),
        ("PatReinPattern", "ST", ["1;FFS;80.00;15.00;3;0;2;-1234567890"]),
        ("MrPhoenixProtocol", "UN", [protocol_text] if protocol_text else []),
    ]
    return build_csa(tags)
