"""hemaseg.measure.dicom_out: the DICOM SR (TID 1500) and SEG written for a scan, read back with highdicom
(tiny 48x64 sources built here with pydicom; CPU, well under a second each)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.sr.codedict import codes
from pydicom.uid import UltrasoundMultiFrameImageStorage, generate_uid

from hemaseg import __version__
from hemaseg.cli import main
from hemaseg.data.images import DataError, decode_image
from hemaseg.spacing import Spacing
from hemaseg.measure.dicom_out import write_seg, write_sr
from hemaseg.lesions import find_lesions
from hemaseg.measure.scan import measure_scan

from .dicom_files import H, W, native, region, save

hd = pytest.importorskip("highdicom")  # not a core dependency (yet): skip cleanly without it

PATIENT = {"PatientName": "Doe^Jane", "PatientID": "P-0042", "PatientBirthDate": "19900101", "PatientSex": "F",
           "AccessionNumber": "ACC-7", "StudyID": "S1", "StudyDate": "20240102", "StudyTime": "101500",
           "ReferringPhysicianName": "", "SeriesNumber": 3, "InstanceNumber": 1}


def source(tmp_path: Path, frames: int = 1, calibrated: bool = True, name: str = "scan.dcm", **attrs) -> Path:
    """A MONOCHROME2 ultrasound file with Patient/Study/Series identity and, when `calibrated`, one 2-D
    region of 0.1 x 0.2 mm pixels (dx 0.01 cm, dy 0.02 cm)."""
    rng = np.random.default_rng(0)
    shape = (frames, H, W) if frames > 1 else (H, W)
    ds = native(rng.integers(40, 200, shape, dtype=np.uint8), StudyInstanceUID=generate_uid(),
                SeriesInstanceUID=generate_uid(), **PATIENT)
    if frames > 1:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    if calibrated:
        ds.SequenceOfUltrasoundRegions = [region()]
    for k, v in attrs.items():
        if v is None:
            delattr(ds, k)
        else:
            setattr(ds, k, v)
    return save(ds, tmp_path, name)


def two_lesions() -> np.ndarray:
    """A disc (the larger, lesion 1) and a rectangle (lesion 2), bool HxW."""
    yy, xx = np.mgrid[0:H, 0:W]
    mask = (xx - 18) ** 2 + (yy - 20) ** 2 <= 8 ** 2
    mask[30:38, 40:52] = True
    return mask


def read_sr(path: Path):
    sr = hd.sr.srread(path)
    return sr, sr.content.get_planar_roi_measurement_groups(), sr.content.get_image_measurement_groups()


def value(group, concept) -> tuple[float, str]:
    (m,) = group.get_measurements(name=concept)
    return m.value, m.unit.value


def parameters(group) -> list[str]:
    """The TID 4019 Algorithm Parameters of a measurement group."""
    return [item.TextValue for item in group[0].ContentSequence
            if item.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Parameters"]


def test_seg_holds_the_mask_and_references_its_source(tmp_path):
    import pydicom

    src = source(tmp_path)
    mask = two_lesions()
    out = write_seg(src, mask, tmp_path / "out" / "scan_seg.dcm", model="ultrasound")
    assert out == tmp_path / "out" / "scan_seg.dcm" and [p.name for p in out.parent.iterdir()] == ["scan_seg.dcm"]

    seg = hd.seg.segread(out)
    uid = pydicom.dcmread(src).SOPInstanceUID
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=[uid], segment_numbers=[1])
    assert pixels.shape == (1, H, W, 1)
    np.testing.assert_array_equal(pixels[0, :, :, 0].astype(bool), mask)
    assert seg.SegmentationType == "BINARY" and seg.Modality == "SEG"
    assert seg.SourceImageSequence[0].ReferencedSOPInstanceUID == uid
    (segment,) = seg.SegmentSequence
    assert segment.SegmentLabel == "Lesion" and segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"  # morphologically abnormal
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"  # lesion
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("hemaseg", __version__)
    assert "ultrasound" in algorithm.AlgorithmParameters
    # filed with the scan: the source's patient and study are copied (by design)
    source_ds = pydicom.dcmread(src)
    for k in ("PatientID", "PatientName", "StudyInstanceUID", "AccessionNumber", "StudyDate"):
        assert seg.get(k) == source_ds.get(k), k
    assert seg.SeriesInstanceUID != source_ds.SeriesInstanceUID


def test_sr_reports_each_lesion_outline_and_mm_figures(tmp_path):
    import pydicom

    src = source(tmp_path)
    mask = two_lesions()
    measured = measure_scan(decode_image(src), mask)
    m = measured.measurement
    assert m.spacing is not None and m.n_lesions == 2
    out = write_sr(src, mask, measured, tmp_path / "scan_sr.dcm", model="ultrasound")

    sr, rois, scans = read_sr(out)
    source_ds = pydicom.dcmread(src)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert (sr.VerificationFlag, sr.PreliminaryFlag, sr.CompletionFlag) == ("UNVERIFIED", "PRELIMINARY", "COMPLETE")
    assert sr.StudyInstanceUID == source_ds.StudyInstanceUID and sr.PatientID == "P-0042"
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source_ds.SOPInstanceUID

    (scan,) = scans
    assert value(scan, codes.SCT.NumberOfLesions) == (2, "1")

    _, lesions = find_lesions(mask)
    assert [g.tracking_identifier for g in rois] == ["lesion 1", "lesion 2"]
    assert len({g.tracking_uid for g in rois}) == 2
    for group, les, lm in zip(rois, lesions, m.lesions):
        roi = group.roi
        assert roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        expected = np.asarray(les.contour, float) + 0.5  # pixel centres in DICOM image coordinates
        np.testing.assert_allclose(roi.value, np.vstack([expected, expected[:1]]), atol=1e-4)  # closed
        ref = roi.ContentSequence[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == source_ds.SOPInstanceUID
        assert "ReferencedFrameNumber" not in ref  # a single-frame IOD
        assert group.finding_type.value == codes.SCT.Lesion.value
        assert value(group, codes.SCT.Area) == (lm.area_mm2, "mm2")
        assert value(group, codes.SCT.LongAxis) == (lm.longest_diameter_mm, "mm")
        assert value(group, codes.SCT.ShortAxis) == (lm.perpendicular_diameter_mm, "mm")
        assert value(group, codes.DCM.Height) == (lm.thickness_mm, "mm")
    assert m.lesions[0].area_mm2 == pytest.approx(m.lesions[0].area_px * 0.1 * 0.2)

    params = parameters(rois[0])
    assert "model: ultrasound" in params
    assert "pixel spacing: x 0.1 mm, y 0.2 mm per pixel, from ultrasound region 0 (0018,6011)" in params


def test_sr_carries_the_models_finding_as_qualitative_evaluations(tmp_path):
    from hemaseg.inference.review import decide

    src = source(tmp_path)
    for mask, confidence in ((two_lesions(), 0.9), (np.zeros((H, W), bool), 0.97)):
        finding = decide(confidence, bool(mask.any()), None, None)  # no fitted cut: an empty scan is flagged
        out = write_sr(src, mask, measure_scan(decode_image(src), mask), tmp_path / "sr.dcm", model="ultrasound",
                       finding=finding)
        _, _, (scan,) = read_sr(out)
        evaluations = {e.name.meaning: e.value.meaning for e in scan.get_qualitative_evaluations()}
        assert evaluations == {"Lesion found": "Yes" if mask.any() else "No",
                               "Needs review": "Yes" if finding.needs_review else "No"}
        assert f"review: {finding.why}" in parameters(scan)
    assert finding.needs_review and not finding.found


def test_multi_frame_source_gets_an_sr_on_its_frame_but_no_seg(tmp_path):
    src = source(tmp_path, frames=3)
    mask = two_lesions()
    with pytest.raises(DataError, match=r"scan\.dcm: a DICOM SEG needs a single-frame source; this file has "
                                        r"3 frames"):
        write_seg(src, mask, tmp_path / "seg.dcm", frame=1, model="ultrasound")
    assert not (tmp_path / "seg.dcm").exists()

    measured = measure_scan(decode_image(src, frame=1), mask)
    _, rois, scans = read_sr(write_sr(src, mask, measured, tmp_path / "sr.dcm", frame=1, model="ultrasound"))
    assert [g.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedFrameNumber for g in rois] == [2, 2]
    assert scans[0].source_images[0].referenced_frame_numbers == [2]  # 0-based frame 1 = DICOM frame 2

    with pytest.raises(DataError, match="has 3 frames: a DICOM SR must say which one"):
        write_sr(src, mask, measured, tmp_path / "x.dcm", model="ultrasound")
    with pytest.raises(DataError, match=r"frame 3 does not exist: the file has 3 frame\(s\), numbered 0..2"):
        write_sr(src, mask, measured, tmp_path / "x.dcm", frame=3, model="ultrasound")
    assert not (tmp_path / "x.dcm").exists()


def test_uncalibrated_scan_gets_a_seg_but_no_sr(tmp_path):
    src = source(tmp_path, calibrated=False)
    mask = two_lesions()
    measured = measure_scan(decode_image(src), mask)
    assert measured.measurement.spacing is None
    with pytest.raises(DataError, match=r"scan\.dcm: a DICOM SR needs measurements in mm and this scan has none "
                                        r"\(the DICOM file has no calibration"):
        write_sr(src, mask, measured, tmp_path / "sr.dcm", model="ultrasound")
    assert not (tmp_path / "sr.dcm").exists()
    assert hd.seg.segread(write_seg(src, mask, tmp_path / "seg.dcm", model="ultrasound")).SegmentationType == "BINARY"

    # a typed spacing (allowed for a DICOM file without calibration of its own) is named in the SR
    typed = measure_scan(decode_image(src), mask, Spacing(0.1, 0.1, "--pixel-spacing"))
    _, rois, _ = read_sr(write_sr(src, mask, typed, tmp_path / "sr.dcm", model="ultrasound"))
    params = parameters(rois[0])
    assert "pixel spacing: x 0.1 mm, y 0.1 mm per pixel, from --pixel-spacing" in params


def test_no_lesion_is_reported_too(tmp_path):
    src = source(tmp_path)
    empty = np.zeros((H, W), bool)
    _, rois, scans = read_sr(write_sr(src, empty, measure_scan(decode_image(src), empty), tmp_path / "sr.dcm",
                                       model="ultrasound"))
    assert rois == [] and value(scans[0], codes.SCT.NumberOfLesions) == (0, "1")
    seg = hd.seg.segread(write_seg(src, empty, tmp_path / "seg.dcm", model="ultrasound"))
    assert seg.NumberOfFrames == 1 and not seg.pixel_array.any()


def test_dicom_outputs_collects_what_can_be_made_and_says_why_not(tmp_path):
    from hemaseg.measure.dicom_out import dicom_outputs

    src = source(tmp_path, frames=3)
    mask = two_lesions()
    measured = measure_scan(decode_image(src, frame=2), mask)
    files, skipped = dicom_outputs(src, mask, measured, 2, tmp_path / "out" / "scan_frame002", sr=True, seg=True,
                                   model="ultrasound")
    assert list(files) == [tmp_path / "out" / "scan_frame002_sr.dcm"]  # nothing written yet: bytes to write
    assert not (tmp_path / "out").exists()
    why = f"{src}: a DICOM SEG needs a single-frame source; this file has 3 frames (the DICOM SR references the frame"
    assert skipped == [why + " instead)"]
    ((path, data),) = files.items()
    path.parent.mkdir()
    path.write_bytes(data)
    assert read_sr(path)[1][0].roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedFrameNumber == 3


def test_a_lesion_without_an_inside_is_outlined_by_its_pixel_edges(tmp_path):
    src = source(tmp_path)
    mask = np.zeros((H, W), bool)
    mask[10, 20] = True  # one pixel
    mask[30:34, 5] = True  # a one-pixel-wide line (the larger lesion)
    # model=None: a mask hemaseg did not draw (measure --masks), and the SR says so
    _, rois, _ = read_sr(write_sr(src, mask, measure_scan(decode_image(src), mask), tmp_path / "sr.dcm", model=None))
    assert "outline: supplied with the scan, not drawn by hemaseg" in parameters(rois[0])
    np.testing.assert_allclose(rois[0].roi.value, [[5, 30], [6, 30], [6, 34], [5, 34], [5, 30]])
    np.testing.assert_allclose(rois[1].roi.value, [[20, 10], [21, 10], [21, 11], [20, 11], [20, 10]])


def test_refusals_name_the_file_and_write_nothing(tmp_path):
    src = source(tmp_path)
    mask = two_lesions()
    measured = measure_scan(decode_image(src), mask)
    out = tmp_path / "out.dcm"
    with pytest.raises(DataError, match=r"scan\.dcm: the mask is 32x24 pixels but the DICOM image is 64x48"):
        write_seg(src, np.zeros((24, 32), bool), out, model="ultrasound")
    other = np.zeros((H, W), bool)
    other[5:9, 5:9] = True
    with pytest.raises(DataError, match="the measurement does not belong to this mask"):
        write_sr(src, other, measured, out, model="ultrasound")
    png = tmp_path / "scan.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    with pytest.raises(DataError, match=r"scan\.png: a DICOM SR or SEG is derived from a DICOM source") as e:
        write_seg(png, mask, out, model="ultrasound")
    assert e.value.code == "unsupported_type"
    with pytest.raises(DataError, match="file does not exist"):
        write_seg(tmp_path / "missing.dcm", mask, out, model="ultrasound")
    no_study = source(tmp_path, name="anon.dcm", StudyInstanceUID=None)
    with pytest.raises(DataError, match=r"anon\.dcm: has no Study Instance UID \(0020,000D\)"):
        write_sr(no_study, mask, measured, out, model="ultrasound")
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_header_values_stay_out_of_logs_and_missing_type2_attributes_are_tolerated(tmp_path, caplog):
    # highdicom warns about a Patient's Name without a caret quoting it (older versions logged it);
    # anonymised files may lack Type 2 attributes
    odd = "Jane Doe"
    src = source(tmp_path, PatientName=odd, PatientSex="U", PatientBirthDate=None, AccessionNumber=None,
                 StudyID=None, StudyTime=None, ReferringPhysicianName=None)
    mask = two_lesions()
    measured = measure_scan(decode_image(src), mask)
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seg_path = write_seg(src, mask, tmp_path / "seg.dcm", model="ultrasound")
        sr_path = write_sr(src, mask, measured, tmp_path / "sr.dcm", model="ultrasound")
    assert odd not in caplog.text and not [w for w in caught if odd in str(w.message)]
    seg, (sr, _, _) = hd.seg.segread(seg_path), read_sr(sr_path)
    assert str(sr.PatientName) == str(seg.PatientName) == odd  # the value itself is kept
    assert sr.PatientSex == "" and "AccessionNumber" in sr and not sr.AccessionNumber


def test_measure_masks_writes_a_dicom_sr_for_calibrated_dicom_scans_only(tmp_path):
    hd = pytest.importorskip("highdicom")
    scans, masks, out = tmp_path / "scans", tmp_path / "masks", tmp_path / "out"
    ids = {"StudyInstanceUID": generate_uid(), "SeriesInstanceUID": generate_uid(), "PatientID": "P1"}
    image = np.full((H, W), 120, np.uint8)
    save(native(image, SequenceOfUltrasoundRegions=[region()], **ids), scans, "cal.dcm")
    save(native(image, **ids), scans, "uncal.dcm")
    masks.mkdir()
    mask = np.zeros((H, W), np.uint8)
    mask[10:30, 10:40] = 255
    for name in ("cal", "uncal"):
        Image.fromarray(mask).save(masks / f"{name}.png")
    assert main(["-q", "measure", "--masks", str(masks), str(scans), "--out", str(out), "--dicom-sr"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cal_sr.dcm", "lesions.csv", "measurements.csv"]
    assert len(hd.sr.srread(out / "cal_sr.dcm").content.get_planar_roi_measurement_groups()) == 1
    assert main(["-q", "measure", "--masks", str(masks), str(scans), "--out", str(out), "--dicom-seg"]) == 2


def test_predict_dicom_sr_on_a_png_says_why_it_wrote_none(tiny_run, tiny_data, tmp_path, caplog):
    from hemaseg.cli import main

    scan = sorted((tiny_data / "images").iterdir())[0]
    with caplog.at_level("WARNING"):
        assert main(["-q", "predict", str(tiny_run), str(scan), "--out", str(tmp_path / "p"), "--dicom-sr",
                     "--backend", "torch"]) == 0
    assert any("not a DICOM file, so no DICOM SR" in r.getMessage() for r in caplog.records)
    assert not list((tmp_path / "p").glob("*.dcm"))
